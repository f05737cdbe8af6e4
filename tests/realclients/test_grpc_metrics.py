"""gts_sidecar_grpc_calls_total: gRPC calls counted by their grpc-status (a failed call is
HTTP 200 to the request metrics), through a real grpcio client and server: OK from the
app's trailers, an app's error status, and the sidecar's own refusal (trailers-only)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from tests.component.servers import sample
from tests.realclients.test_grpc import GOOD_XID, unary


def calls(sc: Any, upstream: str, status: str) -> float:
    return sample(
        sc,
        "gts_sidecar_grpc_calls_total",
        listener="inbound",
        upstream=upstream,
        grpc_status=status,
    )


async def test_grpc_calls_are_counted_by_their_grpc_status(sidecar_factory, grpc_app, channel):  # noqa: F811
    app, port = grpc_app
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}})
    ch = channel(sc.ports["inbound"])
    for _ in range(2):
        assert await asyncio.to_thread(unary, ch, "/pkg.Svc/Echo", b"hi") == b"echo:hi"
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(unary, ch, "/pkg.Svc/Fail", b"x")
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION  # 9
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(
            unary, ch, "/pkg.Svc/Echo", b"hi", metadata=[("xid", GOOD_XID[:-1] + ":")]
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # 3, the sidecar's own
    assert calls(sc, "app", "0") == 2
    assert calls(sc, "app", "9") == 1
    assert calls(sc, "-", "3") == 1  # refused before routing: no upstream
    # each call is still one request (HTTP 200) to the request metrics
    assert sample(sc, "gts_sidecar_requests_total", listener="inbound", upstream="app",
                  status="200") == 3  # fmt: skip
