"""HTTP/2 upstreams (h2c: prior knowledge over TCP, what a gRPC server speaks).

Theory of operation. An `H2Cluster` keeps up to `pool.max_connections` HTTP/2 connections to
one upstream and hands out streams, not connections: a request takes a stream on the first
connection with room (the peer's SETTINGS_MAX_CONCURRENT_STREAMS honoured, a connection that
sent GOAWAY takes no new stream), a new connection when all are full, or waits in the pool's
queue (`max_pending`) as the HTTP/1.1 pool does. Each `H2UpstreamStream` offers the exchange
what an HTTP/1.1 upstream connection does (send the request, its body, its end; pause and
resume the response; abort), and reports the response to it through the same `ResponseSink`
calls, trailers included (gRPC's status lives in them). Flow control both ways: response DATA
is acknowledged only while the client side takes it; request DATA is sent within the
upstream's windows, the client's reading paused meanwhile. Aborting a stream is a
RST_STREAM(CANCEL): the server's handler sees its context cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from sidecar.errors import SidecarError, UpstreamTimeout, UpstreamUnavailable
from sidecar.proxy.h2_conn import H2Connection
from sidecar.proxy.h2_fields import MAX_KNOWN, MAX_KNOWN_FIELD
from sidecar.proxy.upstream import Cluster, StreamRefused

if TYPE_CHECKING:
    from sidecar.proxy.exchange import Exchange
    from sidecar.proxy.upstream import ResponseSink

log = logging.getLogger("sidecar.proxy")

#: streams per connection until the server's SETTINGS say otherwise (RFC 9113 recommends
#: that a server allow at least 100)
DEFAULT_MAX_STREAMS: Final = 100
#: what must never reach a client in a field (an HTTP/1.1 client would read CR/LF as framing,
#: a colon in a name as the end of the name)
_UNSAFE: Final = re.compile(rb"[\r\n\x00]")
_UNSAFE_NAME: Final = re.compile(rb"[\r\n\x00:]")
#: request fields HTTP/2 forbids (connection-specific), beyond the hop-by-hop ones the
#: listener already dropped
_FORBIDDEN: Final = frozenset({b"host", b"connection", b"keep-alive", b"proxy-connection",
                               b"transfer-encoding", b"upgrade", b"te"})  # fmt: skip


class H2UpstreamStream:
    """One request on an HTTP/2 upstream connection (the exchange's `upstream`)."""

    def __init__(self, conn: H2UpstreamConnection) -> None:
        self.conn = conn
        self.cluster: Cluster = conn.cluster
        self.stream_id = 0
        self.sink: ResponseSink | None = None
        self.response_done = False
        self.got_bytes = False
        self.reusable = True
        self.paused = False
        self.unacked = 0
        #: request bytes waiting for the upstream's window, and whether the end follows
        self.pending: list[bytes] = []
        self.pending_end = False
        self.ended = False

    # --- used by the exchange ---------------------------------------------------------------

    def attach(self, sink: ResponseSink, head_request: bool) -> None:
        self.sink = sink

    def send_request(self, exchange: Exchange, body: list[bytes] | None) -> None:
        head = exchange.head
        route = exchange.route
        assert route is not None
        authority = route.host or head.host or self.cluster.authority
        fields = [
            (b":method", head.method),
            (b":scheme", self.conn.scheme),
            (b":authority", authority),
            (b":path", route.target),
        ]
        grpc = False
        for name, value in head.headers or ():
            lname = name.lower()
            if lname not in _FORBIDDEN:
                fields.append((lname, value))
                if lname == b"content-type" and value.startswith(b"application/grpc"):
                    grpc = True
        fields += [(name.lower(), value) for name, value in exchange.extra_headers()]
        if grpc:
            fields.append((b"te", b"trailers"))  # gRPC servers require it
        if head.content_length is not None:
            fields.append((b"content-length", head.content_length))
        self.send_fields(fields, end_stream=not head.has_body)
        if body:
            for data in body:
                self.send_body(data, False)

    def send_fields(self, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        """Open the stream with this request head (pseudo-headers first)."""
        self.stream_id = self.conn.open_stream(self, fields, end_stream=end_stream)

    def send_body(self, data: bytes, chunked: bool) -> None:
        if not self.stream_id:
            return  # never opened (the connection failed): lost() reports it
        if self.pending:
            self.pending.append(data)
            return
        sent = self.conn.send_data(self, data)
        if sent < len(data):
            self.pending.append(data[sent:])
            if self.sink is not None:
                self.sink.on_upstream_pause_writing()

    def end_body(self, chunked: bool) -> None:
        if self.pending:
            self.pending_end = True
        elif self.stream_id and not self.ended:
            self.ended = True
            self.conn.end_stream(self)

    def window_opened(self) -> None:
        if not send_pending(self.pending, lambda data: self.conn.send_data(self, data)):
            return
        if self.pending_end:
            self.pending_end = False
            self.ended = True
            self.conn.end_stream(self)
        if self.sink is not None:
            self.sink.on_upstream_resume_writing()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        if self.unacked:
            self.acknowledge_held()
            self.conn.flush()

    def acknowledge_held(self) -> None:
        """Acknowledge the answer bytes held back while paused (its client was slow): on
        resuming, and when the stream ends, or the connection's window, which every stream
        on it shares, would shrink by them for good."""
        if self.unacked:
            unacked, self.unacked = self.unacked, 0
            self.conn.acknowledge(self, unacked)

    def abort(self) -> None:
        self.reusable = False
        if not (self.response_done and self.ended):
            # (answered before the request's body was all sent, too: the stream would stay
            # half-open in h2 and count against the server's concurrent streams for good)
            self.conn.reset(self)

    def close(self) -> None:
        self.abort()

    @property
    def usable(self) -> bool:
        return self.conn.usable

    # --- from the connection -----------------------------------------------------------------

    def received(self, size: int) -> None:
        if self.paused:
            self.unacked += size
        elif size:
            self.conn.acknowledge(self, size)

    def lost(self, exc: Exception | None) -> None:
        sink, self.sink = self.sink, None
        if sink is not None and not self.response_done:
            sink.on_upstream_lost(exc, self.got_bytes)


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to an upstream, carrying many streams."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.transport: asyncio.Transport | None = None
        # The request fields are built here from validated ones, so h2's outbound checks are
        # skipped; of the upstream's answers only what could harm a client is checked (CR, LF
        # or NUL in a value, see _head): h2's full inbound checks cost a tenth of a call
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.h2 = H2Connection(config)
        self.streams: dict[int, H2UpstreamStream] = {}
        #: response fields found safe to relay (an upstream repeats most of them)
        self.known_fields: set[tuple[bytes, bytes]] = set()
        #: streams handed out and not yet released (opened or about to be)
        self.taken = 0
        self.goaway = False
        self.counted = True
        self._closed = False
        self._flush_scheduled = False
        #: why it can carry nothing (refused HTTP/2, broke the protocol)
        self.failure: SidecarError | None = None
        #: the :scheme of its requests
        self.scheme = b"https" if cluster.ssl is not None else b"http"
        self.idle_since = 0.0
        #: requests waiting for this connection to open and its server's SETTINGS to come
        self.openers: list[asyncio.Future[None]] = []
        self.settings_seen = False

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        tls = transport.get_extra_info("ssl_object")
        if tls is not None and tls.selected_alpn_protocol() != "h2":
            # an https upstream declared protocol h2 that did not agree to HTTP/2
            self._fail(
                UpstreamUnavailable(
                    f"upstream {self.cluster.name!r} did not choose HTTP/2 (ALPN h2) in its "
                    "TLS handshake; declare it protocol: http1"
                )
            )
            return
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._fail(UpstreamUnavailable(f"upstream {self.cluster.name!r} broke HTTP/2: {exc}"))
            return
        touched: set[H2UpstreamStream] = set()
        for event in events:
            stream_id = getattr(event, "stream_id", 0)
            stream = self.streams.get(stream_id) if stream_id else None
            if isinstance(event, h2.events.ResponseReceived) and stream is not None:
                self._head(stream, event.headers)
                touched.add(stream)
            elif isinstance(event, h2.events.DataReceived) and stream is not None:
                stream.received(event.flow_controlled_length or 0)
                if stream.sink is not None and event.data:
                    stream.sink.on_response_body(bytes(event.data))
                touched.add(stream)
            elif isinstance(event, h2.events.DataReceived):
                if event.flow_controlled_length:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, stream_id)
            elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
                if stream.sink is not None:
                    stream.sink.on_response_trailers(
                        [(bytes(n), bytes(v)) for n, v in event.headers]
                    )
            elif isinstance(event, h2.events.StreamEnded) and stream is not None:
                self._ended(stream)
                touched.discard(stream)
            elif isinstance(event, h2.events.StreamReset) and stream is not None:
                self.streams.pop(stream_id, None)
                stream.acknowledge_held()
                stream.response_done = False
                if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                    stream.lost(
                        StreamRefused(
                            f"upstream {self.cluster.name!r} refused the stream unprocessed "
                            "(REFUSED_STREAM)"
                        )
                    )
                else:
                    stream.lost(
                        UpstreamUnavailable(
                            f"upstream {self.cluster.name!r} reset the stream "
                            f"({_error_name(event.error_code)})"
                        )
                    )
            elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                if isinstance(event, h2.events.RemoteSettingsChanged) and not self.settings_seen:
                    self.settings_seen = True
                    if self in getattr(self.cluster, "_conns", ()):
                        self._settled()  # (else _connect has yet to count it in: it settles)
                targets = [stream] if stream is not None else list(self.streams.values())
                for target in targets:
                    if target.pending:
                        target.window_opened()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = True
                last = event.last_stream_id or 0
                for sid in [s for s in self.streams if s > last]:
                    # never processed by the server: safe to send again, whatever the method
                    lost = self.streams.pop(sid)
                    lost.lost(
                        StreamRefused(
                            f"upstream {self.cluster.name!r} ended the connection (GOAWAY, "
                            f"last stream {last}) before taking the request",
                            progress=last > 0,
                        )
                    )
        for stream in touched:
            if stream.sink is not None:
                stream.sink.flush()
        self.flush()
        if self.goaway and not self.taken:
            self.close()  # ended by the server, its streams done (or refused): nothing left

    def _head(self, stream: H2UpstreamStream, raw: Any) -> None:
        status = 0
        fields: list[tuple[bytes, bytes]] = []
        known = self.known_fields
        for field in raw:
            name, value = field
            if name == b":status":
                status = int(value) if value.isdigit() else 0
            elif name[:1] != b":":
                if field in known:
                    fields.append(field)
                    continue
                if _UNSAFE_NAME.search(name) or _UNSAFE.search(value):
                    stream.lost(
                        UpstreamUnavailable(
                            f"upstream {self.cluster.name!r} sent a header field with CR, LF, "
                            "NUL or a colon in its name"
                        )
                    )
                    self.reset(stream)
                    return
                if len(name) + len(value) <= MAX_KNOWN_FIELD:
                    if len(known) >= MAX_KNOWN:
                        known.clear()
                    known.add(field)
                fields.append(field)
        if not 100 <= status <= 599:
            stream.lost(UpstreamUnavailable(f"upstream {self.cluster.name!r}: invalid :status"))
            self.reset(stream)
            return
        if 100 <= status < 200:
            return  # informational: not relayed
        stream.got_bytes = True
        if stream.sink is not None:
            stream.sink.on_response_head(status, fields)

    def _ended(self, stream: H2UpstreamStream) -> None:
        stream.response_done = True
        sink = stream.sink
        if sink is not None:
            sink.on_response_complete()  # (it flushes what this step produced)

    def _settled(self, failed: BaseException | None = None) -> None:
        """The server's SETTINGS came, or the connection ended or `failed` to open first: it
        is no longer one being opened, and the requests waiting for it take streams now,
        within the limit it announced, or are told the connection's own failure
        (_shared_failure), or look again."""
        openers, self.openers = self.openers, []
        opening = getattr(self.cluster, "_opening", None)
        if opening is not None and self in opening:
            opening.remove(self)
        for fut in openers:
            if not fut.done():
                failure = _shared_failure(failed) if failed is not None else None
                if failure is not None:
                    fut.set_exception(failure)
                else:
                    fut.set_result(None)
        if self.has_room:
            # room beyond what its openers take: requests queued on the pool's limit of
            # connections look again (each that finds none left goes back to waiting)
            cluster = self.cluster
            for _ in range(min(self._limit() - self.taken - len(openers), len(cluster._waiters))):
                cluster._wake_one()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._settled()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.lost(exc)
        forget = getattr(self.cluster, "_forget", None)
        if forget is not None:
            forget(self)

    def _fail(self, err: SidecarError) -> None:
        self.failure = err
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.lost(err)
        self.close()

    # --- streams ---------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.is_closing()

    def _limit(self) -> int:
        limit: int = self.h2.remote_settings.max_concurrent_streams or DEFAULT_MAX_STREAMS
        return limit

    @property
    def has_room(self) -> bool:
        # Only once the server's SETTINGS have come: until then h2 reads its limit as
        # unbounded, and streams opened in that window past the limit the server is about
        # to announce are refused (grpc-go resets them with REFUSED_STREAM). The stream of
        # the request that opened the connection is taken without asking (_connect).
        return self.settings_seen and self.usable and not self.goaway and self.taken < self._limit()

    def open_stream(
        self, stream: H2UpstreamStream, fields: list[tuple[bytes, bytes]], end_stream: bool
    ) -> int:
        # (a refusal is reported on the next step: the exchange is still sending)
        loop = asyncio.get_running_loop()
        if self.failure is not None or not self.usable:
            err = self.failure or UpstreamUnavailable(
                f"upstream {self.cluster.name!r} closed the connection"
            )
            loop.call_soon(stream.lost, err)
            return 0
        if self.goaway:
            # h2 would let a stream open that the server then ignores (see h2_conn); the
            # request was never sent: it goes again on another connection
            loop.call_soon(stream.lost, self._not_sent("had ended the connection (GOAWAY)", True))
            return 0
        stream_id: int = self.h2.get_next_available_stream_id()
        try:
            self.h2.send_headers(stream_id, fields, end_stream=end_stream)
        except h2.exceptions.TooManyStreamsError:
            # the pool's count of streams and h2's disagree: never sent, so it may go again
            # (an attempt counted: a connection that keeps refusing is not asked forever)
            loop.call_soon(stream.lost, self._not_sent("allows no more streams", False))
            return 0
        self.streams[stream_id] = stream
        stream.ended = end_stream
        self.flush()
        return stream_id

    def _not_sent(self, why: str, progress: bool) -> StreamRefused:
        return StreamRefused(
            f"upstream {self.cluster.name!r} {why}: the request was not sent", progress=progress
        )

    def send_data(self, stream: H2UpstreamStream, data: bytes) -> int:
        size = send_within_window(self.h2, stream.stream_id, data)
        self.flush()
        return size

    def end_stream(self, stream: H2UpstreamStream) -> None:
        try:
            self.h2.end_stream(stream.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.flush()

    def acknowledge(self, stream: H2UpstreamStream, size: int) -> None:
        try:
            self.h2.acknowledge_received_data(size, stream.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def reset(self, stream: H2UpstreamStream) -> None:
        self.streams.pop(stream.stream_id, None)
        stream.acknowledge_held()
        if stream.stream_id:
            try:
                self.h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pass
            self.flush()

    def flush(self) -> None:
        """Write what h2 has queued, once per event-loop step: the requests, bodies and ends
        of all the streams one step produced go out in one write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self._closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            try:
                self.h2.close_connection()
                self._flush_now()
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()


def _shared_failure(exc: BaseException) -> SidecarError | None:
    """What requests waiting for a connection that failed to open are told: the same failure
    when it was the connection's (refused, TLS, its connect timeout), a new instance each;
    None when it was the opener's own (its exchange's timer, its client gone)."""
    if isinstance(exc, UpstreamTimeout):
        return UpstreamTimeout(str(exc), kind=exc.kind) if exc.kind == "connect" else None
    if isinstance(exc, UpstreamUnavailable):
        return UpstreamUnavailable(str(exc))
    return None


def _error_name(code: Any) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


class H2Cluster(Cluster):
    """A pool of HTTP/2 connections to one upstream, handing out streams."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h2 = True
        self._conns: list[H2UpstreamConnection] = []
        #: connections being opened (requests may wait for them: acquire)
        self._opening: list[H2UpstreamConnection] = []

    def _new_connection(self) -> Any:
        return H2UpstreamConnection(self)

    def take_idle(self) -> Any:
        for conn in self._conns:
            if conn.has_room:
                conn.taken += 1
                self._in_use += 1
                return H2UpstreamStream(conn)
        return None

    def release(self, conn: Any, reusable: bool) -> None:
        stream: H2UpstreamStream = conn
        self._in_use -= 1
        stream.sink = None
        owner = stream.conn
        owner.taken -= 1
        if not (reusable and stream.response_done):
            stream.abort()
        owner.streams.pop(stream.stream_id, None)
        if not owner.taken:
            owner.idle_since = self._loop.time()
        if (self._closed or owner.goaway) and not owner.taken:
            # (after a GOAWAY the connection only finishes its streams: the last one done,
            # it is closed here rather than left in the pool until the server closes it)
            owner.close()
            return
        if owner.has_room:
            self._wake_one()

    async def acquire(self, waiter_slot: list[asyncio.Future[Any] | None]) -> tuple[Any, bool]:
        """A stream for one attempt. A request that finds no connection with room waits for
        one being opened, up to the streams it will surely take (DEFAULT_MAX_STREAMS until
        the server's SETTINGS say), instead of opening a connection of its own: a burst of
        first requests, or of requests moved off a connection that got a GOAWAY, shares one
        new connection (as Envoy queues them on a connecting connection)."""
        while True:
            stream = self.take_idle()
            if stream is not None:
                return stream, True
            opening = next(
                (c for c in self._opening if len(c.openers) < DEFAULT_MAX_STREAMS - 1), None
            )
            if opening is None:
                return await super().acquire(waiter_slot)
            stream = await self._share(opening, waiter_slot)
            if stream is not None:
                return stream, False

    async def _share(
        self, conn: H2UpstreamConnection, waiter_slot: list[asyncio.Future[Any] | None]
    ) -> H2UpstreamStream | None:
        """Wait for `conn` to open and take a stream on it; None when it could not (it did
        not open, or filled up): the caller looks again."""
        fut: asyncio.Future[None] = self._loop.create_future()
        conn.openers.append(fut)
        waiter_slot[0] = fut  # (the exchange's timers fail it)
        try:
            await fut  # raises the connection's own failure (refused, TLS, connect timeout)
        finally:
            waiter_slot[0] = None
        if conn in self._conns and conn.has_room:
            conn.taken += 1
            self._in_use += 1
            return H2UpstreamStream(conn)
        return None

    async def _connect(
        self, waiter_slot: list[asyncio.Future[Any] | None], conn: Any = None
    ) -> Any:
        conn = H2UpstreamConnection(self)
        self._opening.append(conn)
        try:
            await super()._connect(waiter_slot, conn)
        except BaseException as exc:
            # (the opener's own matter, its client gone, is no failure of the connection's:
            # the others then look again)
            conn._settled(exc)
            raise
        self._conns.append(conn)
        conn.taken += 1
        if conn.settings_seen:
            conn._settled()
        # else it stays among those being opened until the server's SETTINGS say how many
        # streams it takes: requests coming meanwhile wait for them with the others (opened
        # before, a burst could pass the server's limit and have streams refused)
        return H2UpstreamStream(conn)

    def _forget(self, conn: Any) -> None:
        try:
            self._conns.remove(conn)
        except ValueError:
            pass
        super()._forget(conn)

    def _sweep(self) -> None:
        now = self._loop.time()
        for conn in list(self._conns):
            if not conn.taken and (not conn.usable or now - conn.idle_since >= self.idle_timeout):
                conn.close()
        self._schedule_sweep()

    @property
    def idle_count(self) -> int:
        return sum(1 for conn in self._conns if not conn.taken)

    @property
    def waiting(self) -> int:
        # (requests waiting for a connection being opened wait as much as those queued)
        return len(self._waiters) + sum(len(conn.openers) for conn in self._opening)

    def close(self) -> None:
        super().close()
        for conn in list(self._conns):
            if not conn.taken:
                conn.close()


def send_within_window(h2c: h2.connection.H2Connection, stream_id: int, data: bytes) -> int:
    """Queue as much of `data` on the stream as its and the connection's flow-control windows
    allow, in frames of the peer's maximum size; how much was taken (all of it when the
    stream is gone: there is nobody to send the rest to)."""
    try:
        window = h2c.local_flow_control_window(stream_id)
    except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
        return len(data)
    size = min(window, len(data))
    frame = h2c.max_outbound_frame_size
    at = 0
    while at < size:
        piece = data[at : min(size, at + frame)]
        h2c.send_data(stream_id, piece)
        at += len(piece)
    return size


def send_pending(pending: list[bytes], send: Callable[[bytes], int]) -> bool:
    """Send what waits for a window, in order, as far as `send` (how much it took) goes;
    True when nothing is left waiting."""
    while pending:
        data = pending[0]
        sent = send(data)
        if sent < len(data):
            pending[0] = data[sent:]
            return False
        pending.pop(0)
    return True
