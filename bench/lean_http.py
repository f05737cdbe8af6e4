"""A lean HTTP/1.1 load generator's parts: a keep-alive client connection and a server that
answers every request with one fixed response.

Why not aiohttp here: a benchmark's client must not be what it measures. With two CPUs, one
for the system under test and one for the load, aiohttp's client and server cost about as
much per call as the sidecar does, so the load process would saturate first (as wrk would
not). These speak just enough HTTP/1.1 for the benchmark's own calls (Content-Length bodies,
keep-alive, one request in flight per connection), parsed by httptools (llhttp), the parser
the sidecar's data plane uses.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import httptools


class HttpError(Exception):
    pass


class ClientConnection(asyncio.Protocol):
    """One keep-alive connection; `await conn.request(raw)` → (status, body)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._future: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self._closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> ClientConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, host, port)
        return conn

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpError(f"bad response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._fail(HttpError(f"connection closed: {exc}"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        future, self._future = self._future, None
        body = b"".join(self._body)
        self._body = []
        if future is not None and not future.done():
            future.set_result((self._parser.get_status_code(), body))

    def _fail(self, exc: Exception) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_exception(exc)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one complete request (head and body) and wait for its response."""
        if self._closed or self._transport is None:
            raise HttpError("connection closed")
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._future = future
        self._transport.write(raw)
        return await future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def build_request(
    method: str, path: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class FixedAnswerServer(asyncio.Protocol):
    """Answers every request with one prebuilt response; counts the requests."""

    def __init__(self, response: bytes, counter: list[int]) -> None:
        self._response = response
        self._counter = counter
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)

    @staticmethod
    def response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
        head = (
            f"HTTP/1.1 {status} OK\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode("latin-1") + body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.close()

    def on_message_complete(self) -> None:
        self._counter[0] += 1
        assert self._transport is not None
        self._transport.write(self._response)


async def serve_fixed(response: bytes, host: str = "127.0.0.1") -> tuple[Any, int, list[int]]:
    """Start a FixedAnswerServer on an ephemeral port: (server, port, request counter)."""
    counter = [0]
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FixedAnswerServer(response, counter), host, 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, counter
