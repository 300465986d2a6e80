"""Crash torture: producers and consumers on one queue, SIGKILLed at random, then a checker.

    python tools/torture.py --duration 60 [--seed N] [--dir D] [--producers 2] [--consumers 2]

Every 50-500 ms one worker process (now and then all of them at once) is SIGKILLed and a new
one takes its place, each opening the queue with a randomly chosen fsync mode ("always",
"never", an interval). Producers put payloads whose bytes are derived from a unique id and
log each put that returned; consumers check every delivered payload, log it, ack it, and log
a flush marker each time ``q.flush()`` has made their acks durable. Odd consumer slots run a
``pqueue.ConsumerPool`` (two worker threads) instead of a get/ack loop, when the pool exists. Ledgers are plain files
outside the queue written with ``write()``, which SIGKILL cannot undo.

When the time is up the killing stops, the consumers drain the queue, and the checker asserts
(a kill -9 leaves the page cache intact, so this checks promises 1, 3, 4 and 5, not fsync;
power loss is tests/test_powerloss.py's job):

* lost: no put that returned is missing from the log (same id at the same offset), and every
  one was handled at least once;
* redelivered after a durable ack: 0;
* corrupt: no delivery whose payload does not match its id, or whose id is not the one the
  put of that offset returned for;
* and it reports kills, messages, duplicates (redeliveries before a durable ack, allowed by
  at-least-once) and the slowest recovery (a killed worker's replacement: open + first op).

Exit status 0 when every check holds, 1 otherwise. The last line is ``TORTURE {json}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

FSYNC_MODES = ["always", "never", "20ms", "50ms/8", "interval"]
SEGMENT_BYTES = 64 << 10  # 64 KiB: rolls and retention deletes happen every few hundred puts
KILL_MIN_SECONDS = 0.05
KILL_MAX_SECONDS = 0.5
KILL_ALL_PROBABILITY = 0.05  # now and then the whole "application" dies at once
DRAIN_TIMEOUT_SECONDS = 120.0
FLUSH_EVERY_SECONDS = 0.05  # consumers make their acks durable (and log it) this often


def body_for(ident: str) -> str:
    """The payload body of `ident`: any corruption or mix-up shows as a mismatch."""
    digest = hashlib.blake2b(ident.encode(), digest_size=16).hexdigest()
    return digest * (1 + int(digest[:3], 16) % 40)  # 32..1280 bytes


# ============================================================================ workers


def _has_pool() -> bool:
    import pqueue

    return hasattr(pqueue, "ConsumerPool")


def _open_ledger(ledger_dir: str, name: str) -> int:
    return os.open(os.path.join(ledger_dir, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def _open_role(qpath: str, ledger_dir: str, ledger: str, seed: int) -> tuple[Any, int, str, random.Random, float]:
    """What every role does first: pick its fsync mode from `seed`, open its ledger, open the
    queue (timed from here: the first report says how long recovery took)."""
    import pqueue

    started = time.monotonic()
    rng = random.Random(seed)
    fsync = rng.choice(FSYNC_MODES)
    fd = _open_ledger(ledger_dir, ledger)
    return pqueue.Queue(qpath, fsync=fsync, segment_bytes=SEGMENT_BYTES), fd, fsync, rng, started


def _note_delivery(fd: int, m: Any, now: float) -> None:
    """Ledger a delivery: H (handled: its id, offset, attempt, time) or C (corrupt: what came)."""
    data = m.data
    ok = (isinstance(data, dict) and set(data) == {"id", "body"} and isinstance(data["id"], str)
          and " " not in data["id"] and data["body"] == body_for(data["id"]))
    if ok:
        os.write(fd, f"H {data['id']} {m.offset} {m.attempt} {now:.6f}\n".encode())
    else:
        os.write(fd, f"C {m.offset} {json.dumps(repr(data)[:200])}\n".encode())


def _producer(qpath: str, ledger_dir: str, slot: int, gen: int, seed: int) -> None:
    q, fd, fsync, rng, started = _open_role(qpath, ledger_dir, f"p{slot}-{gen}.log", seed)
    n = 0
    first = True
    while True:
        if rng.random() < 0.1:
            ids = [f"{slot}.{gen}.{n + k}" for k in range(rng.randint(2, 10))]
            n += len(ids)
            offs = q.put_many([{"id": i, "body": body_for(i)} for i in ids])
            now = time.monotonic()
            os.write(fd, "".join(f"P {i} {o} {now:.6f}\n" for i, o in zip(ids, offs, strict=True)).encode())
        else:
            ident = f"{slot}.{gen}.{n}"
            n += 1
            off = q.put({"id": ident, "body": body_for(ident)})
            os.write(fd, f"P {ident} {off} {time.monotonic():.6f}\n".encode())
        if first:
            first = False
            os.write(fd, f"R produce {time.monotonic() - started:.6f} {fsync}\n".encode())
        time.sleep(rng.random() * 0.002)  # ~1000 puts/s per producer: the drain stays short


_stop = False


def _on_term(signum: int, frame: Any) -> None:
    global _stop
    _stop = True


def _consumer(qpath: str, ledger_dir: str, slot: int, gen: int, seed: int, *, drain: bool = False) -> None:
    import pqueue

    signal.signal(signal.SIGTERM, _on_term)
    q, fd, fsync, rng, started = _open_role(qpath, ledger_dir, f"c{slot}-{gen}.log", seed)
    first = True
    last_flush = time.monotonic()
    unflushed = 0
    idle_since = 0.0
    while not _stop:
        try:
            m = q.get(timeout=0.2)
        except pqueue.Empty:
            if first:
                first = False
                os.write(fd, f"R consume {time.monotonic() - started:.6f} {fsync}\n".encode())
            if drain:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 1.0:
                    break
            m = None
        now = time.monotonic()
        if m is not None:
            idle_since = 0.0
            if first:
                first = False
                os.write(fd, f"R consume {now - started:.6f} {fsync}\n".encode())
            _note_delivery(fd, m, now)
            if rng.random() < 0.01:
                time.sleep(rng.random() * 0.05)  # a slow handler now and then
            q.ack(m)
            unflushed += 1
        if unflushed and (now - last_flush > FLUSH_EVERY_SECONDS or _stop):
            q.flush()
            os.write(fd, f"F {time.monotonic():.6f}\n".encode())
            last_flush = time.monotonic()
            unflushed = 0
    q.flush()
    os.write(fd, f"F {time.monotonic():.6f}\n".encode())
    q.close()


def _pool_consumer(qpath: str, ledger_dir: str, slot: int, gen: int, seed: int, *, drain: bool = False) -> None:
    """A consumer process running `pqueue.ConsumerPool` (2 worker threads).

    The pool acks after the handler returns, in its own batches, so this process cannot tell
    when an ack became durable: it writes the flush marker only after `stop()` and `close()`.
    Its deliveries count for "handled at least once", "corrupt" and duplicates; the
    "redelivered after a durable ack" check rests on the plain consumers.
    """
    import pqueue

    signal.signal(signal.SIGTERM, _on_term)
    q, fd, fsync, rng, started = _open_role(qpath, ledger_dir, f"c{slot}-{gen}.log", seed)
    last = [time.monotonic()]

    def handler(m: Any) -> None:
        now = time.monotonic()
        last[0] = now
        _note_delivery(fd, m, now)

    # A high max_attempts: a message whose holders keep being SIGKILLed must not end in the
    # dead-letter queue here (the checker wants every message handled in the main group).
    pool = pqueue.ConsumerPool(q, handler, workers=2, max_attempts=1_000_000)
    pool.start()
    os.write(fd, f"R pool {time.monotonic() - started:.6f} {fsync}\n".encode())
    while not _stop:
        time.sleep(0.05)
        if drain and time.monotonic() - last[0] > 1.5 and q.qsize() == 0:
            break
    pool.stop(timeout=10)
    q.close()
    os.write(fd, f"F {time.monotonic():.6f}\n".encode())


def _spawn(role: str, qpath: str, ledger_dir: str, slot: int, gen: int, seed: int, drain: bool = False) -> int:
    pid = os.fork()
    if pid:
        return pid
    # The child: never return into the supervisor's code.
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, _on_term)
        if role == "p":
            _producer(qpath, ledger_dir, slot, gen, seed)
        elif role == "c" and slot % 2 == 1 and _has_pool():
            _pool_consumer(qpath, ledger_dir, slot, gen, seed, drain=drain)
        else:
            _consumer(qpath, ledger_dir, slot, gen, seed, drain=drain)
    except BaseException as exc:  # report, then die: the supervisor counts worker errors
        try:
            fd = _open_ledger(ledger_dir, f"{role}{slot}-{gen}.log")
            import traceback

            frames = [f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}"
                      for f in traceback.extract_tb(exc.__traceback__) if "pqueue" in f.filename][-4:]
            os.write(fd, f"E {type(exc).__name__} {json.dumps(str(exc)[:300])} at {'<'.join(frames[::-1])}\n"
                     .encode())
        except OSError:
            pass
        code = 3
    os._exit(code)


# ============================================================================ supervisor


@dataclass
class Figures:
    duration: float = 0.0
    kills: int = 0
    kill_all: int = 0
    spawned: int = 0
    messages: int = 0  # puts that returned (in producer ledgers)
    handled: int = 0  # deliveries logged by consumers
    distinct_handled: int = 0
    duplicates: int = 0
    lost: int = 0
    unhandled: int = 0
    redelivered_after_durable_ack: int = 0
    corrupt: int = 0
    worker_errors: int = 0
    offsets_reused: int = 0  # one offset returned to two different puts
    slowest_recovery: float = 0.0
    slowest_recovery_fsync: str = ""
    verify_ok: bool = False
    problems: list[str] = field(default_factory=list)


def run(duration: float, seed: int, workdir: str, producers: int, consumers: int, out: Any = sys.stdout) -> Figures:
    rng = random.Random(seed)
    qpath = os.path.join(workdir, "q")
    ledger_dir = os.path.join(workdir, "ledgers")
    os.makedirs(ledger_dir, exist_ok=True)
    figures = Figures()
    gens: dict[tuple[str, int], int] = defaultdict(int)
    live: dict[int, tuple[str, int]] = {}  # pid -> (role, slot)
    exits: list[tuple[str, int, int]] = []

    def spawn(role: str, slot: int, drain: bool = False) -> None:
        gens[role, slot] += 1
        pid = _spawn(role, qpath, ledger_dir, slot, gens[role, slot], rng.randrange(1 << 30), drain)
        live[pid] = (role, slot)
        figures.spawned += 1

    def reap(block: bool = False) -> None:
        for pid in list(live):
            got, status = os.waitpid(pid, 0 if block else os.WNOHANG)
            if got:
                role, slot = live.pop(pid)
                if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
                    exits.append((role, slot, status))

    # Create the queue once before the workers race to do it (creation itself is tested by
    # test_queue/test_powerloss; here the interest is the steady state).
    import pqueue

    pqueue.Queue(qpath, segment_bytes=SEGMENT_BYTES).close()
    for slot in range(producers):
        spawn("p", slot)
    for slot in range(consumers):
        spawn("c", slot)
    started = time.monotonic()
    next_report = started + 10
    while time.monotonic() - started < duration:
        time.sleep(rng.uniform(KILL_MIN_SECONDS, KILL_MAX_SECONDS))
        reap()
        for role, slot, status in exits:
            _note_exit(figures, role, slot, status)
            spawn(role, slot)
        exits.clear()
        victims = list(live) if rng.random() < KILL_ALL_PROBABILITY else [rng.choice(list(live))]
        if len(victims) > 1:
            figures.kill_all += 1
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            role, slot = live.pop(pid)
            figures.kills += 1
            spawn(role, slot)
        if time.monotonic() > next_report:
            next_report += 10
            print(f"  {time.monotonic() - started:5.0f} s: {figures.kills} kills", file=out, flush=True)
    figures.duration = time.monotonic() - started

    # Stop producing (a last SIGKILL), then let fresh consumers drain everything.
    for pid, (role, _slot) in list(live.items()):
        if role == "p":
            os.kill(pid, signal.SIGKILL)
            figures.kills += 1
    for pid, (role, _slot) in list(live.items()):
        if role == "p":
            os.waitpid(pid, 0)
            live.pop(pid)
    for pid in list(live):
        os.kill(pid, signal.SIGTERM)  # graceful: flush acks, hand back leases
    deadline = time.monotonic() + 30
    while live and time.monotonic() < deadline:
        reap()
        time.sleep(0.05)
    for pid in list(live):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        live.pop(pid)
    for role, slot, status in exits:
        _note_exit(figures, role, slot, status)
    exits.clear()
    drained = time.monotonic()
    for slot in range(consumers):
        spawn("c", 100 + slot, drain=True)
    while live and time.monotonic() - drained < DRAIN_TIMEOUT_SECONDS:
        reap()
        time.sleep(0.05)
    for pid in list(live):
        figures.problems.append("a draining consumer did not finish in time")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        live.pop(pid)
    for role, slot, status in exits:
        _note_exit(figures, role, slot, status)
    check(qpath, ledger_dir, figures)
    return figures


def _note_exit(figures: Figures, role: str, slot: int, status: int) -> None:
    """A worker ended by itself: 0 is a graceful stop, 3 an error it logged (an E line), and
    SIGTERM one that was stopped at the end before it had installed its handler."""
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 3, -signal.SIGTERM):
        figures.worker_errors += 1
        figures.problems.append(f"worker {role}{slot} ended with {code}")


def check(qpath: str, ledger_dir: str, figures: Figures) -> None:
    """Read the ledgers and the log; fill in the figures and the problems found."""
    import pqueue
    import pqueue.inspect

    puts: dict[int, str] = {}  # offset -> id of a put that returned
    # (offset, id) -> [(delivered at, its ack durable at)]; keyed by id too, so that a reused
    # offset (a bug of its own, counted as offsets_reused) does not pass for a redelivery.
    deliveries: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    handled_ids: dict[str, int] = defaultdict(int)
    for name in sorted(os.listdir(ledger_dir)):
        with open(os.path.join(ledger_dir, name), "rb") as f:
            lines = f.read().decode(errors="replace").split("\n")
        lines.pop()  # the text after the last newline: empty, or a line cut by SIGKILL
        pending: list[tuple[tuple[int, str], float]] = []
        for line in lines:
            kind, *rest = line.split(" ")
            if kind == "P":
                ident, off = rest[0], int(rest[1])
                if off in puts and puts[off] != ident:
                    figures.offsets_reused += 1
                    if figures.offsets_reused <= 5:
                        figures.problems.append(f"offset {off} returned to two puts: {puts[off]} and {ident}")
                puts[off] = ident
            elif kind == "H":
                ident, off, t = rest[0], int(rest[1]), float(rest[3])
                handled_ids[ident] += 1
                figures.handled += 1
                pending.append(((off, ident), t))
            elif kind == "F":
                t = float(rest[0])
                for key, td in pending:
                    deliveries[key].append((td, t))
                pending = []
            elif kind == "C":
                figures.corrupt += 1
                figures.problems.append(f"corrupt delivery at offset {rest[0]}: {' '.join(rest[1:])}")
            elif kind == "R":
                took = float(rest[1])
                if took > figures.slowest_recovery:
                    figures.slowest_recovery, figures.slowest_recovery_fsync = took, rest[2]
            elif kind == "E":
                figures.worker_errors += 1
                figures.problems.append(f"{name}: {' '.join(rest)}")
        for key, td in pending:
            deliveries[key].append((td, float("inf")))  # never known to be durable
    figures.messages = len(puts)
    figures.distinct_handled = len(handled_ids)
    figures.duplicates = figures.handled - len(handled_ids)

    # Nothing redelivered after its ack was durable.
    for (off, _ident), seen in deliveries.items():
        seen.sort()
        first_durable = min(d for _t, d in seen)
        late = [t for t, _d in seen if t > first_durable]
        if late:
            figures.redelivered_after_durable_ack += len(late)
            figures.problems.append(f"offset {off} delivered again {len(late)}x after its ack was durable")

    # The log still holds every returned put at its offset (retention may have deleted
    # consumed segments: those puts are checked through the consumers' ledgers instead).
    on_disk: dict[int, str] = {}
    for item in pqueue.inspect.records(qpath):
        if isinstance(item, pqueue.inspect.Entry):
            data = item.decode()
            on_disk[item.offset] = data.get("id", "?") if isinstance(data, dict) else "?"
    for off, ident in puts.items():
        if off in on_disk and on_disk[off] != ident:
            figures.corrupt += 1
            figures.problems.append(f"offset {off} holds {on_disk[off]}, its put returned for {ident}")
        if handled_ids.get(ident, 0) == 0:
            if off in on_disk:
                figures.unhandled += 1
            else:
                figures.lost += 1
            if len(figures.problems) < 50:
                figures.problems.append(f"put {ident} at offset {off} was never handled"
                                        f"{'' if off in on_disk else ' and is gone from the log'}")
    result = pqueue.inspect.verify(qpath)
    figures.verify_ok = result.ok
    if not result.ok:
        figures.problems.append(f"pqueue.inspect.verify found damage: {result}")
    with pqueue.Queue(qpath, segment_bytes=SEGMENT_BYTES) as q:
        left = q.qsize()
    if left:
        figures.problems.append(f"{left} messages still unacked after the drain")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of killing (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--dir", default=None, help="work directory (default: a new temporary one, removed "
                                                    "when every check passes)")
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--consumers", type=int, default=2)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    workdir = args.dir or tempfile.mkdtemp(prefix="pqueue-torture-")
    os.makedirs(workdir, exist_ok=True)
    print(f"torture: {args.duration:g} s, seed {seed}, {args.producers} producers, {args.consumers} consumers, "
          f"in {workdir}", flush=True)
    figures = run(args.duration, seed, workdir, args.producers, args.consumers)
    ok = (not figures.problems and figures.lost == 0 and figures.offsets_reused == 0 and figures.corrupt == 0
          and figures.redelivered_after_durable_ack == 0 and figures.unhandled == 0 and figures.worker_errors == 0)
    print(f"kills {figures.kills} (all at once {figures.kill_all}), messages {figures.messages}, "
          f"handled {figures.handled}, duplicates {figures.duplicates}, lost {figures.lost}, "
          f"unhandled {figures.unhandled}, redelivered after durable ack {figures.redelivered_after_durable_ack}, "
          f"corrupt {figures.corrupt}, offsets reused {figures.offsets_reused}, worker errors "
          f"{figures.worker_errors}, slowest recovery {figures.slowest_recovery * 1000:.1f} ms "
          f"(fsync={figures.slowest_recovery_fsync})")
    for problem in figures.problems[:30]:
        print(f"PROBLEM: {problem}")
    summary = {"ok": ok, "seed": seed, "dir": workdir, **figures.__dict__}
    summary["problems"] = figures.problems[:30]
    print("TORTURE " + json.dumps(summary), flush=True)
    if ok and args.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
