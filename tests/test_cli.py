"""The `pqueue` command line, run as subprocesses (`python -m pqueue ...`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from helpers import drain, flip

import pqueue
import pqueue.inspect as pi
from pqueue import cli

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00"
ROOT = str(Path(__file__).resolve().parent.parent)


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=ROOT, NO_COLOR="1")
    return subprocess.run([sys.executable, "-m", "pqueue", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=60)


def make(path: Path, items: list[object], **kwargs: object) -> None:
    with pqueue.Queue(path, **kwargs) as q:  # type: ignore[arg-type]
        for item in items:
            q.put(item)


def tree(path: Path) -> list[tuple[str, int, int]]:
    out = []
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out.append((os.path.join(root, name), st.st_size, st.st_mtime_ns))
    return sorted(out)


def test_put_then_dump_json_has_the_documented_fields(qpath: Path) -> None:
    """`put` creates the queue; `dump --json` prints one object per record with the stable fields."""
    first = run("put", str(qpath), '{"order": 1}')
    assert (first.returncode, first.stdout, first.stderr) == (0, "0\n", "")
    more = run("put", str(qpath), "-", stdin='{"a": 1}\n\n"text"\n[1, 2]\n')
    assert (more.returncode, more.stdout) == (0, "put 3 records: offsets 1..3\n")
    dump = run("dump", str(qpath), "--json")
    assert dump.returncode == 0 and dump.stderr == ""
    rows = [json.loads(line) for line in dump.stdout.splitlines()]
    assert [r["data"] for r in rows] == [{"order": 1}, {"a": 1}, "text", [1, 2]]
    assert [r["offset"] for r in rows] == [0, 1, 2, 3]
    assert all(re.fullmatch(ISO, r["timestamp"]) and r["crc_ok"] is True for r in rows)
    # {"order": 1} is 8 msgpack bytes; it sits right after the 32-byte segment header.
    assert {k: rows[0][k] for k in ("size", "codec", "segment", "pos", "attrs", "data_format")} == {
        "size": 8, "codec": "msgpack", "segment": "00000000000000000000.seg", "pos": 32, "attrs": {},
        "data_format": "json"}


def test_dump_human_output_is_aligned_with_payload_modes(qpath: Path) -> None:
    """Human dump: a header, then one aligned line per record; --payload hex shows raw bytes."""
    make(qpath, [{"n": 1}, b"\x00raw"])
    out = run("dump", str(qpath)).stdout.splitlines()
    assert out[0] == "OFFSET  TIMESTAMP                               SIZE  CRC  DATA"
    assert re.fullmatch(rf"     0  {ISO}         4 B  ok   \{{\"n\": 1\}}", out[1])
    assert re.fullmatch(rf"     1  {ISO}         6 B  ok   b'\\x00raw'", out[2])
    hexed = run("dump", str(qpath), "--payload", "hex", "--from", "1").stdout.splitlines()
    assert hexed[1].endswith("  ok   c40400726177")  # msgpack bin8: c4, length 4, then the bytes


def test_damaged_record_is_shown_and_verify_exits_1(qpath: Path) -> None:
    """A flipped byte: dump shows the span as DAMAGED, verify exits 1 and says where and how much."""
    make(qpath, [{"n": 0}, {"n": 1}, {"n": 2}])
    # Each record is 28 header + 4 payload bytes: record 1 is bytes 64..95 of the segment.
    flip(pi.segment_path(qpath, 0), 64 + 28)
    dump = run("dump", str(qpath))
    assert dump.returncode == 0
    assert dump.stdout.splitlines()[2] == ("     -  DAMAGED 00000000000000000000.seg byte 64: 32 bytes, offsets 1..1 "
                                           "unreadable: CRC32C mismatch")
    verify = run("verify", str(qpath))
    assert verify.returncode == 1
    assert "DAMAGE   00000000000000000000.seg byte 64: 32 bytes, offsets 1..1 unreadable: CRC32C mismatch" \
        in verify.stdout
    assert verify.stdout.splitlines()[-1] == (f"damaged: 1 problem(s), 32 B in damaged spans, 1 offsets unreadable; "
                                              f"run `pqueue repair {qpath}`")
    report = json.loads(run("verify", str(qpath), "--json").stdout)
    assert report["ok"] is False
    assert {k: report["damage"][0][k] for k in ("pos", "length", "first_offset", "next_offset", "kind")} == {
        "pos": 64, "length": 32, "first_offset": 1, "next_offset": 2, "kind": "rot"}


def test_repair_moves_damage_to_quarantine_and_keeps_the_rest(qpath: Path) -> None:
    """repair splits a damaged sealed segment and cuts a torn tail; nothing is deleted."""
    make(qpath, [{"n": i} for i in range(300)], segment_bytes=4096)
    first = next(e for e in pi.records(qpath, from_offset=5) if isinstance(e, pi.Entry))
    flip(pi.segment_path(qpath, 0), first.pos + 28)  # record 5 of the (sealed) first segment
    newest = pi._segments(str(qpath))[-1]
    seg = pi.segment_path(qpath, newest)
    os.truncate(seg, os.path.getsize(seg) - 3)  # the last record, 3 bytes short: a torn tail
    dry = run("repair", str(qpath), "--dry-run")
    assert dry.returncode == 0 and dry.stdout.splitlines()[-1] == "dry run: nothing was changed"
    assert not (qpath / "quarantine").exists()
    fixed = run("repair", str(qpath))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert fixed.stdout.splitlines()[-1] == "ok: the queue verifies clean"
    assert (qpath / "write.lock").read_bytes()[8:] == bytes(28)  # the writers' left end is void
    kept = sorted(os.listdir(qpath / "quarantine"))
    assert kept[0].startswith("00000000000000000000.seg.") and kept[1].endswith(".tail")
    with pqueue.Queue(qpath) as q:
        got = [m.data["n"] for m in drain(q)]
    assert got == [i for i in range(299) if i != 5]  # only the damaged record and the torn one are gone
    assert run("verify", str(qpath)).returncode == 0


def test_repair_rebuilds_an_unreadable_index(qpath: Path) -> None:
    """An index with garbage is moved to quarantine/ and a new one built; verify is clean after."""
    make(qpath, [1, 2])
    with open(qpath / "index" / "data.mdb", "r+b") as f:
        f.write(b"\xff" * 4096)
    assert run("verify", str(qpath)).returncode == 1
    fixed = run("repair", str(qpath))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert any(name.startswith("index-") for name in os.listdir(qpath / "quarantine"))
    assert run("verify", str(qpath)).returncode == 0


def test_not_a_queue_exits_2_and_is_left_untouched(tmp_path: Path) -> None:
    """Every command but put refuses a non-queue with one line on stderr, exit 2, no change."""
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("milk")
    before = tree(tmp_path)
    for args in (["dump"], ["stat"], ["verify"], ["repair"], ["get"], ["put", "--", "1"]):
        res = run(args[0], str(other), *args[1:])
        assert res.returncode == 2, args
        assert res.stderr.count("\n") == 1 and "not a pqueue directory" in res.stderr and res.stdout == ""
    missing = run("stat", str(tmp_path / "nope"))
    assert (missing.returncode, missing.stderr) == (2, f"pqueue stat: error: {tmp_path / 'nope'} does not exist\n")
    assert tree(tmp_path) == before


def test_usage_errors_are_one_line_exit_2(qpath: Path) -> None:
    """Bad arguments and bad JSON: exit 2 with a single clear line on stderr."""
    res = run("dump")
    assert res.returncode == 2
    assert res.stderr == ("pqueue dump: error: the following arguments are required: PATH "
                          "(see `pqueue dump --help`)\n")
    bad = run("put", str(qpath), "{oops")
    assert bad.returncode == 2 and bad.stderr.startswith("pqueue put: error: DATA is not valid JSON")
    assert bad.stderr.count("\n") == 1


def test_get_acks_no_ack_hands_back_and_empty_exits_3(qpath: Path) -> None:
    """get acks by default; --no-ack gives the message back at once; an empty group exits 3."""
    make(qpath, [{"job": 1}, {"job": 2}])
    peek = run("get", str(qpath), "--no-ack", "--json")
    assert peek.returncode == 0
    assert {k: v for k, v in json.loads(peek.stdout).items() if k != "timestamp"} == {
        "offset": 0, "attempt": 1, "group": "default", "data": {"job": 1}}
    taken = run("get", str(qpath), "-n", "5")
    assert taken.returncode == 0
    assert taken.stdout == '     0  attempt 1  {"job": 1}\n     1  attempt 1  {"job": 2}\n'
    empty = run("get", str(qpath))
    assert (empty.returncode, empty.stdout, empty.stderr) == (3, "", "pqueue get: no message ready in group "
                                                                     "'default'\n")
    st = json.loads(run("stat", str(qpath), "--json").stdout)
    assert (st["first_offset"], st["last_offset"], st["records"]) == (0, 1, 2)
    assert st["groups"] == [{"name": "default", "committed": 2, "lag": 0, "in_flight": 0, "waiting": 0,
                             "delayed": 0, "dead": 0, "damaged": 0}]


def test_groups_set_needs_confirmation_and_redelivers(qpath: Path) -> None:
    """Moving a group's offset is refused without --yes and redelivers from there with it."""
    make(qpath, ["a", "b", "c"])
    assert run("get", str(qpath), "-n", "3").returncode == 0
    refused = run("groups", str(qpath), "--set", "default", "--to", "1")
    assert refused.returncode == 2 and "refusing without --yes" in refused.stderr
    moved = run("groups", str(qpath), "--set", "default", "--to", "1", "--yes")
    assert (moved.returncode, moved.stdout) == (0, "group 'default': committed offset 3 -> 1\n")
    listing = run("groups", str(qpath)).stdout.splitlines()
    assert listing == ["GROUP    COMMITTED  LAG  IN FLIGHT  WAITING  DELAYED  DEAD  DAMAGED",
                       "default          1    2          0        0        0     0        0"]
    again = run("get", str(qpath), "-n", "5")
    assert again.stdout == '     1  attempt 1  "b"\n     2  attempt 1  "c"\n'


