"""HTTP/2 on a proxy listener: one client connection, many streams, each an Exchange.

Theory of operation. A listener connection whose first bytes are the HTTP/2 connection
preface (prior knowledge: what gRPC uses inside a pod; or ALPN `h2` on TLS) is handed to an
`H2Downstream`, which feeds the bytes to `h2`, the sans-IO HTTP/2 state machine, and turns its
events into the same calls an HTTP/1.1 connection makes: a request head (pseudo-headers
mapped, every field classified by the listener's classifier, so XID aliases are validated
exactly as on HTTP/1.1) starts an `Exchange`; DATA feeds its body; END_STREAM completes it; a
RST_STREAM from the client abandons it (the same rule as a FIN on HTTP/1.1). Each stream is an
`H2Stream`, the exchange's `Downstream`: it turns the response into HEADERS, DATA and trailers.

Flow control both ways: request DATA is acknowledged (WINDOW_UPDATE) only while the exchange
takes it, so a slow upstream closes the client's window; response DATA is sent within the
stream's and the connection's windows, the rest kept per stream while the upstream's reading
is paused, and resumed on WINDOW_UPDATE.

The protocol's rules on what arrives are enforced by the h2 library (framing, content-length
against DATA, stream limits) and, for request heads, by h2_fields (connection-specific
fields, uppercase names, CR/LF/NUL, pseudo-header order); a violation ends the connection
with GOAWAY.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from sidecar.errors import BadRequest, SidecarError
from sidecar.proxy import grpc
from sidecar.proxy import headers as h
from sidecar.proxy.exchange import PAUSE_UPSTREAM_FULL, Exchange
from sidecar.proxy.h2_conn import H2Connection
from sidecar.proxy.h2_fields import request_error
from sidecar.proxy.h2_upstream import send_pending, send_within_window

if TYPE_CHECKING:
    from sidecar.proxy.listener import ClientConnection, ProxyListener

log = logging.getLogger("sidecar.proxy")

#: the window over which floods are counted, and what one may hold of control frames
#: (PING, SETTINGS, PRIORITY, empty DATA); gRPC keepalives send a PING every few seconds
FLOOD_WINDOW: Final = 10.0
CONTROL_FRAMES_PER_WINDOW: Final = 1000


class H2Stream:
    """One HTTP/2 stream as the exchange's client side (see downstream.Downstream)."""

    def __init__(self, conn: H2Downstream, stream_id: int, grpc: bool) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.loop: asyncio.AbstractEventLoop = conn.loop
        self.listener: ProxyListener = conn.listener
        self.peer_ip = conn.client.peer_ip
        self.closing = False
        self.grpc = grpc
        self.streaming = grpc
        self.exchange: Exchange | None = None
        self.paused = 0
        #: request bytes received but not yet acknowledged (held back while paused)
        self.unacked = 0
        #: response bytes waiting for flow-control window, and whether the end follows them
        self.pending: list[bytes] = []
        self.pending_end: list[tuple[bytes, bytes]] | None | bool = False
        self.head_sent = False
        #: response bytes sent, and as many at the last stalled-reader check
        self.sent = 0
        self.sent_mark = 0
        #: the response head, until its first DATA or its end goes out
        self.head_fields: list[tuple[bytes, bytes]] | None = None
        self.ended = False

    @property
    def write_paused(self) -> bool:
        return self.conn.client.write_paused or bool(self.pending)

    # --- the response ----------------------------------------------------------------------

    def send_continue(self) -> None:
        pass  # an HTTP/2 client sends its body without waiting for one

    def response_head(
        self,
        exchange: Exchange,
        status: int,
        headers: list[tuple[bytes, bytes]],
        content_length: bytes | None,
    ) -> None:
        fields = [(b":status", b"%d" % status)]
        fields += [(name.lower(), value) for name, value in headers]
        if content_length is not None and status not in (204, 304):
            fields.append((b"content-length", content_length))
        self.head_sent = True
        # sent with the first DATA, at the end of this event-loop step, or with END_STREAM
        # when the response ends right away (a gRPC trailers-only answer must stay one
        # HEADERS frame: its status is in it)
        self.head_fields = fields

    def _send_head(self) -> None:
        fields, self.head_fields = self.head_fields, None
        if fields is not None:
            self.conn.send_headers(self, fields, end_stream=False)

    def response_data(self, exchange: Exchange, data: bytes) -> None:
        if self.head_fields is not None:
            self._send_head()
        if self.pending:
            self.pending.append(data)
            return
        sent = self.conn.send_data(self, data)
        if sent < len(data):
            self.pending.append(data[sent:])
            exchange.pause_upstream_reading()
            self.sent_mark = self.sent
            self.conn.watch_stall()

    def response_end(self, exchange: Exchange, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.pending:
            self.pending_end = trailers if trailers else True
            return
        self._end(trailers)

    def _end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        self.ended = True
        if self.grpc:
            self.conn.count_grpc(self, grpc.call_status(trailers, self.head_fields))
        if self.head_fields is not None and not trailers:
            fields, self.head_fields = self.head_fields, None
            self.conn.send_headers(self, fields, end_stream=True)
            return
        self._send_head()
        if trailers:
            self.conn.send_headers(self, [(n.lower(), v) for n, v in trailers], end_stream=True)
        else:
            self.conn.end_stream(self)

    def window_opened(self) -> None:
        """WINDOW_UPDATE or SETTINGS: send what waits, then let the upstream flow again."""
        if not send_pending(self.pending, lambda data: self.conn.send_data(self, data)):
            return
        end, self.pending_end = self.pending_end, False
        if end is not False:
            self._end(end if isinstance(end, list) else None)
        exchange = self.exchange
        if exchange is not None:
            if exchange.finished:
                self.conn.stream_finished(self)
            else:
                exchange.resume_upstream_reading()

    def flush(self) -> None:
        if self.head_fields is not None:
            self._send_head()
        self.conn.flush()

    def write_error(
        self, err: SidecarError, close: bool, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        code = err.code.encode("ascii")
        if self.grpc:
            # a trailers-only response: gRPC clients read the outcome from grpc-status
            fields = [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", b"%d" % grpc.status_of(err)),
                (b"grpc-message", _grpc_message(err.message)),
                (b"x-gts-sidecar-error", code),
            ]
            fields += [(n.lower(), v) for n, v in extra or ()]
            self.head_sent = self.ended = True
            self.conn.count_grpc(self, grpc.status_of(err))
            self.conn.send_headers(self, fields, end_stream=True)
        else:
            body = err.body()
            fields = [
                (b":status", b"%d" % err.status),
                (b"content-type", b"application/json"),
                (b"x-gts-sidecar-error", code),
                (b"content-length", b"%d" % len(body)),
            ]
            fields += [(n.lower(), v) for n, v in extra or ()]
            self.head_sent = True
            self.conn.send_headers(self, fields, end_stream=False)
            self.response_data_raw(body)
            self.ended = True
            self.conn.end_stream(self)
        self.conn.flush()

    def response_data_raw(self, data: bytes) -> None:
        sent = self.conn.send_data(self, data)
        if sent < len(data):
            self.pending.append(data[sent:])

    def abort_exchange(self, exchange: Exchange) -> None:
        self.conn.reset(self, h2.errors.ErrorCodes.INTERNAL_ERROR)

    def exchange_finished(self, exchange: Exchange, keep_alive: bool) -> None:
        self.conn.stream_finished(self)

    # --- the request body's flow -----------------------------------------------------------

    def pause(self, reason: int) -> None:
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if not self.paused & reason:
            return
        self.paused &= ~reason
        if not self.paused and self.unacked:
            self.acknowledge_held()
            self.conn.flush()

    def acknowledge_held(self) -> None:
        """Acknowledge the request bytes held back while paused: on resuming, and when the
        stream ends (they would be lost to the connection's flow-control window for good,
        and enough such streams would stall every stream on it)."""
        if self.unacked:
            unacked, self.unacked = self.unacked, 0
            self.conn.acknowledge(self, unacked)

    def upstream_full(self) -> bool:
        return bool(self.paused & PAUSE_UPSTREAM_FULL)

    def received(self, size: int) -> None:
        """`size` flow-controlled bytes arrived: acknowledge them now, or once resumed."""
        if self.paused:
            self.unacked += size
        elif size:
            self.conn.acknowledge(self, size)


def _grpc_message(message: str) -> bytes:
    # grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2, "Responses")
    out = bytearray()
    for byte in message.encode("utf-8")[:1024]:
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


class H2Downstream:
    """The HTTP/2 side of one client connection (the connection's parser after the preface)."""

    def __init__(self, client: ClientConnection, max_streams: int) -> None:
        self.client = client
        self.loop = client.loop
        self.listener = client.listener
        # what arrives is validated (the client's fields are the attack surface), by
        # h2_fields in one pass rather than h2's chain of generators; what we send is built
        # here from validated fields, so h2's outbound checks are skipped
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = H2Connection(config)
        limits = client.runtime.limits
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.header_bytes,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.streams: dict[int, H2Stream] = {}
        #: request fields whose bytes passed h2_fields' checks (see request_error)
        self.known_fields: set[tuple[bytes, bytes]] = set()
        metrics = client.runtime.metrics
        name = client.runtime.name
        metrics.http2_connections.labels(name).inc()
        self.m_streams = metrics.http2_streams.labels(name)
        #: gts_sidecar_grpc_calls_total's children, by (upstream, grpc-status)
        self.m_grpc: dict[tuple[str, int | None], Any] = {}
        self.going_away = False
        self.closed = False
        self._flush_scheduled = False
        #: bytes received since the last event (see data_received)
        self.silent_bytes = 0
        self.silent_limit = limits.header_bytes + 4 * self.h2.max_inbound_frame_size
        #: flood accounting: events of each kind in the current window
        self.counts: dict[str, int] = {}
        self.window_start = self.loop.time()
        self.reset_limit = max(100, 2 * max_streams)
        #: the stalled-reader check: armed while a stream waits for the client's window
        self.stall_timer: asyncio.TimerHandle | None = None
        self.h2.initiate_connection()
        self.flush()

    # --- bytes in --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        if events:
            self.silent_bytes = 0
        else:
            # bytes that make no event: a header block still open (CONTINUATION frames) or a
            # frame still incomplete. No honest peer sends more than a head's worth plus a
            # frame before something happens (the 2024 CONTINUATION flood sends forever)
            self.silent_bytes += len(data)
            if self.silent_bytes > self.silent_limit:
                self._calm_down("a header block or frame that never ends")
                return
        for event in events:
            # a malformed head ends the connection before anything it came with is acted
            # on, as h2's own validation does (it raises from receive_data)
            if type(event) is h2.events.RequestReceived:
                why = request_error(event.headers or (), self.known_fields)
                if why is not None:
                    self._malformed(why)
                    return
        for event in events:
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
                if self.closed:
                    return
        self.flush()

    def _budget(self, kind: str, limit: int) -> bool:
        """Count one `kind` event in the current window; False (and the connection closed)
        when there were more than `limit` of them in it."""
        now = self.loop.time()
        if now - self.window_start >= FLOOD_WINDOW:
            self.window_start = now
            self.counts.clear()
        count = self.counts[kind] = self.counts.get(kind, 0) + 1
        if count > limit:
            self._calm_down(f"more than {limit} {kind} in {FLOOD_WINDOW:g}s")
            return False
        return True

    def _calm_down(self, why: str) -> None:
        """Abuse (floods, rapid resets, endless header blocks): GOAWAY with
        ENHANCE_YOUR_CALM, every stream abandoned, the connection closed."""
        self.listener.client_error("h2_abuse")
        log.debug("HTTP/2 client closed for abuse: %s", why)
        try:
            self.h2.close_connection(
                error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
                additional_data=why.encode("ascii", "replace")[:128],
            )
        except h2.exceptions.ProtocolError:
            pass
        self._flush_now()
        self.connection_lost()
        self._close_transport()

    def _control(self, event: Any) -> None:
        """PING, SETTINGS, PRIORITY, empty DATA: each answered or ignored cheaply, but a
        flood of them (CVE-2019-9512/9515/9518) is refused."""
        self._budget("control frames", CONTROL_FRAMES_PER_WINDOW)

    def _malformed(self, why: str) -> None:
        """A request head HTTP/2 forbids (see h2_fields): GOAWAY(PROTOCOL_ERROR), as h2
        answers the protocol errors it finds itself."""
        try:
            self.h2.close_connection(error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        self._protocol_error(h2.exceptions.ProtocolError(why))

    def _protocol_error(self, exc: Exception) -> None:
        """The client broke HTTP/2 (the library has queued a GOAWAY saying how): abandon its
        streams and close."""
        self.listener.client_error("h2_protocol")
        log.debug("HTTP/2 protocol error from a client: %s", exc)
        self._flush_now()
        self.connection_lost()
        transport = self.client.transport
        if transport is not None:
            transport.close()

    def _request(self, event: h2.events.RequestReceived) -> None:
        client = self.client
        runtime = client.listener.runtime
        head = h.RequestHead(headers=[])
        classifier = runtime.classifier
        content_type: bytes | None = None
        try:
            for name, value in event.headers or ():
                name, value = bytes(name), bytes(value)
                if name[:1] == b":":
                    if name == b":method":
                        head.method = value
                    elif name == b":path":
                        head.url = value
                    elif name == b":authority":
                        head.host = value
                        head.host_count += 1
                    continue
                if name == b"content-type":
                    content_type = value
                elif name == b"host":
                    if head.host is not None and head.host != value:
                        raise BadRequest(":authority and Host disagree")
                    if head.host is not None:
                        continue
                head.add(name, value, classifier[name])
            if head.host is not None and not h.valid_host(head.host):
                raise BadRequest("invalid :authority")
            if head.unsupported_te is not None or head.chunked:
                raise BadRequest("transfer-encoding in an HTTP/2 request")
        except SidecarError as err:
            stream = H2Stream(self, event.stream_id, grpc.is_grpc(content_type))
            self.streams[event.stream_id] = stream
            self.listener.client_error("bad_request")
            stream.write_error(err, close=False)
            self.stream_finished(stream)
            return
        if event.stream_ended is None and head.content_length is None:
            head.chunked = True  # a body of unknown length: chunked to an HTTP/1.1 upstream
        if event.stream_ended is not None:
            head.content_length = None
            head.chunked = False
        stream = H2Stream(self, event.stream_id, grpc.is_grpc(content_type))
        self.streams[event.stream_id] = stream
        client.requests += 1
        self.m_streams.inc()
        exchange = stream.exchange = Exchange(stream, head, runtime)
        exchange.start()

    def _data(self, event: h2.events.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        size = event.flow_controlled_length or 0
        if stream is None or stream.exchange is None or stream.exchange.finished:
            # an answered or unknown stream: keep the connection's window open
            if size:
                self.h2.acknowledge_received_data(size, event.stream_id)
            return
        stream.received(size)
        if event.data:
            stream.exchange.feed_body(bytes(event.data))

    def _stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None and stream.exchange is not None and not stream.exchange.body_done:
            stream.exchange.body_complete()

    def _stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        if stream is None:
            return
        stream.acknowledge_held()
        if stream.exchange is None:
            return
        stream.ended = True
        exchange = stream.exchange
        if not exchange.finished:
            # the client cancelled (a gRPC client whose context ended): abandon, as on a FIN
            self.listener.aborts.inc()
            exchange.client_gone()
            # rapid reset (CVE-2023-44487): streams opened and cancelled at once cost the
            # upstream work each; a client doing it by the hundred is cut off
            self._budget("streams reset before their answer", self.reset_limit)

    def _data_or_empty(self, event: h2.events.DataReceived) -> None:
        if not event.data and not event.stream_ended:
            if not self._budget("empty DATA frames", CONTROL_FRAMES_PER_WINDOW):
                return
        self._data(event)

    def _window_updated(self, event: Any) -> None:
        stream_id = getattr(event, "stream_id", 0)
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.pending:
                stream.window_opened()
            return
        for stream in list(self.streams.values()):
            if stream.pending:
                stream.window_opened()

    def _settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if self._budget("control frames", CONTROL_FRAMES_PER_WINDOW):
            self._window_updated(event)

    def _terminated(self, event: h2.events.ConnectionTerminated) -> None:
        self.going_away = True
        transport = self.client.transport
        if transport is not None:
            transport.close()

    # --- bytes out -------------------------------------------------------------------------

    def send_headers(
        self, stream: H2Stream, fields: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        try:
            self.h2.send_headers(stream.stream_id, fields, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # the client reset the stream meanwhile: nothing to answer

    def send_data(self, stream: H2Stream, data: bytes) -> int:
        """Send as much of `data` as the windows allow; how much was sent."""
        size = send_within_window(self.h2, stream.stream_id, data)
        stream.sent += size
        return size

    def count_grpc(self, stream: H2Stream, status: int | None) -> None:
        """A gRPC call answered: count it by its grpc-status (None: the answer had none)."""
        exchange = stream.exchange
        cluster = exchange.cluster if exchange is not None else None
        key = (cluster.name if cluster is not None else "-", status)
        child = self.m_grpc.get(key)
        if child is None:
            label = "missing" if status is None else str(status) if status <= 16 else "other"
            child = self.m_grpc[key] = self.client.runtime.metrics.grpc_calls.labels(
                self.client.runtime.name, key[0], label
            )
        child.inc()

    def watch_stall(self) -> None:
        clients = self.client.runtime.clients
        if self.stall_timer is None and clients.min_rate_bytes and not self.closed:
            self.stall_timer = self.loop.call_later(clients.min_rate_window, self._check_stalls)

    def _check_stalls(self) -> None:
        """Every window while a stream waits for the client's flow-control window: it must
        have taken `min_rate_bytes` since the last check, or the stream is reset (a client
        holding a window at zero would hold the upstream its answer comes from)."""
        self.stall_timer = None
        need = self.client.runtime.clients.min_rate_bytes
        waiting = False
        for stream in list(self.streams.values()):
            if not stream.pending:
                continue
            if stream.sent - stream.sent_mark >= need:
                stream.sent_mark = stream.sent
                waiting = True
                continue
            self.listener.client_error("slow_read")
            stream.pending.clear()
            stream.pending_end = False
            self.reset(stream, h2.errors.ErrorCodes.CANCEL)
            self.streams.pop(stream.stream_id, None)
            exchange = stream.exchange
            if exchange is not None and not exchange.finished:
                exchange.client_gone()
        if waiting:
            self.watch_stall()

    def end_stream(self, stream: H2Stream) -> None:
        try:
            self.h2.end_stream(stream.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def reset(self, stream: H2Stream, code: h2.errors.ErrorCodes) -> None:
        stream.ended = True
        stream.acknowledge_held()
        try:
            self.h2.reset_stream(stream.stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self.flush()

    def acknowledge(self, stream: H2Stream, size: int) -> None:
        try:
            self.h2.acknowledge_received_data(size, stream.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def stream_finished(self, stream: H2Stream) -> None:
        if stream.pending or stream.pending_end is not False:
            return  # the rest waits for the client's window: window_opened ends it
        self.streams.pop(stream.stream_id, None)
        stream.acknowledge_held()
        if not stream.ended:
            # the exchange ended without a response end (abandoned): tell the client
            self.reset(stream, h2.errors.ErrorCodes.CANCEL)
        elif stream.exchange is not None and not stream.exchange.body_done:
            # answered in full before the request's body was all sent: the client is asked
            # to stop sending it, without error (RFC 9113 §8.1, as grpc-go and nginx do);
            # it would otherwise wait for window the answered stream no longer gets
            self.reset(stream, h2.errors.ErrorCodes.NO_ERROR)
        if not self.streams:
            self.client.idle_since = self.loop.time()
            if self.going_away:
                self._flush_now()
                self._close_transport()
                return
        self.flush()

    def flush(self) -> None:
        """Write what h2 has queued, once per event-loop step (the answers of all the streams
        one upstream read completed go out in one write)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data:
            self.client.write(data)

    # --- the connection --------------------------------------------------------------------

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY (streams in flight finish), then close."""
        if not self.going_away:
            self.going_away = True
            self.h2.close_connection()
            self._flush_now()
        if not self.streams:
            self._close_transport()

    def _close_transport(self) -> None:
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def pause_writing(self) -> None:
        for stream in self.streams.values():
            if stream.exchange is not None:
                stream.exchange.pause_upstream_reading()

    def resume_writing(self) -> None:
        for stream in list(self.streams.values()):
            if stream.exchange is not None and not stream.pending:
                stream.exchange.resume_upstream_reading()

    def connection_lost(self) -> None:
        self.closed = True
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            exchange = stream.exchange
            stream.ended = True
            if exchange is not None and not exchange.finished:
                self.listener.aborts.inc()
                exchange.client_gone()


_HANDLERS: Final[dict[type, Any]] = {
    h2.events.RequestReceived: H2Downstream._request,
    h2.events.DataReceived: H2Downstream._data_or_empty,
    h2.events.PingReceived: H2Downstream._control,
    h2.events.PriorityUpdated: H2Downstream._control,
    h2.events.StreamEnded: H2Downstream._stream_ended,
    h2.events.StreamReset: H2Downstream._stream_reset,
    h2.events.WindowUpdated: H2Downstream._window_updated,
    h2.events.RemoteSettingsChanged: H2Downstream._settings,
    h2.events.ConnectionTerminated: H2Downstream._terminated,
}
