"""Test peers for the proxy component tests: a scriptable raw upstream and a raw client.

Both speak HTTP/1.1 with a small, strict, hand-written framing parser of their own (not
llhttp), so a framing mistake of the sidecar shows up as a mismatch instead of being
"understood" the same way on both sides. The upstream records every request it receives
(raw head, headers, body size and sha256) and counts connections, so tests can assert what
reached the app and how many connections carried it.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# --- framing helpers ------------------------------------------------------------------------


class FramingError(Exception):
    """The peer sent bytes that are not valid HTTP/1.1 framing."""


def _parse_headers(lines: list[bytes]) -> list[tuple[str, str]]:
    headers = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise FramingError(f"bad header line {line!r}")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return headers


def _get_all(headers: list[tuple[str, str]], name: str) -> list[str]:
    lname = name.lower()
    return [v for n, v in headers if n.lower() == lname]


async def _read_chunked(
    reader: asyncio.StreamReader, sink: Callable[[bytes], None]
) -> list[tuple[str, str]]:
    """Decode a chunked body strictly; returns the trailer fields."""
    while True:
        line = await reader.readuntil(b"\r\n")
        size_s = line[:-2].split(b";", 1)[0]
        if b"\r" in line[:-2] or b"\n" in line[:-2]:
            raise FramingError(f"bad chunk size line {line!r}")
        try:
            size = int(size_s, 16)
        except ValueError:
            raise FramingError(f"bad chunk size line {line!r}") from None
        if size == 0:
            trailers = []
            while True:
                tline = await reader.readuntil(b"\r\n")
                if tline == b"\r\n":
                    return _parse_headers(trailers)
                trailers.append(tline[:-2])
        remaining = size
        while remaining:
            data = await reader.read(min(remaining, 1 << 16))
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            sink(data)
            remaining -= len(data)
        if await reader.readexactly(2) != b"\r\n":
            raise FramingError("chunk data not followed by CRLF")


class BodyDigest:
    """Counts and hashes a body as it streams by, keeping at most `keep` bytes of it."""

    def __init__(self, keep: int = 1 << 20) -> None:
        self.size = 0
        self._sha = hashlib.sha256()
        self._keep = keep
        self._parts: list[bytes] = []
        self._kept = 0

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        self._sha.update(data)
        if self._kept < self._keep:
            piece = data[: self._keep - self._kept]
            self._parts.append(piece)
            self._kept += len(piece)

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    @property
    def data(self) -> bytes:
        return b"".join(self._parts)


# --- the upstream -----------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the upstream saw it."""

    conn_id: int
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    framing: str  # "content-length", "chunked" or "none"
    body: bytes = b""
    body_size: int = 0
    body_sha256: str = ""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    #: the body was fully received (False when the peer went away mid-body)
    complete: bool = True

    def get(self, name: str) -> str | None:
        values = _get_all(self.headers, name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return _get_all(self.headers, name)

    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}


class Reply:
    """What a handler uses to answer one request on the upstream side."""

    def __init__(
        self,
        upstream: Upstream,
        req: Received,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.upstream = upstream
        self.req = req
        self.reader = reader
        self.writer = writer
        #: close the connection once the handler returns (no Connection: close is sent)
        self.close_after = False

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    async def send(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        *,
        reason: str = "OK",
        length: bool = True,
    ) -> None:
        head = [f"HTTP/1.1 {status} {reason}\r\n".encode()]
        for name, value in headers:
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if length:
            head.append(b"Content-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        self.writer.write(b"".join(head) + body)
        await self.writer.drain()

    def close(self) -> None:
        self.close_after = True
        self.writer.close()

    def reset(self) -> None:
        """Close with a TCP RST."""
        self.close_after = True
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Received, Reply], Awaitable[None]]


async def default_handler(req: Received, reply: Reply) -> None:
    await reply.send(200, f"{req.method} {req.target}".encode())


async def stall_forever(req: Received, reply: Reply) -> None:
    """Never answer; read (and drop) whatever else comes until the peer goes away."""
    while await reply.reader.read(1 << 16):
        pass
    reply.close()


