"""One buffered HTTP/1.1 call over a data-plane `Cluster`: small request out, small response
back, on the data plane's keep-alive pools and llhttp parser.

The control plane's own outgoing calls on the transaction path (phase-two callbacks to
branches) use this rather than an aiohttp ClientSession: an aiohttp client request costs
about 100 µs of CPU here, several times a pooled exchange on the data plane's machinery, and
a degraded sidecar makes one per branch per transaction. Bodies are whole bytes both ways
(callbacks are a few hundred bytes); the response body is capped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sidecar.config import format_duration
from sidecar.errors import SidecarError, UpstreamTimeout, UpstreamUnavailable
from sidecar.proxy.upstream import Cluster

if TYPE_CHECKING:
    from sidecar.proxy.h2_upstream import H2Cluster

_CRLF: Final = b"\r\n"


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class _NothingBack(UpstreamUnavailable):
    """The connection closed before a byte of the response came back."""


class _Collector:
    """The ResponseSink of one call: gathers the response and settles `future`."""

    __slots__ = ("future", "limit", "status", "headers", "parts", "size", "started")

    def __init__(self, future: asyncio.Future[Response], limit: int) -> None:
        self.future = future
        self.limit = limit
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.started = False

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        self.started = True
        self.status = status
        self.headers = headers
        framed = False
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-length" or (
                lname == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                framed = True
        return framed

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        # (HTTP/2 upstreams: a gRPC call's status is in them) kept after the head's fields
        self.headers = self.headers + trailers

    def on_response_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self._settle(UpstreamUnavailable(f"response body larger than {self.limit} bytes"))
            return
        self.parts.append(data)

    def on_response_complete(self) -> None:
        if not self.future.done():
            self.future.set_result(Response(self.status, self.headers, b"".join(self.parts)))

    def flush(self) -> None:
        pass

    def on_upstream_lost(self, exc: Exception | None, got_bytes: bool) -> None:
        if isinstance(exc, SidecarError):
            self._settle(exc)
            return
        when = "mid-response" if self.started else "before responding"
        detail = f": {exc}" if exc else ""
        message = f"the connection closed {when}{detail}"
        self._settle(UpstreamUnavailable(message) if got_bytes else _NothingBack(message))

    def on_upstream_pause_writing(self) -> None:
        pass  # the request is written whole; the transport buffers it

    def on_upstream_resume_writing(self) -> None:
        pass

    def _settle(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


def _timed_out(future: asyncio.Future[Response], cluster: Cluster, timeout: float) -> None:
    if not future.done():
        future.set_exception(_timeout(cluster, timeout))


def _timeout(cluster: Cluster, timeout: float) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"no response from {cluster.name!r} within {format_duration(timeout)}", kind="total"
    )


async def fetch(
    cluster: Cluster,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    timeout: float,
    idempotent: bool,
    max_body: int = 1024 * 1024,
) -> Response:
    """Send one request to `cluster` and return its whole response, within `timeout`
    seconds in all. When the call is `idempotent` (safe to repeat, e.g. it carries an
    Idempotency-Key), a pooled keep-alive connection that closes with nothing back is
    replaced at once: most likely the peer had closed it idle and the request went nowhere,
    and if it did arrive, repeating it is harmless. Errors are the data plane's own:
    UpstreamUnavailable, UpstreamTimeout, PoolExhausted."""
    head = [f"{method} {path} HTTP/1.1\r\nhost: ".encode("latin-1"), cluster.authority, _CRLF]
    for name, value in headers:
        head += (name.encode("latin-1"), b": ", value.encode("latin-1"), _CRLF)
    head += (b"content-length: ", str(len(body)).encode(), _CRLF, _CRLF, body)
    request = b"".join(head)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:  # each round after the first used up one stale idle connection
        idle = cluster.take_idle()  # the common case: no task, no waiting
        if idle is not None:
            conn, reused = idle, True
        else:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _timeout(cluster, timeout)
            slot: list[asyncio.Future[Any] | None] = [None]
            try:
                conn, reused = await asyncio.wait_for(cluster.acquire(slot), remaining)
            except UpstreamTimeout:  # the connect timeout: it names itself
                raise
            except TimeoutError:
                raise _timeout(cluster, timeout) from None
        future: asyncio.Future[Response] = loop.create_future()
        timer = loop.call_at(deadline, _timed_out, future, cluster, timeout)
        conn.attach(_Collector(future, max_body), method == "HEAD")
        conn.write(request)  # type: ignore[attr-defined]  # an HTTP/1.1 cluster's connection
        try:
            response = await future
        except _NothingBack as exc:
            _drop(cluster, conn)
            if reused and idempotent:
                continue  # most likely a stale keep-alive connection
            raise UpstreamUnavailable(exc.message) from None
        except BaseException:
            _drop(cluster, conn)
            raise
        finally:
            timer.cancel()
        cluster.release(conn, True)
        return response


def _drop(cluster: Cluster, conn: Any) -> None:
    conn.abort()
    cluster.release(conn, False)


async def fetch_h2(
    cluster: H2Cluster,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    timeout: float,
    max_body: int = 1024 * 1024,
) -> Response:
    """`fetch` over an HTTP/2 (h2c) cluster: one stream, the request whole, the response
    whole, its trailers after its head's fields. A stream never goes stale as a pooled
    HTTP/1.1 connection can, so there is nothing to repeat."""
    fields = [
        (b":method", method.encode("ascii")),
        (b":scheme", b"https" if cluster.ssl is not None else b"http"),
        (b":authority", cluster.authority),
        (b":path", path.encode("latin-1")),
    ]
    fields += [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in headers]
    fields.append((b"content-length", b"%d" % len(body)))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    stream = cluster.take_idle()
    if stream is None:
        slot: list[asyncio.Future[Any] | None] = [None]
        try:
            stream, _ = await asyncio.wait_for(cluster.acquire(slot), timeout)
        except UpstreamTimeout:
            raise
        except TimeoutError:
            raise _timeout(cluster, timeout) from None
    future: asyncio.Future[Response] = loop.create_future()
    timer = loop.call_at(deadline, _timed_out, future, cluster, timeout)
    stream.attach(_Collector(future, max_body), method == "HEAD")
    stream.send_fields(fields, end_stream=not body)
    if body:
        stream.send_body(body, False)
        stream.end_body(False)
    try:
        response = await future
    except BaseException:
        _drop(cluster, stream)
        raise
    finally:
        timer.cancel()
    cluster.release(stream, True)
    return response
