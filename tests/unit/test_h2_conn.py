"""sidecar.proxy.h2_conn: its `_receive_frame` is h2's but for the trace log's repr (checked
against the installed h2's source, so an h2 upgrade that changes the method fails here), and
the connection carries the caching HPACK coders."""

from __future__ import annotations

import ast
import inspect
import textwrap

import h2.config
import h2.connection
import h2.events
import hyperframe.frame

from sidecar.proxy.h2_conn import H2Connection
from sidecar.proxy.hpack_cache import CachingDecoder, CachingEncoder


def statements(function: object) -> list[str]:
    """The method's statements, without its docstring, annotations and trace-log calls."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    body = tree.body[0].body  # type: ignore[attr-defined]
    out = []
    for node in body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if isinstance(node, ast.AnnAssign) and node.value is None:
            continue  # `events: list[Event]`
        if isinstance(node, ast.Expr) and "logger" in ast.unparse(node):
            continue
        out.append(ast.dump(node))
    return out


def test_receive_frame_is_h2s_without_the_trace_log() -> None:
    theirs = h2.connection.H2Connection._receive_frame
    assert "logger.trace" in inspect.getsource(theirs)
    assert statements(H2Connection._receive_frame) == statements(theirs)


def test_frames_never_reach_repr(monkeypatch) -> None:
    def no_repr(self: object) -> str:
        raise AssertionError("repr of a received frame")

    monkeypatch.setattr(hyperframe.frame.Frame, "__repr__", no_repr)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "a"),
                            (":path", "/")], end_stream=True)  # fmt: skip
    server = H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    events = server.receive_data(client.data_to_send())
    assert any(isinstance(e, h2.events.RequestReceived) for e in events)
    assert isinstance(server.encoder, CachingEncoder)
    assert isinstance(server.decoder, CachingDecoder)


def test_data_on_a_reset_stream_is_answered_with_rst_stream() -> None:
    """One of the error paths of the copied method, as h2 has it."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    client.initiate_connection()
    server.initiate_connection()
    client.receive_data(server.data_to_send())
    client.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "a"),
                            (":path", "/")])  # fmt: skip
    server.receive_data(client.data_to_send())
    server.reset_stream(1)
    server.data_to_send()
    client.send_data(1, b"late")
    server.receive_data(client.data_to_send())
    sent = server.data_to_send()
    assert sent[3] == 0x3  # RST_STREAM