class Upstream:
    """A scriptable HTTP/1.1 server on 127.0.0.1 that records what it receives.

    `handler(req, reply)` answers each request; requests on one connection are handled in
    order. With `read_body=False` the handler is called right after the head and must read
    the body itself (or not). `gate` is an event handlers can wait on to hold requests.
    """

    def __init__(
        self, handler: Handler = default_handler, *, read_body: bool = True, keep: int = 1 << 20
    ) -> None:
        self.handler = handler
        self.read_body = read_body
        self.keep = keep
        self.requests: list[Received] = []
        self.errors: list[BaseException] = []
        self.connections = 0
        self.open_now = 0
        self.max_open = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        self.gate.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def wait_requests(self, n: int, timeout: float = 5.0) -> None:
        await wait_until(lambda: len(self.requests) >= n, timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        conn_id = self.connections
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                req = self._parse_head(conn_id, head)
                reply = Reply(self, req, reader, writer)
                if self.read_body:
                    try:
                        await self._read_body(req, reader)
                    except (asyncio.IncompleteReadError, ConnectionError):
                        req.complete = False
                        self.requests.append(req)
                        return
                self.requests.append(req)
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    await self.handler(req, reply)
                finally:
                    self.in_flight -= 1
                if reply.close_after or writer.is_closing():
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # close() cancels handlers that are stalling on purpose; end quietly (asyncio's
            # start_server callback logs an error for a task that ends cancelled)
            pass
        except Exception as exc:  # a broken test server must be visible, not a hang
            self.errors.append(exc)
        finally:
            self.open_now -= 1
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)

    def _parse_head(self, conn_id: int, head: bytes) -> Received:
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise FramingError(f"bad request line {lines[0]!r}")
        headers = _parse_headers(lines[1:])
        te = _get_all(headers, "transfer-encoding")
        cl = _get_all(headers, "content-length")
        if te and cl:
            raise FramingError("both Transfer-Encoding and Content-Length")
        if len(cl) > 1:
            raise FramingError("repeated Content-Length")
        framing = "chunked" if te else "content-length" if cl else "none"
        return Received(
            conn_id=conn_id,
            method=parts[0].decode("latin-1"),
            target=parts[1].decode("latin-1"),
            version=parts[2].decode("latin-1"),
            headers=headers,
            raw_head=head,
            framing=framing,
        )

    async def _read_body(self, req: Received, reader: asyncio.StreamReader) -> None:
        digest = BodyDigest(self.keep)
        try:
            if req.framing == "chunked":
                if [t.strip().lower() for t in req.get_all("transfer-encoding")] != ["chunked"]:
                    raise FramingError(
                        f"unexpected Transfer-Encoding {req.get_all('transfer-encoding')}"
                    )
                req.trailers = await _read_chunked(reader, digest)
            elif req.framing == "content-length":
                remaining = int(req.get("content-length") or "0")
                while remaining:
                    data = await reader.read(min(remaining, 1 << 16))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", remaining)
                    digest(data)
                    remaining -= len(data)
        finally:
            req.body = digest.data
            req.body_size = digest.size
            req.body_sha256 = digest.sha256


class UpstreamFactory:
    """Starts upstreams for one test and closes them all at its end (a fixture helper)."""

    def __init__(self) -> None:
        self._started: list[Upstream] = []

    async def __call__(self, handler: Handler = default_handler, **kw: Any) -> Upstream:
        up = await Upstream(handler, **kw).start()
        self._started.append(up)
        return up

    async def close(self) -> None:
        for up in self._started:
            await up.close()
        # whatever the test asserted, the sidecar must never have sent mis-framed HTTP
        errors = [e for up in self._started for e in up.errors]
        assert not errors, f"an upstream received invalid HTTP from the sidecar: {errors!r}"


# --- the client -------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    raw_head: bytes
    body: bytes
    #: how the body was delimited: "content-length", "chunked", "close" or "none"
    framing: str
    body_size: int = 0
    body_sha256: str = ""

    def get(self, name: str) -> str | None:
        values = _get_all(self.headers, name)
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return _get_all(self.headers, name)

    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class Client:
    """A raw HTTP/1.1 client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(reader, writer)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.writer.transport.abort()

    def reset(self) -> None:
        """Go away with a TCP RST (a plain close is a half-close the sidecar may wait out)."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(
        self,
        method: str = "GET",
        *,
        timeout: float = 5.0,
        interim: bool = False,
        sink: Callable[[bytes], None] | None = None,
    ) -> Response:
        """Read one response. 1xx responses are skipped unless `interim`; with `sink`, the
        body goes there (not into Response.body) but is still counted and hashed."""
        return await read_response(self.reader, method, timeout=timeout, interim=interim, sink=sink)

    async def closed(self, timeout: float = 5.0) -> bool:
        """Wait for the peer to close (EOF or reset); True once it has. Bytes still
        arriving before the close are read and discarded."""
        try:
            while await asyncio.wait_for(self.reader.read(1 << 16), timeout):
                pass
        except ConnectionError:
            pass
        return True

    async def read_to_eof(self, timeout: float = 5.0) -> bytes:
        """Everything until the peer closes; TimeoutError if it has not closed by then."""
        data, closed = await self.read_for(timeout)
        if not closed:
            raise TimeoutError(f"connection still open after {timeout}s; got {data[:200]!r}")
        return data

    async def read_for(self, timeout: float) -> tuple[bytes, bool]:
        """Read for up to `timeout` seconds: (bytes read, whether the peer closed)."""
        out = b""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return out, False
                try:
                    data = await asyncio.wait_for(self.reader.read(1 << 16), left)
                except TimeoutError:
                    return out, False
                if not data:
                    return out, True
                out += data
        except ConnectionError:
            return out, True


