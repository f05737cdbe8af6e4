"""A real `redis-server` for the tests: started once per session on a free loopback port in
a temporary directory, with no persistence, and stopped at the end.

Use it by importing both fixtures into a test module (no conftest change needed):

    from tests.redis_server import redis_server, redis_url  # noqa: F401

`redis_url` is a `redis://127.0.0.1:PORT/0` URL to a database emptied before each test.
Without `redis-server` on PATH the tests are skipped, except under CI=true, where they fail:
CI installs it with scripts/system-deps.sh, so a missing server there is a broken setup.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 10.0


def _missing(reason: str) -> None:
    message = f"{reason}; scripts/system-deps.sh installs it (Debian package redis-server)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: Redis tests must run, not skip)", pytrace=False)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """Send one command in RESP and return the first reply line (enough for PING, FLUSHALL)."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply


class RedisProcess:
    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # The free port may be taken between our probe and Redis's bind: try a few.
        errors = []
        for _ in range(3):
            self.port = _free_port()
            log = self.workdir / f"redis-{self.port}.log"
            self.proc = subprocess.Popen(
                [
                    self.executable,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.workdir),
                    "--logfile", str(log),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if self._wait_ready():
                return
            self.stop()
            errors.append(log.read_text(errors="replace")[-2000:] if log.exists() else "no log")
        raise RuntimeError("redis-server did not start:\n" + "\n---\n".join(errors))

    def _wait_ready(self) -> bool:
        """Poll PING until +PONG, the process exits, or START_TIMEOUT passes."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if command(self.port, "PING", timeout=0.5).startswith(b"+PONG"):
                    return True
            except OSError:
                pass
            time.sleep(0.02)  # a poll interval, not a guess at readiness
        return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    executable = shutil.which("redis-server")
    if executable is None:
        _missing("redis-server is not installed")
        raise AssertionError("unreachable")  # pytest.skip/fail raise
    server = RedisProcess(executable, tmp_path_factory.mktemp("redis"))
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        # installed but broken: a real failure, CI or not
        pytest.fail(f"{executable} could not be started: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """The URL of database 0 of the session's Redis, emptied for this test."""
    reply = command(redis_server.port, "FLUSHALL")
    assert reply.startswith(b"+OK"), reply
    return redis_server.url
