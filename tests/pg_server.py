"""A real PostgreSQL for the tests: a cluster of its own (initdb + pg_ctl on a temporary
directory, a free loopback port), never a system service, stopped at the end.

Use it by importing the fixtures into a test module (no conftest change needed):

    from tests.pg_server import pg_server, pg_url  # noqa: F401

`pg_server` is started once per session; `pg_url` is a `postgresql://gts@127.0.0.1:PORT/DB`
URL to a database created empty for the test (the password is in `PgCluster.password`, and
in the file `PgCluster.password_file`). `PgCluster(...)` can also be made by a test that
needs its own cluster to stop and start (PostgreSQL restarted mid-load).

Run as root, initdb and the server run as the `postgres` user (PostgreSQL refuses root):
through `runuser`, on a directory that user owns. Without the binaries the tests are
skipped, except under CI=true, where they fail: scripts/system-deps.sh installs them (Debian
package postgresql).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 30.0
USER = "gts"
_databases = itertools.count(1)


def _missing(reason: str) -> None:
    message = f"{reason}; scripts/system-deps.sh installs it (Debian package postgresql)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: PostgreSQL tests must run, not skip)", pytrace=False)
    pytest.skip(message)


def pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin that has initdb (Debian keeps them off PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One PostgreSQL cluster on a temporary directory and a loopback port."""

    def __init__(self, bindir: Path, *, port: int | None = None) -> None:
        self.bindir = bindir
        self.port = port or _free_port()
        self.password = secrets.token_hex(16)
        self.as_root = os.geteuid() == 0
        # /tmp itself, not pytest's tmp_path: that is 0700 and root's, unreadable to postgres
        self.root = Path(tempfile.mkdtemp(prefix="gts-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.password_file = self.root / "password"
        self.password_file.write_text(self.password + "\n")
        self.running = False
        self._initdb()

    # --- running the binaries (as postgres when we are root) -----------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(
            cmd, capture_output=True, text=True, check=check, stdin=subprocess.DEVNULL, timeout=60
        )

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_root:
            pg = pwd.getpwnam("postgres")
            for path in (self.root, pwfile):
                os.chown(path, pg.pw_uid, pg.pw_gid)
        self._run(
            self.bindir / "initdb", "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
            "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-locale",
        )  # fmt: skip
        pwfile.unlink()

    def start(self, **settings: str) -> None:
        """Start the server; `settings` are extra server settings (`-c name=value`), e.g.
        the benchmark's shared_preload_libraries."""
        # TCP on loopback only; the Unix socket in our own directory (never /var/run)
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c max_connections=200"
        options += "".join(f" -c {name}={value}" for name, value in settings.items())
        result = self._run(
            self.bindir / "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", str(int(START_TIMEOUT)), "start", check=False,
        )  # fmt: skip
        if result.returncode != 0:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{tail}")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if not self.running:
            return
        self._run(self.bindir / "pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- databases -----------------------------------------------------------------------

    def psql(self, sql: str, db: str = "postgres") -> str:
        result = self._run(
            self.bindir / "psql", "-h", str(self.root), "-p", str(self.port), "-U", USER,
            "-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql,
        )  # fmt: skip
        return result.stdout

    def create_database(self) -> str:
        name = f"t{os.getpid()}_{next(_databases)}_{int(time.time() * 1000) % 100000}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def url(self, db: str) -> str:
        """The URL the sidecar's config takes: no password in it (password_file or PGPASSWORD)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def dsn(self, db: str) -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{db}"


def new_cluster() -> PgCluster:
    """A started cluster (skips, or fails under CI=true, without PostgreSQL)."""
    bindir = pg_bin()
    if bindir is None:
        _missing("PostgreSQL (initdb, pg_ctl) is not installed")
        raise AssertionError("unreachable")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _missing("running as root needs the postgres user to run PostgreSQL")
    try:
        cluster = PgCluster(bindir)
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"PostgreSQL could not be started: {exc}", pytrace=False)
    return cluster


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgCluster]:
    cluster = new_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_server: PgCluster) -> str:
    """A fresh, empty database of the session's cluster, as a password-less URL."""
    return pg_server.url(pg_server.create_database())