async def read_head(
    reader: asyncio.StreamReader, timeout: float = 5.0
) -> tuple[int, str, list[tuple[str, str]], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise FramingError(f"bad status line {lines[0]!r}")
    code, _, reason = rest.partition(b" ")
    return int(code), reason.decode("latin-1"), _parse_headers(lines[1:]), head


async def read_response(
    reader: asyncio.StreamReader,
    method: str = "GET",
    *,
    timeout: float = 5.0,
    interim: bool = False,
    sink: Callable[[bytes], None] | None = None,
) -> Response:
    """Read one response. 1xx responses are skipped unless `interim`; with `sink`, the
    body goes there (not into Response.body) but is still counted and hashed."""
    while True:
        status, reason, headers, raw = await read_head(reader, timeout)
        if 100 <= status < 200 and not interim:
            continue
        break
    digest = BodyDigest()

    def feed(data: bytes) -> None:
        digest(data)
        if sink is not None:
            sink(data)

    te = _get_all(headers, "transfer-encoding")
    cl = _get_all(headers, "content-length")
    if te and cl:
        raise FramingError("response has both Transfer-Encoding and Content-Length")
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        framing = "none"
    elif te:
        framing = "chunked"
        await asyncio.wait_for(_read_chunked(reader, feed), timeout)
    elif cl:
        framing = "content-length"
        remaining = int(cl[0])
        while remaining:
            data = await asyncio.wait_for(reader.read(min(remaining, 1 << 20)), timeout)
            if not data:
                raise asyncio.IncompleteReadError(b"", remaining)
            feed(data)
            remaining -= len(data)
    else:
        framing = "close"
        while data := await asyncio.wait_for(reader.read(1 << 20), timeout):
            feed(data)
    return Response(
        status=status,
        reason=reason,
        headers=headers,
        raw_head=raw,
        body=b"" if sink is not None else digest.data,
        framing=framing,
        body_size=digest.size,
        body_sha256=digest.sha256,
    )


async def response_from_socket(sock: socket.socket, timeout: float = 5.0) -> Response:
    """Read one response from a non-blocking socket. Unlike an asyncio stream, whose reader
    fails as soon as a *write* on the same transport meets a reset, this returns every byte
    the peer sent before it reset the connection (as curl or a browser would see them)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)

    async def pump() -> None:
        try:
            while data := await loop.sock_recv(sock, 1 << 16):
                reader.feed_data(data)
        except OSError:
            pass
        reader.feed_eof()

    task = asyncio.ensure_future(pump())
    try:
        return await read_response(reader, timeout=timeout)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class SocketClient:
    """A client on a plain non-blocking socket: sends may fail once the sidecar has closed,
    while every byte it sent before that stays readable (see response_from_socket)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)

    async def __aenter__(self) -> SocketClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()

    async def send(self, data: bytes) -> bool:
        """False once the peer no longer takes data."""
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)
        except OSError:
            return False
        return True

    async def response(self, timeout: float = 5.0) -> Response:
        return await response_from_socket(self.sock, timeout)


async def request(port: int, data: bytes, method: str = "GET", timeout: float = 5.0) -> Response:
    """Send one raw request on a fresh connection and read one response."""
    async with await Client.connect(port) as client:
        await client.send(data)
        return await client.response(method, timeout=timeout)


def get(path: str = "/", *headers: str, method: str = "GET", body: bytes | None = None) -> bytes:
    """A raw request: `get("/x", "Host: a", "XID: ...")`."""
    lines = [f"{method} {path} HTTP/1.1", *headers]
    if not any(h.lower().startswith("host:") for h in headers):
        lines.insert(1, "Host: test")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


# --- small utilities -------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition (not a sleep used as synchronisation: it returns as soon as it holds)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def free_port() -> int:
    """A loopback port free now, for a server a test starts on it later (bound, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: sockets holding closed_port()'s ports for the rest of the run
_RESERVED: list[socket.socket] = []


def closed_port() -> int:
    """A loopback port nothing listens on. It stays bound (never listening) for the rest of
    the run: released, it could become some connection's ephemeral source port, and a
    connect to it could then connect a socket to itself (a TCP self-connect) instead of
    being refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _RESERVED.append(s)
    return int(s.getsockname()[1])


def error_of(resp: Response) -> dict[str, Any]:
    """The sidecar's own error: checks the JSON shape and the marker header, returns it."""
    assert resp.get("content-type") == "application/json", resp.raw_head
    body = resp.json()
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"], body
    assert resp.get("x-gts-sidecar-error") == err["code"], resp.raw_head
    return dict(err)


def sample(sc: Any, name: str, **labels: str) -> float:
    value = sc.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)