def test_dlq_list_replay_and_purge(qpath: Path) -> None:
    """Dead letters are listed with why they died, replayed with their payload, purged with --yes."""
    with pqueue.Queue(qpath) as q:
        q.put_many([{"bad": 1}, {"bad": 2}])
        for _ in range(2):
            q.dead_letter(q.get(), reason="failed", error=ValueError("boom"))
    listing = run("dlq", str(qpath), "list", "--json")
    rows = [json.loads(line) for line in listing.stdout.splitlines()]
    assert [(r["data"], r["meta"]["offset"], r["meta"]["reason"], r["meta"]["error"]) for r in rows] == [
        ({"bad": 1}, 0, "failed", "boom"), ({"bad": 2}, 1, "failed", "boom")]
    replay = run("dlq", str(qpath), "replay", "--limit", "1")
    assert replay.stdout == "dead letter 0 -> offset 2\nreplayed 1 dead letters\n"
    assert run("get", str(qpath), "--json").stdout.count('"data": {"bad": 1}') == 1
    assert run("dlq", str(qpath), "purge").returncode == 2  # no --yes and no terminal to ask
    purged = run("dlq", str(qpath), "purge", "--yes")
    assert purged.stdout == "purged 1 dead letters\n"
    assert run("dlq", str(qpath), "list").stdout == "no dead letters\n"


