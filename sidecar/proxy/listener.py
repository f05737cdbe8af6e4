"""The proxy listeners' client side: accept, parse with llhttp, enforce limits, run exchanges.

Theory of operation. A `ClientConnection` (asyncio Protocol) feeds bytes to llhttp and turns
its callbacks into `RequestHead`s, enforcing the head limits as it goes. Each complete head
becomes an `Exchange` (exchange.py); exchanges run one at a time per connection, in order:
pipelined requests wait, with client reading paused. Timers are armed lazily — the header-read
timer only when a read ends with a head still incomplete, the body-idle timer only when it
ends mid-body — and the keep-alive timer is one long-lived check per connection, so a
request that arrives whole costs no timer at all. Upstream deadlines (total, response header)
are checked by one sweep per listener over the exchanges in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from sidecar.config import format_duration
from sidecar.errors import (
    BadRequest,
    ConnectionLimit,
    HeadersTooLarge,
    NotImplementedByProxy,
    PayloadTooLarge,
    RequestTimeout,
    SidecarError,
    VersionNotSupported,
)
from sidecar.proxy import headers as h
from sidecar.proxy.downstream import H2_PREFACE as PREFACE
from sidecar.proxy.exchange import (
    PAUSE_PIPELINE,
    PAUSE_UPSTREAM_FULL,
    Exchange,
    body_timeout,
)

# ListenerRuntime lives in runtime.py (an ordinary class when this module is compiled); it is
# imported from here too
from sidecar.proxy.runtime import ListenerRuntime as ListenerRuntime

if TYPE_CHECKING:
    from ssl import SSLContext

    from sidecar.proxy.h2_downstream import H2Downstream

log = logging.getLogger("sidecar.proxy")

_CRLF: Final = b"\r\n"
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_NO_BODY_STATUS: Final = frozenset({204, 304})
#: how often the listener checks upstream deadlines while exchanges are in flight; timeouts
#: fire within this much of their configured value
DEADLINE_TICK: Final = 0.01
#: lingering close after refusing a request or answering before its body was all in
#: (nginx's lingering_close): how long, and how many bytes, the client's remaining input is
#: read and discarded before the socket closes. The bytes bound work, not memory (nothing is
#: kept); a client still uploading when the answer comes (h2load does not stop for it) may
#: send many megabytes before it reads the answer, and a reset before then destroys it
LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 64 << 20


class ProxyListener:
    """One proxy listener: its runtime (swappable), its server, connections and deadlines."""

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime
        self.loop = asyncio.get_running_loop()
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.server: asyncio.Server | None = None
        self._conn_gauge = runtime.metrics.active_connections.labels(runtime.name)
        self.aborts = runtime.metrics.client_aborts.labels(runtime.name)
        self._client_errors: dict[str, Any] = {}
        self._closed_event = asyncio.Event()
        self._closed_event.set()
        self._watched: set[Exchange] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        #: open connections per client address (the per-client cap)
        self.per_client: dict[bytes, int] = {}

    def protocol_factory(self) -> ClientConnection:
        return ClientConnection(self)

    async def start(
        self,
        host: str,
        port: int,
        ssl: SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
    ) -> None:
        """Listen; with `ssl`, connections reach the protocol only once their TLS handshake
        is done (within `ssl_handshake_timeout`: a slow handshake is a slowloris too)."""
        self.server = await self.loop.create_server(
            self.protocol_factory,
            host,
            port,
            reuse_address=True,
            backlog=4096,
            ssl=ssl,
            ssl_handshake_timeout=ssl_handshake_timeout if ssl is not None else None,
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        # uvloop's Server.sockets is a list where typeshed says tuple: unchecked
        return int(cast(Any, self.server).sockets[0].getsockname()[1])

    def client_error(self, reason: str) -> None:
        child = self._client_errors.get(reason)
        if child is None:
            child = self._client_errors[reason] = self.runtime.metrics.client_errors.labels(
                self.runtime.name, reason
            )
        child.inc()

    # --- deadlines -------------------------------------------------------------------------

    def watch(self, exchange: Exchange) -> None:
        self._watched.add(exchange)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(DEADLINE_TICK, self._sweep)

    def unwatch(self, exchange: Exchange) -> None:
        self._watched.discard(exchange)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        for exchange in list(self._watched):
            if not exchange.finished and (
                exchange.deadline <= now
                or (exchange.header_deadline and exchange.header_deadline <= now)
            ):
                exchange.check_deadlines(now)
        if self._watched:
            self._sweeper = self.loop.call_later(DEADLINE_TICK, self._sweep)

    # --- connections -----------------------------------------------------------------------

    def _added(self, conn: ClientConnection) -> SidecarError | None:
        """Count a new connection in; the reason it must be refused, if it is over a cap."""
        self.connections.add(conn)
        self._closed_event.clear()
        self._conn_gauge.inc()
        per_client = self.per_client
        count = per_client[conn.peer_ip] = per_client.get(conn.peer_ip, 0) + 1
        limits = self.runtime.clients
        if len(self.connections) > limits.max_connections:
            return ConnectionLimit(
                f"listener {self.runtime.name!r} is at its limit of {limits.max_connections} "
                "connections"
            )
        if 0 < limits.max_connections_per_client < count:
            return ConnectionLimit(
                f"this client address is at its limit of {limits.max_connections_per_client} "
                f"connections to listener {self.runtime.name!r}"
            )
        return None

    def _removed(self, conn: ClientConnection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self._conn_gauge.dec()
        per_client = self.per_client
        left = per_client.get(conn.peer_ip, 1) - 1
        if left:
            per_client[conn.peer_ip] = left
        else:
            per_client.pop(conn.peer_ip, None)
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


def _piece(data: bytes, at: int, end: int) -> bytes | memoryview:
    return data if at == 0 and end == len(data) else memoryview(data)[at:end]


class _OfferBody:
    """llhttp callbacks for the body of a request that offered HTTP/2: the body goes to the
    connection as any body does, and once it is complete the connection's own parser (at
    the start of the next request) takes over again."""

    def __init__(self, conn: ClientConnection, resume: httptools.HttpRequestParser) -> None:
        self.conn = conn
        self.resume = resume
        self.on_body = conn.on_body

    def on_message_complete(self) -> None:
        self.conn.parser = self.resume
        self.conn.on_message_complete()


class ClientConnection(asyncio.Protocol):
    """One downstream connection: parsing, limits, and exchanges in order."""

    #: (see downstream.Downstream) an HTTP/1.1 request body is never a conversation
    streaming = False

    def __init__(self, listener: ProxyListener) -> None:
        self.listener = listener
        self.loop = listener.loop
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
        #: request heads received on this connection
        self.requests = 0
        self.parsing: Exchange | None = None
        self.active: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.paused = 0
        self.write_paused = False
        #: the response being rendered: bytes not yet written, and whether it is chunked
        self.out: list[bytes] | None = None
        self.chunked = False
        self.write_timer: asyncio.TimerHandle | None = None
        self.write_seen = 0
        self.closing = False
        self.idle_since = self.loop.time()
        self.keepalive_timer: asyncio.TimerHandle | None = None
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.body_seen = 0
        #: body bytes delivered, and bytes of chunk framing, extensions and trailers, in the
        #: current request
        self.body_bytes = 0
        self.body_overhead = 0
        self.trailer_count = 0
        #: times reading resumed after we paused it; a client timer that spans one gives
        #: the client a fresh period instead of blaming it for our pause
        self.resumes = 0
        self.timer_resumes = 0
        #: the last bytes of a read that ended inside a head (its blank line may straddle)
        self.head_tail = b""
        #: while a piece of a body is parsed: a chunked message that ended in it (its body
        #: bytes and earlier overhead), whose body_complete waits for the overhead check
        self.feeding_body = False
        self.ended: tuple[Exchange, int, int] | None = None
        #: the request being parsed offered HTTP/2 (`Upgrade: h2c`), and its exchange when
        #: a body follows (see _serve_h2c_offer)
        self.h2c_offer = False
        self.h2c_body: Exchange | None = None
        #: the connection ends with a lingering close: a request was refused, or answered
        #: before its body was all read (the client may still be sending it)
        self.linger_close = False
        #: a refusal that waits for the requests received before it to be answered
        self.refusal: SidecarError | None = None
        #: a request asked to close the connection: nothing after it is read
        self.last_request = False
        #: the connection speaks HTTP/2 (it began with the preface); bytes of a preface
        #: still incomplete
        self.h2: H2Downstream | None = None
        self.h2_buf = b""
        self.lingering = False
        self.linger_left = 0
        self.linger_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = str(peer[0]).encode("latin-1")
        over = self.listener._added(self)
        if self.listener.draining:
            self.closing = True
            transport.close()
            return
        if over is not None:
            # answered before anything is read, so it costs no parsing; the client may
            # retry (another replica, or this one once connections close)
            self.listener.client_error("connection_limit")
            self.closing = True
            self.write_error(over, close=True)
            transport.close()
            return
        timeouts = self.runtime.timeouts
        self.keepalive_timer = self.loop.call_later(timeouts.keepalive, self._check_keepalive)
        # the first request head is due within header_read of the accept: a connection that
        # sends nothing is not kept for the whole keep-alive time
        self.header_timer = self.loop.call_later(timeouts.header_read, self._on_header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.h2 is not None:
            self.h2.data_received(data)
            return
        if self.closing or self.refusal is not None:
            if self.lingering:
                self.linger_left -= len(data)
                if self.linger_left <= 0:
                    self.abort()
            return
        if self.last_request and self.parsing is None:
            return  # after a request with `Connection: close` nothing more is read
        if self.head is not None:
            self._feed_from_head(data, 0)
        elif self.parsing is not None:
            self._feed_body(data, 0)
        elif self.requests == 0 and (self.h2_buf or data[:1] == b"P") and self._maybe_h2(data):
            return
        elif data.find(b"\r\n\r\n") == len(data) - 4:
            # the usual read: one whole head and nothing after it, so nothing to split
            self._feed(data, head=True)
        else:
            self._feed_from_head(data, 0)
        if self.closing:
            return
        if self.head is not None:
            # the read ended inside a request head
            limit = self.runtime.limits.header_bytes
            if self.head_bytes > limit:
                self._refuse(HeadersTooLarge(f"request head exceeds {limit} bytes"), "head_limit")
            elif self.header_timer is None:
                self.timer_resumes = self.resumes
                self.header_timer = self.loop.call_later(
                    self.runtime.timeouts.header_read, self._on_header_timeout
                )
        elif self.parsing is not None and self.body_timer is None and not self.closing:
            # the read ended inside a request body
            self.body_seen = self.body_bytes
            self.timer_resumes = self.resumes
            self.body_timer = self.loop.call_later(self._body_window(), self._check_body_idle)

    def _maybe_h2(self, data: bytes) -> bool:
        """The first bytes of a connection: the HTTP/2 preface (prior knowledge) hands the
        connection to HTTP/2. True when `data` was taken (as HTTP/2, or kept until the
        preface is complete); False: it is HTTP/1.1."""
        buf = self.h2_buf + data
        n = min(len(buf), len(PREFACE))
        if buf[:n] != PREFACE[:n]:
            if not self.h2_buf:
                return False
            self.h2_buf = b""
            self.data_received(buf)
            return True
        if len(buf) < len(PREFACE):
            self.h2_buf = buf
            return True
        self.h2_buf = b""
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        # imported here: the h2 library is loaded only once a client speaks HTTP/2
        from sidecar.proxy.h2_downstream import H2Downstream

        self.h2 = H2Downstream(self, self.runtime.clients.max_concurrent_streams)
        self.h2.data_received(buf)
        return True

    def _feed_from_head(self, data: bytes, at: int) -> None:
        """Parse `data[at:]`, which starts at (or inside) a request head. Each head is fed
        alone, up to its blank line, so that a body following it in the same read is fed as
        one (and its chunk framing, extensions and trailers are bounded from its first
        byte)."""
        size = len(data)
        # (a connection that is closing, its last answer decided, reads no further request:
        # one pipelined after a refused request's body must never start, however the close
        # goes on, at once or lingering)
        while at < size and not self.last_request and not self.closing:
            end = self._head_end(data, at)
            cut = size if end == -1 else end
            if not self._feed(_piece(data, at, cut), head=True):
                return
            at = cut
            if self.head is not None:
                if at == size:  # the read ended inside this head
                    self.head_tail = data[-3:]
                    return
            elif self.parsing is not None and at < size:
                self._feed_body(data, at)
                return

    def _head_end(self, data: bytes, at: int) -> int:
        """The offset just past the blank line ending the head that starts (or goes on) at
        `at`, or -1. A head's first CRLFCRLF is its end (CR and LF appear in no field); a
        wrong guess would only misplace a split, which llhttp does not notice."""
        tail = self.head_tail if at == 0 and self.head is not None else b""
        if tail:
            found = (tail + data[:3]).find(b"\r\n\r\n")
            if found != -1:
                return found + 4 - len(tail)
        found = data.find(b"\r\n\r\n", at)
        return -1 if found == -1 else found + 4

    def _feed_body(self, data: bytes, at: int) -> None:
        """Parse `data[at:]`, which starts inside a request body, in pieces that end where
        the message may end: after its Content-Length, or at a CRLFCRLF of a chunked body
        (the last chunk and the trailers end with one). So a message that ends in this read
        ends at a piece's end, its framing overhead is exact, and what follows is parsed as
        the next head."""
        size = len(data)
        while at < size:
            exchange = self.parsing
            if exchange is None:
                self._feed_from_head(data, at)
                return
            head = exchange.head
            if head.chunked:
                found = data.find(b"\r\n\r\n", at)
                cut = size if found == -1 else found + 4
            else:
                remaining = int(head.content_length or b"0") - self.body_bytes
                cut = min(size, at + max(remaining, 1))
            before = self.body_bytes
            self.feeding_body = True
            try:
                fed = self._feed(_piece(data, at, cut), head=False)
            finally:
                self.feeding_body = False
                ended, self.ended = self.ended, None
            if not fed:
                return
            if ended is not None:
                # a chunked message ended with this piece: its overhead is exact now, and its
                # body completes only once that is checked
                exchange, body_bytes, earlier = ended
                overhead = earlier + cut - at - (body_bytes - before)
                if self._check_overhead(overhead, body_bytes, exchange):
                    return
                exchange.body_complete()
            elif self.parsing is not None:
                self.body_overhead += cut - at - (self.body_bytes - before)
                if self._check_overhead(self.body_overhead, self.body_bytes, None):
                    return
            at = cut

    def _check_overhead(self, overhead: int, body_bytes: int, ended: Exchange | None) -> bool:
        """Chunk-size lines, extensions and trailers are bounded by the head limit plus an
        eighth of the body (llhttp skips extensions and httptools buffers a trailer whole, so
        they are counted here). True when the request was refused."""
        limit = self.runtime.limits.header_bytes
        if overhead <= limit + body_bytes // 8:
            return False
        if ended is not None:
            self.parsing = ended  # its body never completed: the upstream attempt is abandoned
        if self.trailer_count:
            err: SidecarError = HeadersTooLarge(f"request trailers exceed {limit} bytes")
        else:
            err = PayloadTooLarge(f"chunk extensions exceed {limit} bytes")
        self._refuse(err, "head_limit")
        return True

    def _feed(self, data: bytes | memoryview, *, head: bool) -> bool:
        """Feed llhttp; False when the request was refused."""
        if head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self.h2c_offer:
                self._serve_h2c_offer()
                return True
            self._refuse(
                NotImplementedByProxy(
                    "protocol upgrades (WebSocket) and CONNECT are not supported by this listener"
                ),
                "upgrade",
            )
            return False
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, SidecarError):
                self._refuse(cause, "head_limit" if cause.status == 431 else "bad_request")
            else:
                log.error("proxy callback failed", exc_info=cause)
                self._refuse(SidecarError("internal error"), "internal")
            return False
        except httptools.HttpParserError as exc:
            self._refuse(BadRequest(f"malformed HTTP request: {exc}"), "malformed")
            return False
        return True

    def _serve_h2c_offer(self) -> None:
        """After the head of an ignored HTTP/2 upgrade offer. httptools has already resumed
        its parser, which expects the next request; a body (Java's RestClient sends
        `Upgrade: h2c` on POSTs, often chunked) is parsed by a parser of its own, given the
        same framing, until it completes (uvicorn and httptools#124 lost such bodies)."""
        self.h2c_offer = False
        exchange, self.h2c_body = self.h2c_body, None
        if exchange is None:
            return
        head = exchange.head
        framing = (
            b"Transfer-Encoding: chunked\r\n"
            if head.chunked
            else b"Content-Length: %s\r\n" % (head.content_length or b"0")
        )
        body_parser = httptools.HttpRequestParser(_OfferBody(self, self.parser))
        body_parser.feed_data(b"POST / HTTP/1.1\r\nHost: h2c\r\n" + framing + b"\r\n")
        self.parser = body_parser
        self.parsing = exchange

    def eof_received(self) -> bool | None:
        if self.h2 is not None:
            return False  # every stream still open is abandoned (connection_lost)
        active = self.active
        if self.lingering or active is None:
            return False
        if active.answer_started():
            # the answer is under way: send the rest of it, then close
            self.closing = True
            return True
        # The client went away before its answer began (Go's net/http, curl and most clients
        # close with a FIN when they give up): abandon the exchange, as nginx does with
        # proxy_ignore_client_abort off. A client that half-closes and still waits for its
        # answer is too rare to let every abandoned request run on.
        self.closing = True
        self._client_gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_timers()
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = None
        self.listener._removed(self)
        if self.h2 is not None:
            self.h2.connection_lost()
        self._client_gone()

    def _client_gone(self) -> None:
        """The client left: the exchange in progress is abandoned (its upstream request
        aborted at once), pipelined requests behind it are dropped."""
        self.parsing = None
        for ex in self.queue:
            ex.finished = True
        self.queue.clear()
        active, self.active = self.active, None
        if active is not None and not active.finished:
            self.listener.aborts.inc()
            active.client_gone()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.active is not None:
            self.active.pause_upstream_reading()
        elif self.h2 is not None:
            self.h2.pause_writing()
        if self.runtime.clients.min_rate_bytes and self.write_timer is None:
            self._arm_write_timer()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None
        if self.active is not None:
            self.active.resume_upstream_reading()
        elif self.h2 is not None:
            self.h2.resume_writing()

    def _arm_write_timer(self) -> None:
        assert self.transport is not None
        self.write_seen = self.transport.get_write_buffer_size()
        self.write_timer = self.loop.call_later(
            self.runtime.clients.min_rate_window, self._check_write_progress
        )

    def _check_write_progress(self) -> None:
        """While the client's socket is full, it must read at least `min_rate_bytes` per
        window (nginx's send_timeout, as a rate): a slow reader would otherwise hold the
        upstream connection its response comes from for as long as it likes."""
        self.write_timer = None
        transport = self.transport
        if not self.write_paused or transport is None or transport.is_closing():
            return
        drained = self.write_seen - transport.get_write_buffer_size()
        if drained >= self.runtime.clients.min_rate_bytes:
            self._arm_write_timer()
            return
        self.listener.client_error("slow_read")
        self.abort()  # connection_lost abandons the exchange and frees its upstream

    # --- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # each request takes the config in force when it begins, and keeps it to the end
        self.runtime = self.listener.runtime
        self.head = h.RequestHead(headers=[])
        self.head_tail = b""
        self.header_count = 0
        self.head_size = 0

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
        limits = self.runtime.limits
        if head is None:
            # chunked trailers: never forwarded, but held to the head's limits
            self.trailer_count += 1
            if self.trailer_count > limits.header_count:
                raise HeadersTooLarge(f"more than {limits.header_count} trailer fields")
            if len(name) + len(value) > limits.header_field:
                raise HeadersTooLarge(f"a trailer field exceeds {limits.header_field} bytes")
            return
        self.header_count += 1
        if self.header_count > limits.header_count:
            raise HeadersTooLarge(f"request has more than {limits.header_count} header fields")
        size = len(name) + len(value)
        if size > limits.header_field:
            raise HeadersTooLarge(
                f"header field {name[:64].decode('latin-1')!r} exceeds {limits.header_field} bytes"
            )
        self.head_size += size + 4
        if self.head_size > limits.header_bytes:
            raise HeadersTooLarge(f"request head exceeds {limits.header_bytes} bytes")
        head.add(name, value, self.runtime.classifier[name.lower()])  # h.Classifier

    def on_headers_complete(self) -> None:
        head = self.head
        assert head is not None
        self.head = None
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        parser = self.parser
        if parser.should_upgrade():
            if not head.offers_h2c or parser.get_method() == b"CONNECT":
                return  # feed_data raises HttpParserUpgrade next: refused there
            # An HTTP/2 upgrade offer: served as HTTP/1.1, the offer ignored (never
            # forwarded: Upgrade and the Connection-listed HTTP2-Settings are hop-by-hop).
            # llhttp skips the body of an upgrade and raises next: _serve_h2c_offer
            # parses the body then.
            self.h2c_offer = True
        if head.unsupported_te is not None and (problem := head.te_problem()) is not None:
            raise problem
        head.method = parser.get_method()
        head.keep_alive = parser.should_keep_alive()
        if not head.keep_alive:
            # nothing after this request (its body aside) is read
            self.last_request = True
        if head.keep_alive and head.connection_tokens is None:
            # llhttp keeps a connection alive without a Connection header asking for it only
            # for a version with a major and a minor above 0, and the only such version it
            # accepts is 1.1: the version string (built by str.format on every call, 4% of a
            # request's instructions) is needed only otherwise
            version = "1.1"
        else:
            version = parser.get_http_version()
        if version != "1.1":
            if version != "1.0":  # llhttp takes 0.9 and 2.0 request lines: we do not
                raise VersionNotSupported(f"HTTP/{version} is not supported (1.1 and 1.0 are)")
            head.http_minor = 0
            if head.chunked:  # RFC 9112 §6.1: faulty framing on 1.0
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        if head.host_count > 1:
            raise BadRequest("request carries more than one Host header")
        if head.host is None or head.host == b"":
            if version == "1.1":  # RFC 9112 §3.2
                raise BadRequest("HTTP/1.1 request without a Host header")
        elif not h.valid_host(head.host):
            raise BadRequest("invalid Host header")
        self.requests += 1
        exchange = Exchange(self, head, self.runtime)
        if head.has_body:
            if self.h2c_offer:
                self.h2c_body = exchange  # its body is parsed once llhttp lets go
            else:
                self.parsing = exchange
        if self.active is None:
            self.active = exchange
            exchange.start()
        else:
            self.queue.append(exchange)
            self.pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        exchange = self.parsing
        if exchange is not None:
            exchange.feed_body(body)

    def on_message_complete(self) -> None:
        exchange, self.parsing = self.parsing, None
        if self.feeding_body and exchange is not None and exchange.head.chunked:
            # it ended in the piece being fed: complete it once the overhead is checked
            self.ended = (exchange, self.body_bytes, self.body_overhead)
            exchange = None
        self.head_bytes = 0
        self.body_bytes = 0
        self.body_overhead = 0
        self.trailer_count = 0
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        if exchange is not None:
            exchange.body_complete()

    # --- exchanges ---------------------------------------------------------------------------

    def exchange_finished(self, exchange: Exchange, keep_alive: bool) -> None:
        if self.active is not exchange:
            return
        self.active = None
        if not keep_alive or self.closing or self.listener.draining:
            if not exchange.body_done:
                # answered before its body was all read: closed at once, the unread bytes
                # would make the kernel reset the connection, and the reset can destroy the
                # answer before the client reads it
                self.linger_close = True
            self._close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if not self.queue:
                self.resume(PAUSE_PIPELINE)
            self.active = nxt
            nxt.start()
        elif self.refusal is not None:
            # every request received before the refused one is answered: now the refusal
            err, self.refusal = self.refusal, None
            self.closing = True
            self.linger_close = True
            self.write_error(err, close=True)
            self._close()
        elif self.last_request:
            self._close()
        else:
            self.idle_since = self.loop.time()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing() and not self.lingering:
            transport.write(data)

    # --- the downstream side of an exchange: its response, rendered as HTTP/1.1 ------------
    # (what an exchange needs from "the client side"; an HTTP/2 stream offers the same)

    def send_continue(self) -> None:
        self.write(_CONTINUE)

    def response_head(
        self,
        exchange: Exchange,
        status: int,
        headers: list[tuple[bytes, bytes]],
        content_length: bytes | None,
    ) -> None:
        # the reason phrase is ours (as Envoy does): it carries no meaning
        out = [h.status_line(status)]
        for name, value in headers:
            out += (name, b": ", value, _CRLF)
        head = exchange.head
        self.chunked = False
        if status in _NO_BODY_STATUS or head.method == b"HEAD":
            if content_length is not None and status != 204:
                out += (b"content-length: ", content_length, _CRLF)
        elif content_length is not None:
            out += (b"content-length: ", content_length, _CRLF)
        elif head.http_minor == 1:
            self.chunked = True
            out.append(b"transfer-encoding: chunked\r\n")
        else:
            # an HTTP/1.0 client: the end of the body is the end of the connection
            exchange.resp_close = True
        if (
            not exchange.keep_client
            or exchange.resp_close
            or not exchange.body_done
            or self.closing
            or self.listener.draining
        ):
            # (answered before the request's body was all read: where the next request
            # would begin is unknown, so the connection closes, and says so, as Envoy does)
            exchange.resp_close = True
            out.append(b"connection: close\r\n")
        elif head.http_minor == 0:
            # HTTP/1.0 keep-alive (ab -k): the client closes unless told the connection stays
            out.append(b"connection: keep-alive\r\n")
        out.append(_CRLF)
        self.out = [b"".join(out)]

    def response_data(self, exchange: Exchange, data: bytes) -> None:
        out = self.out
        if out is None:
            out = self.out = []
        if self.chunked:
            out += (b"%x\r\n" % len(data), data, _CRLF)
        else:
            out.append(data)

    def response_end(self, exchange: Exchange, trailers: list[tuple[bytes, bytes]] | None) -> None:
        # trailers are not relayed to HTTP/1.1 clients (nothing they would act on)
        if self.chunked:
            self.chunked = False
            if self.out is None:
                self.out = [_LAST_CHUNK]
            else:
                self.out.append(_LAST_CHUNK)

    def flush(self) -> None:
        """Write what the exchange produced in this event-loop step, in one call."""
        out = self.out
        if out:
            self.out = None
            self.write(out[0] if len(out) == 1 else b"".join(out))

    def abort_exchange(self, exchange: Exchange) -> None:
        """The response is under way and cannot be finished: the only honest signal left on
        HTTP/1.1 is an aborted connection."""
        self.out = None
        self.abort()

    # --- flow control ------------------------------------------------------------------------

    def upstream_full(self) -> bool:
        """Reading is paused because the upstream does not take the body as fast."""
        return bool(self.paused & PAUSE_UPSTREAM_FULL)

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if (
            not self.paused
            and self.refusal is None
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.resumes += 1
            self.transport.resume_reading()

    # --- timers ------------------------------------------------------------------------------

    def _check_keepalive(self) -> None:
        limit = self.runtime.timeouts.keepalive
        if (
            self.active is None
            and self.parsing is None
            and self.head is None
            and (self.h2 is None or not self.h2.streams)
        ):
            idle = self.loop.time() - self.idle_since
            if idle >= limit:
                self.keepalive_timer = None
                self._close()
                return
            delay = limit - idle
        else:
            delay = limit
        self.keepalive_timer = self.loop.call_later(delay, self._check_keepalive)

    def _on_header_timeout(self) -> None:
        self.header_timer = None
        if self.head is not None and (self.paused or self.resumes != self.timer_resumes):
            # we stopped reading (a pipelined head waits its turn): not the client's stall
            self.timer_resumes = self.resumes
            self.header_timer = self.loop.call_later(
                self.runtime.timeouts.header_read, self._on_header_timeout
            )
            return
        if self.head is not None:
            self._refuse(
                RequestTimeout(
                    "request head not received within "
                    f"{format_duration(self.runtime.timeouts.header_read)}"
                ),
                "header_timeout",
            )
        elif self.requests == 0 and self.active is None and self.parsing is None:
            # connected and sent nothing at all: close quietly (as nginx does), freeing
            # the descriptor an idle-connection flood would pile up
            self.listener.client_error("idle_timeout")
            self._close()

    def _body_window(self) -> float:
        clients = self.runtime.clients
        if clients.min_rate_bytes:
            return clients.min_rate_window
        return self.runtime.timeouts.body_idle

    def _check_body_idle(self) -> None:
        """Every window while a body is incomplete: the client must have sent at least
        `min_rate_bytes` in it (or anything at all, within `body_idle`, with no rate)."""
        self.body_timer = None
        exchange = self.parsing
        if exchange is None or self.closing:
            return
        clients = self.runtime.clients
        need = clients.min_rate_bytes or 1
        if (
            self.body_bytes - self.body_seen >= need
            or self.paused
            or self.resumes != self.timer_resumes
        ):
            # fast enough, or held back by us (back-pressure, pipelining), not the client
            self.body_seen = self.body_bytes
            self.timer_resumes = self.resumes
            self.body_timer = self.loop.call_later(self._body_window(), self._check_body_idle)
            return
        self.listener.client_error("body_timeout")
        self.parsing = None
        if clients.min_rate_bytes:
            err = RequestTimeout(
                f"request body slower than {clients.min_rate_bytes} bytes per "
                f"{format_duration(clients.min_rate_window)}"
            )
        else:
            err = body_timeout(self.runtime.timeouts.body_idle)
        exchange.abort_request(err)
        self._close()

    def _cancel_timers(self) -> None:
        for timer in (self.keepalive_timer, self.header_timer, self.body_timer, self.write_timer):
            if timer is not None:
                timer.cancel()
        self.keepalive_timer = self.header_timer = self.body_timer = self.write_timer = None

    # --- endings -----------------------------------------------------------------------------

    def _refuse(self, err: SidecarError, reason: str) -> None:
        """Answer a request that cannot be parsed or framed, and close: after a framing error
        the byte stream cannot be trusted, so nothing else is read from it."""
        self.listener.client_error(reason)
        self._cancel_timers()
        transport = self.transport
        parsing, self.parsing = self.parsing, None
        if transport is None or transport.is_closing() or self.active in (None, parsing):
            self.closing = True
            self.linger_close = True
            if transport is None or transport.is_closing():
                return
            if parsing is not None:
                # the body being forwarded is corrupt: abandon the upstream attempt too
                parsing.abort_request(err)
            else:
                self.write_error(err, close=True)
            self._close()
            return
        # requests received whole before this one are still being answered: answer them,
        # then this refusal, then close (RFC 9112 §9.3.2); nothing more is read
        if parsing is not None:
            # a pipelined request whose body is corrupt: it is never started
            self.queue.remove(parsing)
            parsing.finished = True
        self.refusal = err
        transport.pause_reading()

    def write_error(
        self, err: SidecarError, close: bool, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
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
        for name, value in extra or ():
            parts += [name, b": ", value, _CRLF]
        if close:
            parts.append(b"connection: close\r\n")
        elif (active := self.active) is not None and active.head.http_minor == 0:
            parts.append(b"connection: keep-alive\r\n")
        parts += [_CRLF, body]
        self.write(b"".join(parts))

    def drain(self) -> None:
        """Graceful shutdown: idle connections close now, busy ones after their response."""
        if self.h2 is not None:
            self.closing = True
            self.h2.drain()  # GOAWAY: streams in flight finish, then it closes
        elif self.active is None and self.parsing is None:
            self._close()
        else:
            self.closing = True

    def _close(self) -> None:
        if self.lingering:
            return
        self.closing = True
        self._cancel_timers()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.linger_close:
            transport.close()
        elif self.active is None:  # (else its answer goes first; exchange_finished closes)
            self._linger(transport)

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close after a refusal the way nginx does: send the answer and a FIN, then read and
        discard what the client still sends, for a while, before closing. Closing at once
        with its input unread makes the kernel answer with a reset, which can destroy our
        error response before the client has read it."""
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()
            return
        self.lingering = True
        self.linger_left = LINGER_BYTES
        transport.resume_reading()
        self.linger_timer = self.loop.call_later(LINGER_SECONDS, transport.close)

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()
