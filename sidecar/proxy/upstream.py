"""Clusters: one keep-alive connection pool per upstream host, and the upstream connection.

A `Cluster` owns its pool bookkeeping (synchronous: idle stack, open count, FIFO of waiters)
and opens connections with the connect timeout; an `UpstreamConnection` is an asyncio
Protocol that parses one response at a time with llhttp and hands each event to the
`ResponseSink` (the exchange) that currently owns it. Foreign errors (OSError, SSL, parser)
are translated here into the sidecar's own.

A response head is checked before the exchange sees it, as a request head is by the
listener: its status is 100-599 (a final one 200-599; 101 and other protocol switches are
refused: this proxy carries HTTP only), its transfer coding is a single `chunked` or none
(the exchange re-frames the body, so any other coding would reach the client unlabelled),
and its size and field count are within the upstream's `response_limits`. A refused head is
502 UPSTREAM_UNAVAILABLE, saying why, and the connection is closed.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any, Final, Protocol, cast
from urllib.parse import urlsplit

import httptools

from sidecar.compiled import mypyc_attr
from sidecar.config import ClusterConfig, format_duration
from sidecar.errors import PoolExhausted, SidecarError, UpstreamTimeout, UpstreamUnavailable
from sidecar.proxy.limits import HeadLimits

if TYPE_CHECKING:
    from sidecar.metrics import Metrics
    from sidecar.proxy.exchange import Exchange

_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
#: the retry budget never drops below this many concurrent retries
_MIN_RETRY_CONCURRENCY: Final = 3


_CRLF: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + _CRLF


def is_idempotent(method: bytes) -> bool:
    return method in _IDEMPOTENT


class StreamRefused(Exception):
    """The upstream said it never processed the request: an HTTP/2 GOAWAY whose last stream
    id is below the request's stream, or a REFUSED_STREAM reset. Such a request may be sent
    again whatever its method (RFC 9113 section 8.7), unlike one lost on a connection that
    closed, which the upstream may have acted on. Not a SidecarError: the exchange decides
    whether it can go again (its body must still be at hand) before it becomes a 502."""

    def __init__(self, message: str, *, progress: bool = False) -> None:
        super().__init__(message)
        #: the connection served other streams before it refused this one (a GOAWAY at a
        #: server's per-connection limit): going again costs no attempt, as every such
        #: refusal comes with requests served
        self.progress = progress


class ResponseSink(Protocol):
    """What an upstream connection reports to the exchange that owns it."""

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        """Takes the response head; True when its body is framed (length or chunked)."""
        ...

    def on_response_body(self, data: bytes) -> None: ...
    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None: ...
    def on_response_complete(self) -> None: ...
    def flush(self) -> None: ...
    def on_upstream_lost(self, exc: Exception | None, got_bytes: bool) -> None: ...
    def on_upstream_pause_writing(self) -> None: ...
    def on_upstream_resume_writing(self) -> None: ...


class Upstream(Protocol):
    """What an exchange holds for one attempt: an HTTP/1.1 `UpstreamConnection`, or a stream
    of an HTTP/2 connection (h2_upstream.H2UpstreamStream). A Protocol, not the HTTP/1.1
    class: when this module is compiled by mypyc, values typed with a class are checked at
    run time, and H2Cluster hands out its streams through the same Cluster methods."""

    cluster: Cluster
    response_done: bool

    def attach(self, sink: ResponseSink, head_request: bool) -> None: ...
    def send_request(self, exchange: Exchange, body: list[bytes] | None) -> None: ...
    def send_body(self, data: bytes, chunked: bool) -> None: ...
    def end_body(self, chunked: bool) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def abort(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream host, carrying one exchange at a time."""

    __slots__ = (
        "cluster",
        "transport",
        "parser",
        "sink",
        "idle_since",
        "reusable",
        "got_bytes",
        "_headers",
        "_te_seen",
        "_fresh_parser",
        "_closed",
        "expect_no_body",
        "response_done",
        "_eof_body",
        "_complete_pending",
        "counted",
        "_in_head",
        "_head_read",
        "_head_size",
        "_head_count",
    )

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.idle_since = 0.0
        self.reusable = True
        self.got_bytes = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._closed = False
        #: the request was HEAD: llhttp cannot be told to skip the body, so the response
        #: ends at its head (and the next one is parsed afresh: _fresh_parser)
        self.expect_no_body = False
        self.response_done = False
        self._eof_body = False
        #: the response ended during this read: tell the sink once the read is parsed, so
        #: that it never re-uses the connection from inside the parser's own callback
        self._complete_pending = False
        #: counted in the cluster's open connections (until connection_lost)
        self.counted = True
        #: a response head is awaited or being parsed; bytes read meanwhile, and the size
        #: and number of its fields so far (checked against cluster.response_limits)
        self._in_head = False
        self._head_read = 0
        self._head_size = 0
        self._head_count = 0
        #: the response head being parsed has a Transfer-Encoding field (checked once the
        #: head is complete; most responses have none, and then nothing is scanned)
        self._te_seen = False
        #: a HEAD answer's head was parsed: the next answer starts on a new parser
        self._fresh_parser = False

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # bytes on an idle connection: the upstream is misbehaving; never reuse it
            self.close()
            return
        self.got_bytes = True
        in_head = self._in_head
        if in_head:
            self._head_read += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._refuse(sink, cause if isinstance(cause, SidecarError) else f"{exc}")
            return
        except httptools.HttpParserError as exc:
            self._refuse(sink, f"{exc}")
            return
        except httptools.HttpParserUpgrade:
            self._refuse(
                sink, "a protocol switch (Upgrade/CONNECT), which this proxy does not carry"
            )
            return
        if self._fresh_parser:
            # llhttp, not knowing the request was HEAD, waits for the body its
            # Content-Length announced; the connection's next answer is parsed afresh
            self._fresh_parser = False
            self.parser = httptools.HttpResponseParser(self)
        if self._in_head and self._head_read > self.cluster.response_limits.header_bytes:
            # one endless field: llhttp accumulates it before calling on_header
            self._refuse(
                sink,
                f"a response head over {self.cluster.response_limits.header_bytes} bytes "
                "(response_limits)",
            )
            return
        if self._complete_pending:
            self._complete_pending = False
            sink.on_response_complete()  # flushes what this read produced, then ends
        else:
            sink.flush()

    def _refuse(self, sink: ResponseSink, why: SidecarError | str) -> None:
        """The response cannot be passed on: close, and fail the exchange with a 502."""
        self.sink = None
        self.close()
        if isinstance(why, str):
            why = UpstreamUnavailable(
                f"upstream {self.cluster.name!r} sent an invalid response: {why}"
            )
        sink.on_upstream_lost(why, True)

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.cluster._forget(self)
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self._eof_body and not self.response_done:
            # a response delimited by connection close ends here (httptools exposes no
            # llhttp_finish, so the parser cannot say it itself)
            self.response_done = True
            sink.on_response_complete()
            return
        sink.on_upstream_lost(exc, self.got_bytes)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_pause_writing()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.on_upstream_resume_writing()

    # --- llhttp callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._head_size = 0
        self._head_count = 0
        self._te_seen = False

    def on_status(self, reason: bytes) -> None:
        self._head_size += len(reason)
        limits = self.cluster.response_limits
        if self._head_size > limits.request_line:
            raise self._invalid(f"a status line over {limits.request_line} bytes (response_limits)")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.cluster.response_limits
        self._head_count += 1
        if self._head_count > limits.header_count:
            raise self._invalid(f"more than {limits.header_count} header fields (response_limits)")
        size = len(name) + len(value)
        if size > limits.header_field:
            shown = name[:64].decode("latin-1")
            raise self._invalid(
                f"header field {shown!r} over {limits.header_field} bytes (response_limits)"
            )
        self._head_size += size + 4
        if self._head_size > limits.header_bytes:
            raise self._invalid(
                f"a response head over {limits.header_bytes} bytes (response_limits)"
            )
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            self._te_seen = True
        self._headers.append((name, value))

    def _invalid(self, why: str) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            f"upstream {self.cluster.name!r} sent an invalid response: {why}"
        )

    def on_headers_complete(self) -> None:
        if self.response_done:
            # a second response to one request: the stream cannot be trusted any more
            self.reusable = False
            self.sink = None
            return
        status = self.parser.get_status_code()
        if not 100 <= status <= 599:
            # (llhttp takes any three digits: `099` would go out as `HTTP/1.1 99`)
            raise self._invalid(f"status {status:03d} (a status is 100-599)")
        if status == 101:
            raise self._invalid("101 Switching Protocols (this proxy carries HTTP only)")
        if status < 200:
            # interim responses (100 Continue, 103 Early Hints) are consumed here; the client
            # gets the final one (we answered its Expect ourselves)
            return
        self._in_head = False
        if self._te_seen and not (status == 204 or status == 304 or self.expect_no_body):
            problem = _transfer_coding_problem(self._headers)
            if problem is not None:
                raise self._invalid(problem)
        if self.expect_no_body:
            if not _head_answer_keeps_alive(self.parser.get_http_version(), self._headers):
                self.reusable = False
        elif not self.parser.should_keep_alive():
            self.reusable = False
        sink = self.sink
        if sink is None:
            self.reusable = False
            return
        # the sink reads the headers anyway: it says whether the body is framed (length or
        # chunked) or runs to the connection's close
        framed = sink.on_response_head(status, self._headers)
        body_allowed = not (status == 204 or status == 304 or self.expect_no_body)
        self._eof_body = body_allowed and not framed
        if self._eof_body:
            self.reusable = False
        if self.expect_no_body and not self.response_done:
            self._fresh_parser = True
            self.response_done = True
            self._complete_pending = True

    def on_body(self, body: bytes) -> None:
        if self.sink is not None and not self.response_done:
            self.sink.on_response_body(body)
        elif self.expect_no_body:
            # bytes after a HEAD answer's head: where its next answer begins is unknown
            self.reusable = False

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:
            self._in_head = True  # the final response's head is next
            return
        if self.response_done:
            return
        self.response_done = True
        self._complete_pending = True

    # --- used by the exchange ---------------------------------------------------------------

    def attach(self, sink: ResponseSink, head_request: bool) -> None:
        self.sink = sink
        self.got_bytes = False
        self.response_done = False
        self._eof_body = False
        self._complete_pending = False
        self.expect_no_body = head_request
        self._in_head = True
        self._head_read = 0

    def write(self, data: bytes) -> None:
        if not self._closed and self.transport is not None:
            self.transport.write(data)

    def send_request(self, exchange: Exchange, body: list[bytes] | None) -> None:
        """The request head the exchange rendered, and the body it buffered, in one write."""
        if not body:
            self.write(exchange.request_head)
        elif exchange.head.chunked:
            self.write(exchange.request_head + b"".join(map(_chunk, body)))
        else:
            self.write(exchange.request_head + b"".join(body))

    def send_body(self, data: bytes, chunked: bool) -> None:
        self.write(_chunk(data) if chunked else data)

    def end_body(self, chunked: bool) -> None:
        if chunked:
            self.write(_LAST_CHUNK)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    @property
    def usable(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self._closed:
            self.transport.close()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self._closed:
            self.transport.abort()


@mypyc_attr(native_class=False)
class PoolGauge:
    """A cluster as metrics.pools sees it. That collector holds pools by weak reference, which
    a class compiled by mypyc cannot take, so the cluster is represented there by this
    ordinary one, which it keeps (a cycle: the garbage collector frees the two together)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.name = cluster.name

    @property
    def in_use(self) -> int:
        return self.cluster.in_use

    @property
    def idle_count(self) -> int:
        return self.cluster.idle_count

    @property
    def waiting(self) -> int:
        return self.cluster.waiting


# h2_upstream.H2Cluster extends it (interpreted, when this module is compiled)
@mypyc_attr(allow_interpreted_subclasses=True)
class Cluster:
    """A pool of keep-alive connections to one upstream host."""

    #: speaks HTTP/2 (h2_upstream.H2Cluster): the exchange sends fields, not an HTTP/1 head.
    #: An instance attribute, set in __init__: compiled code reads a native class's
    #: attributes from the instance, where a subclass's class attribute is never seen
    h2: bool

    def __init__(
        self,
        name: str,
        cfg: ClusterConfig,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.name = name
        self.h2 = False
        self.cfg = cfg
        self._loop = loop or asyncio.get_running_loop()
        parts = urlsplit(cfg.url)
        assert parts.hostname is not None
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        #: https only: the context new connections use (sidecar/tls.py; replaced when its
        #: files are rotated) and the name they send as SNI and verify (default: the host)
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        self.server_name = server_name
        self.authority = parts.netloc.rpartition("@")[2].encode("latin-1")
        self.base_path = parts.path.rstrip("/").encode("latin-1")
        self.connect_timeout = cfg.timeouts.connect
        self.response_header_timeout = cfg.timeouts.response_header
        self.total_timeout = cfg.timeouts.total
        self.max_connections = cfg.pool.max_connections
        self.max_idle = cfg.pool.max_idle
        self.idle_timeout = cfg.pool.idle_timeout
        self.max_pending = cfg.pool.max_pending
        self.response_limits = HeadLimits(cfg.response_limits)
        self.retry_attempts = cfg.retries.attempts
        self.retry_ratio = cfg.retries.budget_ratio
        self._idle: deque[UpstreamConnection] = deque()
        self._open = 0  # connected or connecting
        self._in_use = 0
        self._waiters: deque[asyncio.Future[Upstream | None]] = deque()
        self.active_requests = 0
        self.active_retries = 0
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._gauge = PoolGauge(self)
        metrics.pools.add(self._gauge)
        self.m_exhausted = metrics.pool_exhausted.labels(name)
        self.m_retries = metrics.upstream_retries.labels(name)
        self._schedule_sweep()

    # --- pool bookkeeping (synchronous) -------------------------------------------------------

    def take_idle(self) -> Upstream | None:
        now = self._loop.time()
        while self._idle:
            conn = self._idle.pop()  # most recently used first: likeliest still alive
            if conn.usable and now - conn.idle_since < self.idle_timeout:
                self._in_use += 1
                return conn
            conn.close()
        return None

    def release(self, upstream: Upstream, reusable: bool) -> None:
        """Give a connection back after an exchange; reuse it only if it is clean."""
        conn = cast(UpstreamConnection, upstream)  # (H2Cluster overrides this)
        self._in_use -= 1
        conn.sink = None
        if not (reusable and conn.reusable and conn.usable) or self._closed:
            conn.close()
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self._in_use += 1
                fut.set_result(conn)
                return
        if len(self._idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self._loop.time()
        self._idle.append(conn)

    def _forget(self, conn: Any) -> None:
        """Called once per connection, from connection_lost. Any: H2Cluster passes its own
        connections here (typed, a compiled build would refuse them)."""
        if not conn.counted:
            return
        conn.counted = False
        self._open -= 1
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        self._wake_one()

    def _wake_one(self) -> None:
        # a slot freed up: let the oldest waiter open a connection of its own
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def _schedule_sweep(self) -> None:
        if not self._closed:
            self._sweeper = self._loop.call_later(
                max(0.05, min(self.idle_timeout / 2, 5.0)), self._sweep
            )

    def _sweep(self) -> None:
        now = self._loop.time()
        keep: deque[UpstreamConnection] = deque()
        for conn in self._idle:
            if conn.usable and now - conn.idle_since < self.idle_timeout:
                keep.append(conn)
            else:
                conn.close()
        self._idle = keep
        self._schedule_sweep()

    # --- acquisition --------------------------------------------------------------------------

    async def acquire(self, waiter_slot: list[asyncio.Future[Any] | None]) -> tuple[Upstream, bool]:
        """A connection for one attempt: (conn, reused). `waiter_slot[0]` is set to whatever
        this call is waiting on, so the exchange's timers can fail it."""
        while True:
            conn = self.take_idle()
            if conn is not None:
                return conn, True
            if self._open < self.max_connections:
                return await self._connect(waiter_slot), False
            if len(self._waiters) >= self.max_pending:
                self.m_exhausted.inc()
                raise PoolExhausted(
                    f"upstream {self.name!r}: all {self.max_connections} connections busy "
                    f"and {self.max_pending} requests already waiting"
                )
            fut: asyncio.Future[Upstream | None] = self._loop.create_future()
            self._waiters.append(fut)
            waiter_slot[0] = fut
            try:
                got = await fut
            except BaseException:
                # failed by the exchange's timer or cancelled: leave the queue now, so that
                # a dead waiter never counts against max_pending
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    # a connection was handed over just as we gave up: pass it on
                    conn = fut.result()
                    if conn is not None:
                        self.release(conn, True)
                raise
            finally:
                waiter_slot[0] = None
            if got is not None:
                return got, True
            # None: a slot was freed for us; loop round and connect

    def _new_connection(self) -> Any:
        return UpstreamConnection(self)

    async def _connect(
        self, waiter_slot: list[asyncio.Future[Any] | None], conn: Any = None
    ) -> Any:
        """Open a connection (`conn`, or a new one) and count it in; it comes back taken."""
        self._open += 1
        if conn is None:
            conn = self._new_connection()
        fut = self._loop.create_future()
        waiter_slot[0] = fut
        handle = self._loop.call_later(
            self.connect_timeout,
            _fail,
            fut,
            UpstreamTimeout(
                f"connect timeout ({format_duration(self.connect_timeout)}) to upstream "
                f"{self.name!r} at {self.host}:{self.port}",
                kind="connect",
            ),
        )
        task = self._loop.create_task(
            self._loop.create_connection(
                lambda: conn,
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.server_name if self.ssl is not None else None,
            )
        )
        task.add_done_callback(lambda t: _relay(t, fut))
        try:
            await fut
        except BaseException as exc:
            if task.done() and not task.cancelled() and task.exception() is None:
                # connected just as a timer fired: drop it; connection_lost accounts for it
                task.result()[0].close()
                raise
            task.cancel()
            # never connected: account here, and make a late connection_lost a no-op
            conn.counted = False
            self._open -= 1
            self._wake_one()
            # (our UpstreamTimeout is an asyncio.TimeoutError, an OSError since 3.11: keep it)
            if isinstance(exc, ssl.SSLError):
                # say why: an expired or untrusted certificate, a name that does not match
                why = getattr(exc, "verify_message", None) or exc.reason or str(exc)
                raise UpstreamUnavailable(
                    f"TLS handshake with upstream {self.name!r} at {self.host}:{self.port} "
                    f"failed: {why}"
                ) from None
            if isinstance(exc, OSError) and not isinstance(exc, SidecarError):
                raise UpstreamUnavailable(
                    f"cannot connect to upstream {self.name!r} at {self.host}:{self.port}: "
                    f"{exc.strerror or exc}"
                ) from None
            raise
        finally:
            handle.cancel()
            waiter_slot[0] = None
        self._in_use += 1
        return conn

    # --- retry budget ---------------------------------------------------------------------

    def may_retry(self) -> bool:
        budget = max(_MIN_RETRY_CONCURRENCY, int(self.active_requests * self.retry_ratio))
        return self.active_retries < budget

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop pooling: idle connections close now, busy ones when released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        while self._idle:
            self._idle.pop().close()


def _head_answer_keeps_alive(version: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the connection stays open after the answer to a HEAD request. llhttp, not
    told the request was HEAD, reads an answer without Content-Length as a body running to
    the close, and says so; but that answer has no body (RFC 9112 §6.3): only the version
    and the Connection field decide, as for any other answer."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    if version == "1.1":
        return b"close" not in tokens
    return version == "1.0" and b"keep-alive" in tokens and b"close" not in tokens


def _transfer_coding_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a response's Transfer-Encoding cannot be carried, or None (none, or one chunked).
    The exchange re-frames every body; a coding such as gzip would be dropped with the
    framing and the client would get the coded body labelled as plain."""
    codings: list[bytes] = []
    for name, value in headers:
        if name.lower() == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",")]
    if not codings or codings == [b"chunked"]:
        return None
    shown = b", ".join(codings)[:64].decode("latin-1")
    return f"Transfer-Encoding {shown!r} (only a single 'chunked' is carried)"


def _fail(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _relay(task: asyncio.Task[Any], fut: asyncio.Future[Any]) -> None:
    if fut.done():
        return
    if task.cancelled():
        fut.cancel()
    elif (exc := task.exception()) is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(None)
