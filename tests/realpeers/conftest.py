"""Real servers and proxies as peers of the sidecar. The nginx fixture: nginx as an ingress in
front of the inbound listener (HTTP/1.1 or gRPC), and as an app or outbound upstream behind it.

Each nginx runs from its own prefix under the test's tmp_path, in the foreground, one worker,
on free loopback ports, with an access log whose lines the tests read. nginx comes from
Debian's nginx-light package (scripts/system-deps.sh installs it)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.component.conftest import connect, upstream  # noqa: F401  (the apps behind nginx)
from tests.component.servers import free_port
from tests.realclients.grpcapp import channel, grpc_app  # noqa: F401 (fixtures)

#: every request nginx serves is one line of this format in `Nginx.access_log`: the tests
#: read what nginx received (the XID, a request id) and on which connection (its number and
#: how many requests that connection had carried)
LOG_FORMAT = (
    '\'$request_method $uri xid="$http_xid" req="$http_x_req" conn=$connection '
    'n=$connection_requests status=$status up="$upstream_status"\''
)

MAIN = """\
{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format peers {log_format};
    access_log {prefix}/access.log peers;
    default_type text/plain;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{http}
}}
"""


def nginx_binary() -> str:
    """nginx's path (it lives in /usr/sbin, often not on a user's PATH). Without it the test
    skips, or fails under CI=true."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        message = "nginx is not installed (scripts/system-deps.sh installs nginx-light)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


class Nginx:
    """One nginx process: `port` is the first port it was asked to listen on."""

    def __init__(self, prefix: Path, proc: subprocess.Popen[bytes], ports: list[int]) -> None:
        self.prefix = prefix
        self.proc = proc
        self.ports = ports

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def log_lines(self) -> list[str]:
        """The access log's complete lines so far (nginx writes each at the request's end)."""
        try:
            text = self.access_log.read_text()
        except FileNotFoundError:
            return []
        return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]

    def error_log(self) -> str:
        try:
            return (self.prefix / "error.log").read_text()
        except FileNotFoundError:
            return ""

    async def wait_log_lines(self, n: int, timeout: float = 10.0) -> list[str]:
        """Wait until the access log holds at least `n` lines; return them all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(lines := self.log_lines()) < n:
            if loop.time() > deadline:
                raise TimeoutError(f"nginx logged {len(lines)} of {n} requests: {lines}")
            await asyncio.sleep(0.01)
        return lines

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown: the master stops its worker), SIGKILL to the
        process group it leads if it has not exited within 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


async def _wait_port(server: Nginx, port: int, timeout: float = 10.0) -> None:
    """Wait until `port` accepts a connection, failing at once if nginx exited (a bad config
    or a port taken meanwhile: its error log says which)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"nginx exited ({server.proc.returncode}): {server.error_log()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(f"nginx not listening on {port}: {server.error_log()}") from None
            await asyncio.sleep(0.01)
            continue
        writer.close()
        await writer.wait_closed()
        return


NginxFactory = Callable[..., Awaitable[Nginx]]


@pytest.fixture
async def nginx(tmp_path: Path) -> AsyncIterator[NginxFactory]:
    """`await nginx(http_block, ports=[...])` → a started nginx whose `http {}` block holds
    `http_block` (a str.format template: `{port}`, `{port1}`… name the free ports taken for
    it, `{prefix}` its directory). Each nginx is stopped at the test's end."""
    binary = nginx_binary()
    started: list[Nginx] = []

    async def make(http_block: str, nports: int = 1, **values: object) -> Nginx:
        prefix = tmp_path / f"nginx{len(started)}"
        prefix.mkdir()
        ports = [free_port() for _ in range(nports)]
        names = {"port": ports[0], **{f"port{i}": p for i, p in enumerate(ports)}}
        http = http_block.format(prefix=prefix, **names, **values)
        # as root, nginx's worker would run as nobody, who cannot write into tmp_path
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        conf.write_text(MAIN.format(user=user, prefix=prefix, log_format=LOG_FORMAT, http=http))
        proc = subprocess.Popen(
            [binary, "-p", f"{prefix}/", "-c", str(conf), "-e", f"{prefix}/error.log",
             "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        server = Nginx(prefix, proc, ports)
        started.append(server)
        for port in ports:
            await _wait_port(server, port)
        return server

    yield make
    for server in started:
        server.stop()
