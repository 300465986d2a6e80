"""The `pqueue` command: inspect, fix and feed queues from a shell (also `python -m pqueue`).

Each subcommand is one `_add_<name>(subparsers)` function that builds its parser and sets
``func``; adding a command is adding such a function to `COMMANDS`. Read-only commands (dump,
stat, verify, tail, groups, dlq list) go through `pqueue.inspect` and take no lock, so they are
safe on a live queue. Errors are one line on stderr and a non-zero exit, never a traceback.

Exit codes: 0 success; 1 damage found (verify, repair) or an operation failed; 2 usage error,
a path that is not a queue, or a confirmation that was not given; 3 nothing to get;
130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TextIO

from . import admin, inspect
from .errors import Empty, NotAQueueError, QueueError
from .queue import Queue

EXIT_OK = 0
EXIT_DAMAGE = 1  # also: the operation failed
EXIT_USAGE = 2  # also: not a queue, a confirmation missing
EXIT_EMPTY = 3
EXIT_INTERRUPTED = 130
PROGRESS_SECONDS = 0.2  # redraw the progress line at most this often
PAYLOAD_MODES = ("auto", "json", "repr", "hex", "none")

Subparsers = Any  # argparse._SubParsersAction is private; its add_parser is all we use


class UsageError(Exception):
    """A command was asked for something it refuses (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that point at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# --------------------------------------------------------------------------- output helpers


class _Style:
    """ANSI colour, only when the stream is a terminal and NO_COLOR is not set."""

    def __init__(self, stream: TextIO) -> None:
        self.on = stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.on else text

    def red(self, text: str) -> str:
        return self._wrap("31;1", text)

    def green(self, text: str) -> str:
        return self._wrap("32", text)

    def yellow(self, text: str) -> str:
        return self._wrap("33", text)


class _Progress:
    """A progress line on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.on = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.on or now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        pct = f"{100 * done / total:3.0f}%" if total else ""
        sys.stderr.write(f"\r{self.label}: {pct} {human_bytes(done)} of {human_bytes(total)}\033[K")
        sys.stderr.flush()

    def done(self) -> None:
        if self.on and self.last:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def iso(ns: int) -> str:
    """Nanoseconds since the epoch as ISO-8601 UTC with microseconds."""
    return datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc).isoformat(timespec="microseconds")


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, left: int = 1) -> list[str]:
    """Aligned columns: the first `left` columns left-aligned, the rest (numbers) right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return lines


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")


def _is_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _jsonable(value: Any) -> Any:
    """`value` as JSON can hold it: bytes as UTF-8 text (else hex), keys as strings, the rest by repr."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return raw.hex()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if _is_json(value):
        return value
    return repr(value)


def _payload(entry: inspect.Entry, mode: str) -> tuple[Any, str | None]:
    """(data, data_format) of a record for output; data_format is json, repr, hex or None."""
    if mode == "none":
        return None, None
    if mode == "hex":
        return entry.payload.hex(), "hex"
    try:
        value = entry.decode()
    except QueueError:
        return entry.payload.hex(), "hex"  # pickle, custom codecs or undecodable bytes: shown, not loaded
    if mode == "repr":
        return repr(value), "repr"
    if mode == "json" or _is_json(value):
        return _jsonable(value), "json"
    return repr(value), "repr"


def _data_text(data: Any, fmt: str | None) -> str:
    if fmt is None:
        return ""
    if fmt == "json":
        return json.dumps(data, ensure_ascii=False)
    return str(data)


def record_json(entry: inspect.Entry, mode: str) -> dict[str, Any]:
    """The documented `dump --json` object of a valid record."""
    data, fmt = _payload(entry, mode)
    return {"offset": entry.offset, "timestamp": iso(entry.timestamp_ns), "timestamp_ns": entry.timestamp_ns,
            "size": entry.size, "crc_ok": True, "codec": entry.codec_name,
            "segment": os.path.basename(inspect.segment_path(".", entry.segment)), "pos": entry.pos,
            "attrs": _jsonable(entry.named_attrs()), "data": data, "data_format": fmt}


def damage_json(d: inspect.Damage) -> dict[str, Any]:
    """The documented `dump --json` object of a damaged span (or a gap)."""
    return {"offset": d.first_offset, "timestamp": None, "size": d.length, "crc_ok": False, "damaged": d.is_damage,
            "kind": d.kind, "segment": os.path.basename(inspect.segment_path(".", d.segment)), "pos": d.pos,
            "length": d.length, "first_offset": d.first_offset, "next_offset": d.next_offset, "reason": d.reason,
            "data": None}


def _damage_text(d: inspect.Damage) -> str:
    name = os.path.basename(inspect.segment_path(".", d.segment))
    if d.lost_offsets:
        offs = f"offsets {d.first_offset}..{d.next_offset - 1}"
    else:
        offs = "no offsets"
    if d.length:
        return f"{name} byte {d.pos}: {d.length} bytes, {offs} unreadable: {d.reason}"
    return f"{name} byte {d.pos}: {offs}: {d.reason}"


class _RecordPrinter:
    """Prints records and damage as aligned lines or JSON objects, one per line, streaming."""

    def __init__(self, *, as_json: bool, payload: str, offset_width: int) -> None:
        self.as_json = as_json
        self.payload = payload
        self.width = max(6, offset_width)
        self.style = _Style(sys.stdout)
        self.damage = 0

    def header(self) -> None:
        if not self.as_json:
            sys.stdout.write(f"{'OFFSET':>{self.width}}  {'TIMESTAMP':<32}  {'SIZE':>10}  CRC  DATA\n")

    def __call__(self, item: inspect.Entry | inspect.Damage) -> None:
        if isinstance(item, inspect.Damage):
            self.damage += item.is_damage
            if self.as_json:
                _print_json(damage_json(item))
            else:
                label = self.style.red("DAMAGED") if item.is_damage else self.style.yellow("NOTE")
                sys.stdout.write(f"{'-':>{self.width}}  {label} {_damage_text(item)}\n")
            return
        if self.as_json:
            _print_json(record_json(item, self.payload))
            return
        data, fmt = _payload(item, self.payload)
        sys.stdout.write(f"{item.offset:>{self.width}}  {iso(item.timestamp_ns):<32}  {human_bytes(item.size):>10}  "
                         f"{self.style.green('ok ')}  {_data_text(data, fmt)}\n")


def _confirm(question: str, yes: bool) -> None:
    """Go on only with --yes, or a 'y' typed at a terminal.

    Raises:
        UsageError: not confirmed.
    """
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{question.rstrip('?')}: refusing without --yes")
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise UsageError("not confirmed; nothing changed")


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON (one object per line) for machines")


def _add_payload(p: argparse.ArgumentParser) -> None:
    p.add_argument("--payload", choices=PAYLOAD_MODES, default="auto",
                   help="how to show payloads: auto (decoded, as JSON when it fits, else repr), json (always "
                        "JSON), repr, hex, none (default: auto)")


def _new(sub: Subparsers, name: str, help_text: str, example: str, func: Callable[[argparse.Namespace], int],
         *, path: bool = True) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if path:
        p.add_argument("path", metavar="PATH", help="the queue directory")
    p.set_defaults(func=func)
    return p


def _offset_width(path: str) -> int:
    return len(str(max(0, inspect.log_end(path) - 1)))


# --------------------------------------------------------------------------- dump


def _run_dump(args: argparse.Namespace) -> int:
    path = inspect.check_queue(args.path)
    printer = _RecordPrinter(as_json=args.json, payload=args.payload, offset_width=_offset_width(path))
    printer.header()
    shown = 0
    for item in inspect.records(path, from_offset=args.from_offset, to_offset=args.to_offset):
        if args.limit is not None and shown >= args.limit:
            break
        printer(item)
        shown += isinstance(item, inspect.Entry)
    return EXIT_OK


def _add_dump(sub: Subparsers) -> None:
    p = _new(sub, "dump", "print every record: offset, timestamp, size, CRC status and payload; damaged spans "
             "are shown as such", "pqueue dump var/orders --from 100 --limit 20 --json", _run_dump)
    p.add_argument("--from", dest="from_offset", type=_offset, default=0, metavar="OFFSET",
                   help="first offset to show (default: the oldest)")
    p.add_argument("--to", dest="to_offset", type=_offset, default=None, metavar="OFFSET",
                   help="last offset to show, included (default: the newest)")
    p.add_argument("--limit", type=_count, default=None, metavar="N", help="show at most N records")
    _add_json(p)
    _add_payload(p)


def _offset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an offset (a whole number)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; offsets count from 0")
    return value


def _count(text: str) -> int:
    value = _offset(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# --------------------------------------------------------------------------- stat


def _stat_json(st: inspect.Stat) -> dict[str, Any]:
    return {"path": st.path, "source_id": st.source_id, "segments": st.segments, "log_bytes": st.log_bytes,
            "index_bytes": st.index_bytes, "quarantine_bytes": st.quarantine_bytes, "total_bytes": st.total_bytes,
            "first_offset": st.first_offset, "last_offset": st.next_offset - 1 if st.records else None,
            "next_offset": st.next_offset, "records": st.records, "dead_letters": st.dead_letters,
            "index_error": st.index_error, "groups": [_group_json(g) for g in st.groups]}


def _group_json(g: inspect.GroupStat) -> dict[str, Any]:
    return {"name": g.name, "committed": g.committed, "lag": g.lag, "in_flight": g.in_flight,
            "waiting": g.waiting, "delayed": g.delayed, "dead": g.dead, "damaged": g.damaged}


def _group_lines(groups: Sequence[inspect.GroupStat]) -> list[str]:
    return _table(["GROUP", "COMMITTED", "LAG", "IN FLIGHT", "WAITING", "DELAYED", "DEAD", "DAMAGED"],
                  [[g.name, g.committed, g.lag, g.in_flight, g.waiting, g.delayed, g.dead, g.damaged]
                   for g in groups])


def _run_stat(args: argparse.Namespace) -> int:
    st = inspect.stat(args.path)
    if args.json:
        _print_json(_stat_json(st))
        return EXIT_OK
    offsets = (f"{st.first_offset} .. {st.next_offset - 1} ({st.records} records)" if st.first_offset is not None
               else f"none (the next record gets offset {st.next_offset})")
    rows = [
        ("queue", st.path),
        ("source id", st.source_id or "-"),
        ("segments", f"{st.segments} ({human_bytes(st.log_bytes)})"),
        ("on disk", f"{human_bytes(st.total_bytes)} (log {human_bytes(st.log_bytes)}, index "
                    f"{human_bytes(st.index_bytes)}, quarantine {human_bytes(st.quarantine_bytes)})"),
        ("offsets", offsets),
        ("dead letters", f"{st.dead_letters} in dlq/"),
    ]
    if st.index_error:
        rows.append(("index", _Style(sys.stdout).red(st.index_error)))
    for line in _table(["", ""], rows, left=2)[1:]:
        print(line)
    if st.groups:
        print()
        for line in _group_lines(st.groups):
            print(line)
    return EXIT_OK


def _add_stat(sub: Subparsers) -> None:
    p = _new(sub, "stat", "segments, bytes on disk, first and last offset, and each consumer group's committed "
             "offset, lag, in flight, waiting to retry and dead-lettered", "pqueue stat var/orders", _run_stat)
    _add_json(p)


# --------------------------------------------------------------------------- verify


def _verify_json(r: inspect.VerifyResult) -> dict[str, Any]:
    return {"ok": r.ok, "path": r.path, "segments": r.segments, "records": r.records,
            "bytes_checked": r.bytes_checked, "damaged_bytes": r.damaged_bytes,
            "damage": [damage_json(d) for d in r.damage], "notes": [damage_json(d) for d in r.notes],
            "index_problems": list(r.index_problems), "index_warnings": list(r.index_warnings)}


def _print_verify(r: inspect.VerifyResult) -> None:
    style = _Style(sys.stdout)
    print(f"checked {r.segments} segments, {r.records} records, {human_bytes(r.bytes_checked)} in {r.seconds:.2f} s")
    for d in r.damage:
        print(f"{style.red('DAMAGE')}   {_damage_text(d)}")
    for d in r.notes:
        print(f"{style.yellow('NOTE')}     {_damage_text(d)}")
    for text in r.index_problems:
        print(f"{style.red('INDEX')}    {text}")
    for text in r.index_warnings:
        print(f"{style.yellow('WARNING')}  {text}")
    if r.ok:
        print(style.green("ok: no damage found"))
    else:
        lost = sum(d.lost_offsets for d in r.damage)
        problems = len(r.damage) + len(r.index_problems)
        print(style.red(f"damaged: {problems} problem(s), {human_bytes(r.damaged_bytes)} in damaged spans, "
                        f"{lost} offsets unreadable; run `pqueue repair {r.path}`"))


def _run_verify(args: argparse.Namespace) -> int:
    path = inspect.check_queue(args.path)
    progress = _Progress("verify")
    try:
        result = inspect.verify(path, progress=progress)
    finally:
        progress.done()
    if args.json:
        _print_json(_verify_json(result))
    else:
        _print_verify(result)
    return EXIT_OK if result.ok else EXIT_DAMAGE


def _add_verify(sub: Subparsers) -> None:
    p = _new(sub, "verify", "CRC-check every record, segment header and seal, and the index; exit 0 when clean, "
             "1 when damage is found", "pqueue verify var/orders && echo clean", _run_verify)
    _add_json(p)


# --------------------------------------------------------------------------- repair


def _run_repair(args: argparse.Namespace) -> int:
    path = inspect.check_queue(args.path)
    progress = _Progress("repair: checking")
    try:
        result = admin.repair(path, dry_run=args.dry_run, progress=progress)
    finally:
        progress.done()
    if not result.actions:
        if result.before.ok:
            print("nothing to repair: no damage found")
            return EXIT_OK
        print("nothing repair can fix:")
        _print_verify(result.before)
        return EXIT_DAMAGE
    for action in result.actions:
        print(action)
    if args.dry_run:
        print("dry run: nothing was changed")
        return EXIT_OK
    after = inspect.verify(path)
    if after.ok:
        print("ok: the queue verifies clean")
        return EXIT_OK
    print("still damaged after repair:")
    _print_verify(after)
    return EXIT_DAMAGE


def _add_repair(sub: Subparsers) -> None:
    p = _new(sub, "repair", "truncate a torn tail, move damaged spans to quarantine/ and rebuild a missing or "
             "broken index; never deletes data, moves it", "pqueue repair var/orders --dry-run", _run_repair)
    p.add_argument("--dry-run", action="store_true", help="only say what would be done")


# --------------------------------------------------------------------------- put / get / tail


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where} is not valid JSON ({exc}); quote a string as '\"text\"'") from None


def _run_put(args: argparse.Namespace) -> int:
    if args.data is not None and args.data != "-":
        item = _parse_json(args.data, "DATA")
        with Queue(args.path) as q:
            print(q.put(item))
        return EXIT_OK
    offsets: list[int] = []
    with Queue(args.path) as q:
        for lineno, line in enumerate(sys.stdin, 1):
            if not line.strip():
                continue
            try:
                item = _parse_json(line, f"line {lineno}")
            except UsageError as exc:
                if offsets:
                    raise UsageError(f"{exc}; lines before it were written (offsets {offsets[0]}..{offsets[-1]})")\
                        from None
                raise
            offsets.append(q.put(item))
    if offsets:
        print(f"put {len(offsets)} records: offsets {offsets[0]}..{offsets[-1]}")
    else:
        print("put 0 records (stdin was empty)")
    return EXIT_OK


def _add_put(sub: Subparsers) -> None:
    p = _new(sub, "put", "append one JSON document, or one per line from stdin; creates the queue if missing",
             """pqueue put var/orders '{"order": 1}'\n  printf '{"a": 1}\\n{"b": 2}\\n' | pqueue put var/orders -""",
             _run_put)
    p.add_argument("data", nargs="?", metavar="DATA", help="a JSON document; '-' or nothing reads stdin")


def _run_get(args: argparse.Namespace) -> int:
    printer = _RecordPrinter(as_json=args.json, payload="auto", offset_width=6)
    got = 0
    style = _Style(sys.stdout)
    with Queue(args.path, create=False) as q:
        consumer = q.consumer(args.group)
        for _ in range(args.n):
            try:
                msg = consumer.get(timeout=args.timeout) if args.timeout else consumer.get(block=False)
            except Empty:
                break
            got += 1
            data = _jsonable(msg.data) if _is_json(msg.data) or not args.json else repr(msg.data)
            if args.json:
                _print_json({"offset": msg.offset, "timestamp": iso(int(msg.timestamp * 1e9)),
                             "attempt": msg.attempt, "group": msg.group, "data": data})
            else:
                text = json.dumps(data, ensure_ascii=False) if _is_json(msg.data) else repr(msg.data)
                sys.stdout.write(f"{msg.offset:>{printer.width}}  attempt {msg.attempt}  {text}\n")
            if not args.no_ack:
                msg.ack()
        # close() hands unacked messages back at once, uncharged: --no-ack is a peek.
    if not got:
        sys.stderr.write(f"pqueue get: {style.yellow('no message ready')} in group {args.group!r}\n")
        return EXIT_EMPTY
    return EXIT_OK


def _add_get(sub: Subparsers) -> None:
    p = _new(sub, "get", "take messages from a consumer group and ack them (exit 3 when there is none)",
             "pqueue get var/orders --group billing -n 10 --no-ack", _run_get)
    p.add_argument("--group", default="default", help="consumer group (default: default)")
    p.add_argument("-n", type=_count, default=1, metavar="N", help="take at most N messages (default: 1)")
    p.add_argument("--no-ack", action="store_true", help="hand the messages back instead of acking them")
    p.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for a message (default: 0, do not wait)")
    _add_json(p)


def _run_tail(args: argparse.Namespace) -> int:
    path = inspect.check_queue(args.path)
    start = inspect.tail_start(path, args.n)
    printer = _RecordPrinter(as_json=args.json, payload=args.payload, offset_width=_offset_width(path))
    items = inspect.follow(path, from_offset=start) if args.follow else inspect.records(path, from_offset=start)
    try:
        for item in items:
            printer(item)
            if args.follow:
                sys.stdout.flush()
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C is how `tail -f` ends
    return EXIT_OK


def _add_tail(sub: Subparsers) -> None:
    p = _new(sub, "tail", "print the last records; with -f keep printing new ones (Ctrl-C ends)",
             "pqueue tail var/orders -n 5 -f", _run_tail)
    p.add_argument("-n", type=_count, default=10, metavar="N", help="how many of the last records (default: 10)")
    p.add_argument("-f", "--follow", action="store_true", help="wait for new records and print them")
    _add_json(p)
    _add_payload(p)


# --------------------------------------------------------------------------- groups


def _run_groups(args: argparse.Namespace) -> int:
    path = inspect.check_queue(args.path)
    if args.set is not None:
        if args.to is None:
            raise UsageError("--set needs --to OFFSET")
        current = {g.name: g for g in inspect.groups(path)}
        if args.set not in current:
            raise UsageError(f"no consumer group {args.set!r} in {path}")
        inspect.locate(path, args.to)  # refuse a bad offset before asking
        old = current[args.set].committed
        change = (f"{old - args.to} messages will be delivered again" if args.to < old
                  else f"{args.to - old} messages will be skipped")
        _confirm(f"move group {args.set!r} from offset {old} to {args.to} ({change})?", args.yes)
        before, after = admin.move_group(path, args.set, args.to)
        print(f"group {args.set!r}: committed offset {before} -> {after}")
        return EXIT_OK
    groups = inspect.groups(path)
    if args.json:
        for g in groups:
            _print_json(_group_json(g))
    elif groups:
        for line in _group_lines(groups):
            print(line)
    else:
        print("no consumer groups yet")
    return EXIT_OK


def _add_groups(sub: Subparsers) -> None:
    p = _new(sub, "groups", "list consumer groups; --set GROUP --to OFFSET moves a group's committed offset "
             "(stop its consumers first)", "pqueue groups var/orders --set billing --to 1200 --yes", _run_groups)
    p.add_argument("--set", metavar="GROUP", help="the group to move")
    p.add_argument("--to", type=_offset, metavar="OFFSET", help="its new committed offset (delivered next)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_json(p)


# --------------------------------------------------------------------------- dlq


def _run_dlq(args: argparse.Namespace) -> int:
    path = inspect.check_queue(args.path)
    dlq_path = os.path.join(path, "dlq")
    if args.action == "list":
        entries = list(inspect.unacked(dlq_path)) if os.path.isdir(dlq_path) else []
        if args.json:
            for e in entries:
                obj = record_json(e, "auto")
                obj["meta"] = _jsonable(e.meta)
                _print_json(obj)
            return EXIT_OK
        if not entries:
            print("no dead letters")
            return EXIT_OK
        rows = []
        for e in entries:
            m = e.meta
            died = m.get("died_at")
            error = ": ".join(str(m[k]) for k in ("error_type", "error") if m.get(k))
            data, fmt = _payload(e, "auto")
            rows.append([e.offset, iso(int(died * 1e9)) if isinstance(died, (int, float)) else "-",
                         m.get("group", "-"), m.get("offset", "-"), m.get("attempts", "-"), m.get("reason", "-"),
                         error or "-", _data_text(data, fmt)])
        for line in _table(["DLQ OFFSET", "DIED AT", "GROUP", "OFFSET", "ATTEMPTS", "REASON", "ERROR", "DATA"],
                           rows, left=0):
            print(line)
        return EXIT_OK
    if args.action == "replay":
        n = admin.replay_dead_letters(path, limit=args.limit,
                                      on_each=lambda old, new: print(f"dead letter {old} -> offset {new}"))
        print(f"replayed {n} dead letters")
        return EXIT_OK
    count = sum(1 for _ in inspect.unacked(dlq_path)) if os.path.isdir(dlq_path) else 0
    _confirm(f"purge {count} dead letters of {path} for good?", args.yes)
    print(f"purged {admin.purge_dead_letters(path) if count else 0} dead letters")
    return EXIT_OK


def _add_dlq(sub: Subparsers) -> None:
    p = _new(sub, "dlq", "list the dead-letter queue, replay it into the queue (original payloads) or purge it",
             "pqueue dlq var/orders replay --limit 10", _run_dlq)
    p.add_argument("action", choices=("list", "replay", "purge"), help="what to do")
    p.add_argument("--limit", type=_count, default=None, metavar="N", help="replay: at most N, oldest first")
    p.add_argument("--yes", action="store_true", help="purge: do not ask for confirmation")
    _add_json(p)


# --------------------------------------------------------------------------- demo


def _run_demo(args: argparse.Namespace) -> int:
    try:
        module = importlib.import_module("pqueue.demo")
    except ImportError as exc:
        raise QueueError(f"the demo is not available in this installation ({exc})") from exc
    run: Callable[[list[str] | None], int] = module.main
    return run(list(args.args))


def _add_demo(sub: Subparsers) -> None:
    p = _new(sub, "demo", "run the order-processing demo (crash and restart included) in DIR",
             "pqueue demo /tmp/pqueue-demo", _run_demo, path=False)
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="DIR", help="where to run it (and demo options)")


def _add_forward(sub: Subparsers) -> None:
    from .forward_cli import add_forward_parser  # the sinks import their client libraries lazily

    p = add_forward_parser(sub)
    p.set_defaults(func=lambda args: args.handler(args))


# --------------------------------------------------------------------------- worker


def _queue_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, true, null), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. fsync=always)")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _run_worker(args: argparse.Namespace) -> int:
    import logging

    from .task_runtime import load_app

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The console script does not put the working directory on sys.path (python -m does):
    # `pqueue worker myapp:app` must find ./myapp.py like celery's and rq's workers do.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        app = load_app(args.app)
        if args.queue_option:
            app.configure(**dict(args.queue_option))
    except (LookupError, TypeError, RuntimeError) as exc:
        raise UsageError(str(exc)) from exc
    if not app.tasks:
        raise UsageError(f"{args.app} registers no tasks; nothing to run")
    try:
        app.run(workers=args.workers, max_workers=args.max_workers, scheduler=not args.no_scheduler,
                stop_timeout=args.stop_timeout)
    finally:
        app.close()
    return EXIT_OK


def _add_worker(sub: Subparsers) -> None:
    p = _new(sub, "worker", "run the tasks of a pqueue.App (MODULE:APP) until SIGTERM/SIGINT, with its periodic "
             "scheduler", "pqueue worker myapp:app --workers 4 --queue-option fsync=always", _run_worker, path=False)
    p.add_argument("app", metavar="MODULE:APP", help="the module to import and the App in it (default attribute: app)")
    p.add_argument("--workers", type=_count, default=4, metavar="N", help="worker threads (default: 4)")
    p.add_argument("--max-workers", type=_count, default=None, metavar="N",
                   help="scale up to N threads while there is a backlog (default: --workers)")
    p.add_argument("--queue-option", type=_queue_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a pqueue.Queue option over the app's own (repeatable; VALUE is JSON or a string)")
    p.add_argument("--no-scheduler", action="store_true", help="do not enqueue periodic tasks from this process")
    p.add_argument("--stop-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, in-flight tasks get this long (default: 30)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   help="log level on stderr (default: INFO: one line per task state change)")


COMMANDS: list[Callable[[Subparsers], None]] = [
    _add_dump, _add_stat, _add_verify, _add_repair, _add_put, _add_get, _add_tail, _add_groups, _add_dlq, _add_demo,
    _add_forward, _add_worker,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pqueue", description="Inspect, fix and feed pqueue queue directories.",
                     epilog="exit codes: 0 ok; 1 damage found or the operation failed; 2 usage error or not a "
                            "queue; 3 nothing to get; 130 interrupted")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `pqueue` command line; return the exit code."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    prog = f"pqueue {args.command}"
    try:
        return func(args)
    except (NotAQueueError, UsageError) as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_USAGE
    except (QueueError, ValueError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            # The reader went away (`pqueue dump | head`): not an error; keep Python from
            # complaining about the flush of stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return EXIT_DAMAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return EXIT_INTERRUPTED
