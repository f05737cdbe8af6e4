"""A grpcio app behind the sidecar stopping gracefully, as it does on SIGTERM in a rolling
update (`server.stop(grace)`; grpc-go's GracefulStop is alike): it sends GOAWAY (NO_ERROR)
and a PING, then finishes the calls in flight. Their answers must reach the callers through
the sidecar; the sidecar used to take the GOAWAY as the connection's end and fail them with
UNAVAILABLE ("broke HTTP/2")."""

from __future__ import annotations

import asyncio
from concurrent import futures
from typing import Any

import grpc


async def test_a_call_in_flight_when_the_app_stops_gracefully_gets_its_answer(
    sidecar_factory: Any,
) -> None:
    stopping: list[Any] = []

    def last(request: bytes, context: grpc.ServicerContext) -> bytes:
        # the app begins its graceful stop while this call runs: the GOAWAY goes out before
        # this answer, on the same connection
        stopping.append(server.stop(grace=10))
        return b"done:" + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(last)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("pkg.Svc", {"Last": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}})
        with grpc.insecure_channel(f"127.0.0.1:{sc.ports['inbound']}") as channel:
            call = channel.unary_unary("/pkg.Svc/Last")
            assert await asyncio.to_thread(call, b"order", timeout=10) == b"done:order"
        (stopped,) = stopping
        assert await asyncio.to_thread(stopped.wait, 10)
    finally:
        server.stop(grace=None)
