"""The h2 connection both HTTP/2 sides of the data plane use: h2's own, with HPACK that
remembers repeated blocks (hpack_cache) and without the per-frame `repr` h2 builds for a
trace log that is off.

Rules (pure: no I/O). `_receive_frame` is h2's (4.1-4.4) with one line left out: h2 formats
every frame received (`repr(frame)`, a hex dump of its payload) before calling a logger that
does nothing with it, a twentieth of a proxied gRPC call. The rest of the method is h2's to
the letter, so its error handling (a frame on a reset stream answered with RST_STREAM, on a
stream closed by END_STREAM a connection error) is unchanged; tests/unit/test_h2_conn.py
holds the copy to h2's current source, so an h2 upgrade that changes the method is seen.

A graceful GOAWAY (NO_ERROR) received by the client side leaves the connection open: the
streams up to its last stream id still complete (RFC 9113 section 6.8). h2 closes its state
machine on any GOAWAY and drops what is queued to send, so the answers a server sends after
its GOAWAY (nginx after `keepalive_requests`, grpc-go at its MaxConnectionAge) were refused
as a protocol error. The upstream connection opens no stream after the GOAWAY.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from hyperframe.frame import RstStreamFrame

from sidecar.proxy.hpack_cache import CachingDecoder, CachingEncoder


class H2Connection(h2.connection.H2Connection):
    """h2.connection.H2Connection for the data plane (see the module's rules)."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        # before any frame: the tables are still empty
        self.encoder = CachingEncoder()
        self.decoder = CachingDecoder(self.decoder.max_header_list_size)

    def _receive_frame(self, frame: Any) -> Any:
        # h2's H2Connection._receive_frame without its first line (the trace log's repr)
        events: Any
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    def _receive_goaway_frame(self, frame: Any) -> Any:
        if not self.config.client_side or frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        # (see the module's rules) h2's event, without its move to CLOSED
        event = ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]
