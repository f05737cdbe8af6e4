"""The grpcio app the real gRPC clients call through the sidecar: generic handlers on raw
bytes (no generated code) that record what the app saw."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest


@dataclass
class App:
    """What the grpcio server saw."""

    xids: list[str | None] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    time_left: list[float | None] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    calls: int = 0


def _metadata(context: grpc.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}


def _handlers(app: App) -> grpc.GenericRpcHandler:
    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        app.calls += 1
        app.xids.append(_metadata(context).get("xid"))
        app.time_left.append(context.time_remaining())
        return b"echo:" + request

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        app.calls += 1
        for i in range(int(request)):
            yield b"%d" % i

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        app.calls += 1
        for message in requests:
            yield b"re:" + message

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        app.calls += 1
        app.xids.append(_metadata(context).get("xid"))
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "out of stock")
        return b""

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        app.calls += 1
        app.time_left.append(context.time_remaining())
        app.started.set()
        # wait until the call is cancelled (the client gave up) or 30 s pass
        done = threading.Event()
        context.add_callback(done.set)
        done.wait(30)
        if not context.is_active():
            app.cancelled.set()
        return b"late"

    return grpc.method_handlers_generic_handler(
        "pkg.Svc",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
        },
    )


@pytest.fixture
def grpc_app() -> Iterator[tuple[App, int]]:
    app = App()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_handlers(app),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield app, port
    finally:
        server.stop(grace=None)


@pytest.fixture
async def channel() -> AsyncIterator[Callable[..., grpc.Channel]]:
    """`channel(port, authority=None)`: a grpcio channel to 127.0.0.1:port (with `authority`,
    its :authority, as the outbound listener routes by), closed when the test ends."""
    channels: list[grpc.Channel] = []

    def make(port: int, authority: str | None = None) -> grpc.Channel:
        options = [("grpc.default_authority", authority)] if authority else []
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        channels.append(ch)
        return ch

    yield make
    for ch in channels:
        ch.close()