def test_dump_and_stat_on_a_live_queue(qpath: Path) -> None:
    """dump and stat while another process keeps appending: no damage, consecutive offsets, exit 0."""
    make(qpath, [0])
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time, pqueue
        with pqueue.Queue({str(qpath)!r}, segment_bytes=8192) as q:
            print("ready", flush=True)
            deadline = time.monotonic() + 3
            i = 1
            while time.monotonic() < deadline:
                q.put({{"n": i, "pad": "x" * 50}})
                i += 1
                if i % 50 == 0:
                    time.sleep(0.001)
    """)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    with writer:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        for _ in range(2):
            dump = run("dump", str(qpath), "--json", "--payload", "none")
            assert dump.returncode == 0, dump.stderr
            rows = [json.loads(line) for line in dump.stdout.splitlines()]
            assert all(r["crc_ok"] for r in rows)
            assert [r["offset"] for r in rows] == list(range(len(rows)))
            stat = run("stat", str(qpath), "--json")
            assert stat.returncode == 0 and json.loads(stat.stdout)["index_error"] is None
        assert writer.wait(timeout=30) == 0
    assert pi.verify(qpath).ok


def test_tail_prints_last_records_and_follows(qpath: Path) -> None:
    """tail -n shows the newest records; tail -f prints new ones and ends cleanly on Ctrl-C."""
    make(qpath, ["a", "b", "c"])
    last = run("tail", str(qpath), "-n", "2", "--payload", "repr").stdout.splitlines()
    assert [line.rsplit("  ", 1)[1] for line in last] == ["'b'", "'c'"]
    env = dict(os.environ, PYTHONPATH=ROOT, NO_COLOR="1")
    follower = subprocess.Popen([sys.executable, "-m", "pqueue", "tail", str(qpath), "-n", "1", "-f", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with follower:
        try:
            assert follower.stdout is not None
            assert json.loads(follower.stdout.readline())["data"] == "c"
            make(qpath, ["d"])
            assert json.loads(follower.stdout.readline())["data"] == "d"
        finally:
            follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=10) == 0
        assert follower.stderr is not None and follower.stderr.read() == ""


def test_every_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    """`pqueue COMMAND --help` exits 0 and shows an example."""
    for name in ("dump", "stat", "verify", "repair", "put", "get", "tail", "groups", "dlq", "demo"):
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        assert "example:\n  pqueue " in capsys.readouterr().out, name


def test_demo_subcommand_calls_pqueue_demo_main(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pqueue demo DIR` hands its arguments to pqueue.demo.main and returns its exit code."""
    calls: list[list[str] | None] = []
    fake = types.ModuleType("pqueue.demo")

    def main(argv: list[str] | None = None) -> int:
        calls.append(argv)
        return 7

    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pqueue.demo", fake)
    assert cli.main(["demo", "/tmp/somewhere"]) == 7
    assert calls == [["/tmp/somewhere"]]


def test_verify_progress_is_silent_when_stderr_is_not_a_terminal(qpath: Path) -> None:
    """Progress goes to stderr only on a terminal: piped, verify prints nothing there."""
    make(qpath, list(range(50)))
    res = run("verify", str(qpath))
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.splitlines()[-1] == "ok: no damage found"
