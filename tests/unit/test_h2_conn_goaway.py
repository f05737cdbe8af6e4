"""sidecar.proxy.h2_conn: a graceful GOAWAY received by the client side leaves the streams
up to its last stream id able to complete (RFC 9113 section 6.8), as nginx expects when it
answers the last request of a connection after its GOAWAY; any other GOAWAY closes the
connection as h2 does."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from hyperframe.frame import GoAwayFrame

from sidecar.proxy.h2_conn import H2Connection

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]


def connected(client_side: bool) -> tuple[H2Connection, h2.connection.H2Connection]:
    """Ours on one side, h2's on the other, past the preface and SETTINGS both ways."""
    ours = H2Connection(h2.config.H2Configuration(client_side=client_side, header_encoding=None))
    theirs = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=not client_side, header_encoding=None)
    )
    first, second = (ours, theirs) if client_side else (theirs, ours)
    first.initiate_connection()
    second.initiate_connection()
    second.receive_data(first.data_to_send())
    first.receive_data(second.data_to_send())
    second.receive_data(first.data_to_send())
    return ours, theirs


def goaway(last_stream_id: int, error_code: int = 0) -> bytes:
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = error_code
    return bytes(frame.serialize())


def test_the_answer_sent_after_a_graceful_goaway_reaches_the_client() -> None:
    client, server = connected(client_side=True)
    client.send_headers(1, REQUEST, end_stream=True)
    client.send_headers(3, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(b":status", b"200")])
    server.send_data(1, b"ok", end_stream=True)
    # nginx's order: the GOAWAY (last stream 1: stream 3 refused), then stream 1's answer
    events = client.receive_data(goaway(1) + server.data_to_send())
    kinds = [type(e) for e in events]
    assert kinds[0] is h2.events.ConnectionTerminated
    assert events[0].last_stream_id == 1
    assert h2.events.ResponseReceived in kinds
    assert h2.events.StreamEnded in kinds
    assert b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)) == b"ok"
    # a second GOAWAY (grpc-go sends two) is accepted too
    assert [type(e) for e in client.receive_data(goaway(1))] == [h2.events.ConnectionTerminated]


def test_a_goaway_with_an_error_closes_the_connection_as_h2_does() -> None:
    client, server = connected(client_side=True)
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(b":status", b"200")], end_stream=True)
    client.receive_data(goaway(1, error_code=0x1))  # PROTOCOL_ERROR
    with pytest.raises(h2.exceptions.ProtocolError):
        client.receive_data(server.data_to_send())


def test_the_server_side_keeps_h2s_behaviour() -> None:
    server, client = connected(client_side=False)
    client.send_headers(1, REQUEST, end_stream=True)
    server.receive_data(client.data_to_send())
    server.receive_data(goaway(0))
    with pytest.raises(h2.exceptions.ProtocolError):
        server.send_headers(1, [(b":status", b"200")], end_stream=True)
