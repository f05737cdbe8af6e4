"""The proxy listeners' request path: accept, parse with llhttp, filter, forward, stream back.

Theory of operation. A `ClientConnection` (asyncio Protocol) feeds bytes to llhttp and turns
its callbacks into `RequestHead`s, enforcing the head limits and the header-read and
body-idle timeouts as it goes. Each complete head becomes an `Exchange`; exchanges run one at
a time per connection, in order (pipelined requests wait, with client reading paused). An
exchange runs the XID filter, asks the listener's router for a `Route` (a cluster and the
head to send), takes a pooled upstream connection and then streams both ways from the
protocol callbacks, with back-pressure: a full upstream write buffer pauses client reads and a
full client write buffer pauses upstream reads. Nothing is buffered whole.

Timeouts are timer handles on the loop, never wait_for wrappers: connect (in the cluster),
response header (armed when the request is fully sent), total (armed at the head). Any of them
fails the one future the exchange awaits, with an error that names which one fired.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from sidecar.config import HeaderLimits, ProxyListenerTimeouts, format_duration
from sidecar.errors import (
    BadRequest,
    HeadersTooLarge,
    NotImplementedByProxy,
    RequestTimeout,
    SidecarError,
    UpstreamTimeout,
    UpstreamUnavailable,
    XidInvalid,
)
from sidecar.proxy import headers as h
from sidecar.proxy.upstream import Cluster, UpstreamConnection, is_idempotent

if TYPE_CHECKING:
    from sidecar.metrics import Metrics
    from sidecar.xid import Xid

log = logging.getLogger("sidecar.proxy")

#: request-body bytes held for an upstream that is not connected yet before reads pause
_MAX_PREBUFFER: Final = 64 * 1024
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CRLF: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"

# reasons client reading is paused (a bitmask: reading resumes when none is left)
_PAUSE_UPSTREAM_FULL: Final = 1
_PAUSE_PREBUFFER: Final = 2
_PAUSE_PIPELINE: Final = 4


@dataclass(frozen=True, slots=True)
class Route:
    cluster: Cluster
    #: origin-form target sent upstream
    target: bytes
    #: Host header sent upstream (None: keep the client's)
    host: bytes | None
    #: headers added by filters (XID under the names the upstream expects, X-Forwarded-*)
    extra: list[tuple[bytes, bytes]] = field(default_factory=list)


class Router:
    """Decides, once per request, where it goes. Subclassed by inbound and outbound."""

    listener_name: str = ""

    def route(self, head: h.RequestHead, xid: Xid | None, peer_ip: bytes) -> Route:
        raise NotImplementedError

    def clusters(self) -> list[Cluster]:
        raise NotImplementedError


@dataclass(slots=True)
class ListenerRuntime:
    """Everything a listener needs that comes from config, compiled once per config version.
    An exchange keeps the runtime it started with, so a reload never changes a request
    mid-flight."""

    name: str
    router: Router
    classifier: dict[bytes, int]
    xid_max_length: int
    limits: HeaderLimits
    timeouts: ProxyListenerTimeouts
    metrics: Metrics
    _requests: dict[tuple[str, int], Any] = field(default_factory=dict)
    _durations: dict[str, Any] = field(default_factory=dict)
    _timeouts: dict[tuple[str, str], Any] = field(default_factory=dict)
    _xid_rejects: dict[str, Any] = field(default_factory=dict)

    def count(self, upstream: str, status: int, seconds: float) -> None:
        key = (upstream, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.metrics.requests.labels(
                self.name, upstream, str(status)
            )
        child.inc()
        hist = self._durations.get(upstream)
        if hist is None:
            hist = self._durations[upstream] = self.metrics.request_duration.labels(
                self.name, upstream
            )
        hist.observe(seconds)

    def count_timeout(self, upstream: str, kind: str) -> None:
        key = (upstream, kind)
        child = self._timeouts.get(key)
        if child is None:
            child = self._timeouts[key] = self.metrics.upstream_timeouts.labels(
                self.name, upstream, kind
            )
        child.inc()

    def count_xid_rejection(self, reason: str) -> None:
        child = self._xid_rejects.get(reason)
        if child is None:
            child = self._xid_rejects[reason] = self.metrics.xid_rejections.labels(
                self.name, reason
            )
        child.inc()


class ProxyListener:
    """One proxy listener: its runtime (swappable), its server and its connections."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.server: asyncio.Server | None = None
        self._conn_gauge = runtime.metrics.active_connections.labels(runtime.name)
        self._client_errors: dict[str, Any] = {}
        self._closed_event = asyncio.Event()
        self._closed_event.set()

    def protocol_factory(self) -> ClientConnection:
        return ClientConnection(self)

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self.protocol_factory, host, port, reuse_address=True, backlog=4096
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def client_error(self, reason: str) -> None:
        child = self._client_errors.get(reason)
        if child is None:
            child = self._client_errors[reason] = self.runtime.metrics.client_errors.labels(
                self.runtime.name, reason
            )
        child.inc()

    def _added(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self._closed_event.clear()
        self._conn_gauge.inc()

    def _removed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self._conn_gauge.dec()
        if not self.connections:
            self._closed_event.set()

    def stop_accepting(self) -> None:
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.drain()

    async def wait_drained(self) -> None:
        await self._closed_event.wait()

    def abort_all(self) -> None:
        for conn in list(self.connections):
            conn.abort()


class ClientConnection(asyncio.Protocol):
    """One downstream connection: parsing, limits, and exchanges in order."""

    def __init__(self, listener: ProxyListener) -> None:
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer_ip = b""
        self.parser = httptools.HttpRequestParser(self)
        self.runtime = listener.runtime
        self.head: h.RequestHead | None = None
        #: bytes received while a head is incomplete (catches one endless header field,
        #: which llhttp accumulates before calling on_header)
        self.head_bytes = 0
        self.head_size = 0
        self.header_count = 0
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.paused = 0
        self.write_paused = False
        self.closing = False
        self.keepalive_timer: asyncio.TimerHandle | None = None
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.last_body_at = 0.0
        self.upgrade = False

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = str(peer[0]).encode("latin-1")
        self.listener._added(self)
        if self.listener.draining:
            self.closing = True
            transport.close()
            return
        self._arm_keepalive()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        in_head = self.head is not None or self.parsing is None
        if in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(
                NotImplementedByProxy(
                    "protocol upgrades (WebSocket) and CONNECT are not supported by this listener"
                ),
                "upgrade",
            )
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, SidecarError):
                self._refuse(cause, "head_limit" if cause.status == 431 else "bad_request")
            else:
                log.error("proxy callback failed", exc_info=cause)
                self._refuse(SidecarError("internal error"), "internal")
            return
        except httptools.HttpParserError as exc:
            self._refuse(BadRequest(f"malformed HTTP request: {exc}"), "malformed")
            return
        if self.head is not None and self.head_bytes > self.runtime.limits.header_bytes:
            self._refuse(
                HeadersTooLarge(f"request head exceeds {self.runtime.limits.header_bytes} bytes"),
                "head_limit",
            )

    def eof_received(self) -> bool | None:
        # a half-closed client gets its pending response, then the connection closes
        if self.active is None and self.parsing is None:
            return False
        self.closing_after_response()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_timers()
        self.listener._removed(self)
        active, self.active = self.active, None
        if active is not None:
            active.client_gone()
        for ex in self.queue:
            ex.client_gone()
        self.queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.active is not None:
            self.active.pause_upstream_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.active is not None:
            self.active.resume_upstream_reading()

    # --- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # each request takes the config in force when it begins, and keeps it to the end
        self.runtime = self.listener.runtime
        self.head = h.RequestHead(headers=[])
        self.header_count = 0
        self.head_size = 0
        if self.keepalive_timer is not None:
            self.keepalive_timer.cancel()
            self.keepalive_timer = None
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(
                self.runtime.timeouts.header_read, self._on_header_timeout
            )

    def on_url(self, url: bytes) -> None:
        head = self.head
        assert head is not None
        head.url += url
        if len(head.url) > self.runtime.limits.request_line:
            raise HeadersTooLarge(
                f"request target exceeds {self.runtime.limits.request_line} bytes"
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self.head
        if head is None:
            return  # chunked trailers: dropped (never forwarded)
        limits = self.runtime.limits
        self.header_count += 1
        if self.header_count > limits.header_count:
            raise HeadersTooLarge(f"request has more than {limits.header_count} header fields")
        if len(name) + len(value) > limits.header_field:
            raise HeadersTooLarge(
                f"header field {name[:64].decode('latin-1')!r} exceeds {limits.header_field} bytes"
            )
        self.head_size += len(name) + len(value) + 4
        if self.head_size > limits.header_bytes:
            raise HeadersTooLarge(f"request head exceeds {limits.header_bytes} bytes")
        head.add(name, value, self.runtime.classifier.get(name.lower(), h.PASS))

    def on_headers_complete(self) -> None:
        head = self.head
        assert head is not None
        self.head = None
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        if self.parser.should_upgrade():
            self.upgrade = True
            return
        head.method = self.parser.get_method()
        head.keep_alive = self.parser.should_keep_alive()
        head.http_minor = 1 if self.parser.get_http_version() == "1.1" else 0
        exchange = Exchange(self, head, self.runtime)
        self.parsing = exchange
        if head.has_body:
            self.last_body_at = self.loop.time()
            if self.body_timer is None:
                self.body_timer = self.loop.call_later(
                    self.runtime.timeouts.body_idle, self._check_body_idle
                )
        if self.active is None:
            self._start(exchange)
        else:
            self.queue.append(exchange)
            self._pause(_PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        self.last_body_at = self.loop.time()
        exchange = self.parsing
        if exchange is not None:
            exchange.feed_body(body)

    def on_message_complete(self) -> None:
        exchange, self.parsing = self.parsing, None
        self.head_bytes = 0
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        if exchange is not None:
            exchange.body_complete()

    # --- exchanges ---------------------------------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        self.active = exchange
        exchange.task = self.loop.create_task(exchange.run())

    def exchange_finished(self, exchange: Exchange, keep_alive: bool) -> None:
        if self.active is not exchange:
            return
        self.active = None
        if not keep_alive or self.closing or self.listener.draining:
            self._close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if not self.queue:
                self._resume(_PAUSE_PIPELINE)
            self._start(nxt)
        elif self.parsing is None and self.head is None:
            self._arm_keepalive()

    def closing_after_response(self) -> None:
        self.closing = True
        if self.active is None:
            self._close()

    # --- flow control ------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # --- timers ------------------------------------------------------------------------------

    def _arm_keepalive(self) -> None:
        if self.keepalive_timer is None:
            self.keepalive_timer = self.loop.call_later(
                self.runtime.timeouts.keepalive, self._on_keepalive_timeout
            )

    def _on_keepalive_timeout(self) -> None:
        self.keepalive_timer = None
        if self.active is None and self.parsing is None and self.head is None:
            self._close()

    def _on_header_timeout(self) -> None:
        self.header_timer = None
        if self.head is not None:
            self._refuse(
                RequestTimeout(
                    "request head not received within "
                    f"{format_duration(self.runtime.timeouts.header_read)}"
                ),
                "header_timeout",
            )

    def _check_body_idle(self) -> None:
        self.body_timer = None
        if self.parsing is None:
            return
        limit = self.runtime.timeouts.body_idle
        idle = self.loop.time() - self.last_body_at
        if idle < limit or self.paused & _PAUSE_UPSTREAM_FULL or self.paused & _PAUSE_PREBUFFER:
            # still flowing, or stalled by us (back-pressure), not by the client
            self.body_timer = self.loop.call_later(max(limit - idle, 0.01), self._check_body_idle)
            return
        self.listener.client_error("body_timeout")
        exchange = self.parsing
        exchange.abort_request(RequestTimeout(f"request body stalled for {format_duration(limit)}"))

    def _cancel_timers(self) -> None:
        for timer in (self.keepalive_timer, self.header_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.keepalive_timer = self.header_timer = self.body_timer = None

    # --- endings -----------------------------------------------------------------------------

    def _refuse(self, err: SidecarError, reason: str) -> None:
        """Answer a request that cannot be parsed or framed, and close: after a framing error
        the byte stream cannot be trusted, so nothing else is read from it."""
        self.listener.client_error(reason)
        self.closing = True
        self._cancel_timers()
        if self.transport is None or self.transport.is_closing():
            return
        parsing, self.parsing = self.parsing, None
        if parsing is not None and parsing is self.active:
            # the body being forwarded is corrupt: abandon the upstream attempt too
            parsing.abort_request(err)
        elif self.active is None:
            self.write_error(err, close=True)
            self.transport.close()
        else:
            # a response is in progress for an earlier request: let it finish, then close
            # (exchange_finished sees `closing`); nothing more is read
            self.transport.pause_reading()

    def write_error(self, err: SidecarError, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        body = err.body()
        parts = [
            h.status_line(err.status),
            b"content-type: application/json\r\n",
            b"x-gts-sidecar-error: ",
            err.code.encode("ascii"),
            _CRLF,
            b"content-length: ",
            str(len(body)).encode("ascii"),
            _CRLF,
        ]
        if close:
            parts.append(b"connection: close\r\n")
        parts += [_CRLF, body]
        self.transport.write(b"".join(parts))

    def drain(self) -> None:
        """Graceful shutdown: idle connections close now, busy ones after their response."""
        if self.active is None and self.parsing is None:
            self._close()
        else:
            self.closing = True

    def _close(self) -> None:
        self.closing = True
        self._cancel_timers()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()


class _Retry(Exception):
    """Internal: the attempt failed before the request can have reached the upstream."""


class Exchange:
    """One request and its response."""

    __slots__ = (
        "conn",
        "head",
        "rt",
        "started",
        "task",
        "route",
        "upstream",
        "body_buf",
        "body_buffered",
        "body_done",
        "body_sent",
        "chunked_up",
        "done",
        "waiter_slot",
        "total_timer",
        "header_timer",
        "resp_started",
        "resp_chunked",
        "resp_close",
        "resp_status",
        "keep_client",
        "cluster_name",
        "reused",
        "upstream_paused",
    )

    def __init__(self, conn: ClientConnection, head: h.RequestHead, rt: ListenerRuntime) -> None:
        self.conn = conn
        self.head = head
        self.rt = rt
        self.started = conn.loop.time()
        self.task: asyncio.Task[None] | None = None
        self.route: Route | None = None
        self.upstream: UpstreamConnection | None = None
        self.body_buf: list[bytes] | None = None
        self.body_buffered = 0
        self.body_done = not head.has_body
        self.body_sent = False
        self.chunked_up = head.chunked
        self.done: asyncio.Future[None] | None = None
        self.waiter_slot: list[asyncio.Future[Any] | None] = [None]
        self.total_timer: asyncio.TimerHandle | None = None
        self.header_timer: asyncio.TimerHandle | None = None
        self.resp_started = False
        self.resp_chunked = False
        self.resp_close = False
        self.resp_status = 0
        self.keep_client = head.keep_alive
        self.cluster_name = "-"
        self.reused = False
        self.upstream_paused = False

    # --- request body, from the client connection ------------------------------------------

    def feed_body(self, data: bytes) -> None:
        up = self.upstream
        if up is not None and self.body_buf is None:
            if self.chunked_up:
                up.write(b"%x\r\n" % len(data) + data + _CRLF)
            else:
                up.write(data)
            return
        if self.body_buf is None:
            self.body_buf = []
        self.body_buf.append(data)
        self.body_buffered += len(data)
        if self.body_buffered > _MAX_PREBUFFER:
            self.conn._pause(_PAUSE_PREBUFFER)

    def body_complete(self) -> None:
        self.body_done = True
        if self.upstream is not None and self.body_buf is None:
            self._finish_request()

    def _flush_body(self) -> None:
        up = self.upstream
        assert up is not None
        buf, self.body_buf, self.body_buffered = self.body_buf, None, 0
        if buf:
            if self.chunked_up:
                up.write(b"".join(b"%x\r\n" % len(c) + c + _CRLF for c in buf))
            else:
                up.write(b"".join(buf))
        self.conn._resume(_PAUSE_PREBUFFER)
        if self.body_done:
            self._finish_request()

    def _finish_request(self) -> None:
        if self.body_sent:
            return
        self.body_sent = True
        if self.chunked_up and self.upstream is not None:
            self.upstream.write(_LAST_CHUNK)
        self._arm_header_timer()

    # --- the exchange ------------------------------------------------------------------------

    async def run(self) -> None:
        conn = self.conn
        rt = self.rt
        head = self.head
        loop = conn.loop
        try:
            xid = None
            if head.xid_headers is not None:
                try:
                    xid = h.resolve_xid(head.xid_headers, rt.xid_max_length)
                except XidInvalid as exc:
                    rt.count_xid_rejection(exc.reason)
                    raise
            if head.host_count > 1:
                raise BadRequest("request carries more than one Host header")
            head.strip_connection_listed()
            route = rt.router.route(head, xid, conn.peer_ip)
            self.route = route
            cluster = route.cluster
            self.cluster_name = cluster.name
            cluster.active_requests += 1
            try:
                self.total_timer = loop.call_at(
                    self.started + cluster.total_timeout, self._on_total_timeout
                )
                if head.expect_continue and not self.body_done:
                    conn.transport.write(_CONTINUE)  # type: ignore[union-attr]
                await self._forward(cluster)
            finally:
                cluster.active_requests -= 1
        except SidecarError as err:
            self._fail_response(err)
        except asyncio.CancelledError:
            self._drop_upstream()
            raise
        except Exception as exc:  # a bug: answer 500 rather than hang the client
            log.exception("proxy exchange failed")
            self._fail_response(SidecarError(f"internal error: {type(exc).__name__}"))
        finally:
            self._cancel_timers()
            if self.resp_status:
                rt.count(self.cluster_name, self.resp_status, loop.time() - self.started)
            conn.exchange_finished(self, self.keep_client and not self.resp_close)

    async def _forward(self, cluster: Cluster) -> None:
        head = self.head
        route = self.route
        assert route is not None
        idempotent = is_idempotent(head.method)
        request_head = h.render_request_head(
            head.method,
            route.target,
            route.host,
            head.headers or [],
            route.extra,
            head.content_length,
            head.chunked,
        )
        attempts_left = cluster.retry_attempts
        retrying = False
        while True:
            try:
                try:
                    up, self.reused = await cluster.acquire(self.waiter_slot)
                except UpstreamUnavailable:
                    if attempts_left > 0 and idempotent and cluster.may_retry():
                        raise _Retry() from None
                    raise
                self.upstream = up
                self.done = self.conn.loop.create_future()
                up.attach(self, head.method == b"HEAD")
                if self.conn.write_paused:
                    self.pause_upstream_reading()
                up.write(request_head)
                if self.body_buf is not None:
                    self._flush_body()
                elif self.body_done:
                    self._finish_request()
                await self.done
            except _Retry:
                if retrying:
                    cluster.active_retries -= 1
                attempts_left -= 1
                self._drop_upstream()
                cluster.active_retries += 1
                cluster.m_retries.inc()
                retrying = True
                continue
            break
        if retrying:
            cluster.active_retries -= 1
        up = self.upstream
        self.upstream = None
        assert up is not None
        if self.upstream_paused:
            up.resume_reading()
        # reuse only a connection whose request and response both ended cleanly
        cluster.release(up, self.body_sent and up.response_done)
        if not self.body_done:
            # the upstream answered before the client finished its body: the rest of the body
            # cannot be skipped reliably, so this client connection closes after the response
            self.resp_close = True

    # --- upstream events (ResponseSink) ------------------------------------------------------

    def on_response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], minor: int
    ) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        transport = self.conn.transport
        if transport is None or transport.is_closing():
            return
        self.resp_status = status
        self.resp_started = True
        listed: set[bytes] | None = None
        content_length: bytes | None = None
        out = [b"HTTP/1.1 %d " % status, reason, _CRLF]
        for name, value in headers:
            lname = name.lower()
            if lname in h.HOP_BY_HOP or lname in h.FRAMING:
                if lname == b"content-length":
                    content_length = value
                elif lname == b"connection":
                    toks = {t.strip().lower() for t in value.split(b",")}
                    listed = toks - {b"close", b"keep-alive"}
                continue
            out += (name, b": ", value, _CRLF)
        if listed:
            # headers named in the upstream's Connection are for that hop only
            kept = [
                b
                for i in range(3, len(out), 4)
                for b in out[i : i + 4]
                if out[i].lower() not in listed
            ]
            out = out[:3] + kept
        no_body = status in (204, 304) or (100 <= status < 200) or self.head.method == b"HEAD"
        if no_body:
            if content_length is not None and status != 204:
                out += (b"content-length: ", content_length, _CRLF)
        elif content_length is not None:
            out += (b"content-length: ", content_length, _CRLF)
        elif self.head.http_minor == 1:
            self.resp_chunked = True
            out.append(b"transfer-encoding: chunked\r\n")
        else:
            # an HTTP/1.0 client: the end of the body is the end of the connection
            self.resp_close = True
        if (
            not self.keep_client
            or self.resp_close
            or self.conn.closing
            or (self.conn.listener.draining)
        ):
            self.resp_close = True
            out.append(b"connection: close\r\n")
        out.append(_CRLF)
        transport.write(b"".join(out))

    def on_response_body(self, data: bytes) -> None:
        transport = self.conn.transport
        if transport is None:
            return
        if self.resp_chunked:
            transport.write(b"%x\r\n" % len(data) + data + _CRLF)
        else:
            transport.write(data)

    def on_response_complete(self) -> None:
        if self.resp_chunked and self.conn.transport is not None:
            self.conn.transport.write(_LAST_CHUNK)
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def on_upstream_lost(self, exc: Exception | None, got_bytes: bool) -> None:
        done = self.done
        if done is None or done.done():
            return
        if isinstance(exc, SidecarError):
            done.set_exception(exc)
            return
        if (
            not got_bytes
            and not self.resp_started
            and self.reused
            and is_idempotent(self.head.method)
            and not self.head.has_body
        ):
            # a pooled keep-alive connection the upstream had already closed: the request
            # never reached it, so try again on a fresh connection
            done.set_exception(_Retry())
            return
        detail = f": {exc}" if exc else ""
        done.set_exception(
            UpstreamUnavailable(
                f"upstream {self.cluster_name!r} closed the connection "
                f"{'mid-response' if self.resp_started else 'before responding'}{detail}"
            )
        )

    def on_upstream_pause_writing(self) -> None:
        self.conn._pause(_PAUSE_UPSTREAM_FULL)

    def on_upstream_resume_writing(self) -> None:
        self.conn._resume(_PAUSE_UPSTREAM_FULL)

    def pause_upstream_reading(self) -> None:
        if self.upstream is not None and not self.upstream_paused:
            self.upstream_paused = True
            self.upstream.pause_reading()

    def resume_upstream_reading(self) -> None:
        if self.upstream is not None and self.upstream_paused:
            self.upstream_paused = False
            self.upstream.resume_reading()

    # --- timers and failures -----------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        if self.header_timer is None and self.route is not None and not self.resp_started:
            cluster = self.route.cluster
            self.header_timer = self.conn.loop.call_later(
                cluster.response_header_timeout,
                self._timeout,
                UpstreamTimeout(
                    f"response header timeout ({format_duration(cluster.response_header_timeout)})"
                    f": upstream {cluster.name!r} sent no response head in time",
                    kind="response_header",
                ),
            )

    def _on_total_timeout(self) -> None:
        self.total_timer = None
        assert self.route is not None
        cluster = self.route.cluster
        self._timeout(
            UpstreamTimeout(
                f"total timeout ({format_duration(cluster.total_timeout)}): the exchange with "
                f"upstream {cluster.name!r} did not finish in time",
                kind="total",
            )
        )

    def _timeout(self, err: UpstreamTimeout) -> None:
        waiter = self.waiter_slot[0]
        if waiter is not None and not waiter.done():
            waiter.set_exception(err)
        elif self.done is not None and not self.done.done():
            self.done.set_exception(err)

    def _cancel_timers(self) -> None:
        if self.total_timer is not None:
            self.total_timer.cancel()
            self.total_timer = None
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _drop_upstream(self) -> None:
        up, self.upstream = self.upstream, None
        if up is not None:
            up.abort()
            up.cluster.release(up, False)
        self.done = None
        self.resp_started = False
        self.body_sent = False
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _fail_response(self, err: SidecarError) -> None:
        self._drop_upstream()
        if isinstance(err, UpstreamTimeout):
            self.rt.count_timeout(self.cluster_name, err.kind)
        conn = self.conn
        if self.resp_status and self.resp_started:
            # the head is out: the only honest signal left is an aborted connection
            self.resp_close = True
            conn.abort()
            return
        if conn.transport is None or conn.transport.is_closing():
            return
        self.resp_status = err.status
        close = not self.body_done or not self.keep_client or conn.closing
        self.resp_close = self.resp_close or close
        log.debug("sidecar error %s: %s", err.code, err.message)
        conn.write_error(err, close=self.resp_close)

    def abort_request(self, err: SidecarError) -> None:
        """The client's request broke mid-body (stalled or mis-framed): answer if no response
        has started, and close; the upstream attempt is abandoned."""
        if not self.resp_started:
            self.conn.write_error(err, close=True)
            self.resp_status = err.status
        self.conn.closing = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
        elif self.conn.transport is not None:
            self.conn.transport.close()

    def client_gone(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
