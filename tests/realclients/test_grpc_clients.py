"""gRPC through the sidecar from the real clients that are not grpcio: grpc-go (what the
Go services the sidecar is for use, from Debian's golang-google-grpc-dev) and @grpc/grpc-js
(Node's own HTTP/2 stack). Each has its own header order, metadata encoding, deadlines and
cancellation. The app is the same grpcio server as in test_grpc.py; every test runs with
each client (`grpc_client`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.component.servers import sample, wait_until
from tests.realclients.test_grpc import GOOD_XID, TXN_RULES

OK, DEADLINE_EXCEEDED, INVALID_ARGUMENT, FAILED_PRECONDITION = 0, 4, 3, 9


async def call(client: list[str], port: int, kind: str, method: str, message: str, *extra: str):
    proc = await asyncio.create_subprocess_exec(
        *client, f"127.0.0.1:{port}", kind, method, message, *extra, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out
    result: dict[str, Any] = json.loads(out)
    return result


def _app(port: int, **extra: Any) -> dict[str, Any]:
    return {"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c", **extra}}


async def test_a_unary_call_reaches_the_app_with_its_xid(sidecar_factory, grpc_app, grpc_client):
    app, port = grpc_app
    sc = await sidecar_factory(_app(port))
    result = await call(grpc_client, sc.ports["inbound"], "unary", "/pkg.Svc/Echo", "hi", GOOD_XID)
    assert (result["code"], result["replies"]) == (OK, ["echo:hi"])
    assert app.xids == [GOOD_XID]


async def test_a_truncated_xid_is_invalid_argument_before_the_app(
    sidecar_factory, grpc_app, grpc_client
):
    app, port = grpc_app
    sc = await sidecar_factory(_app(port))
    result = await call(
        grpc_client, sc.ports["inbound"], "unary", "/pkg.Svc/Echo", "hi", "10.0.0.1:8091:"
    )
    assert result["code"] == INVALID_ARGUMENT
    assert "XID" in result["details"]
    assert result["trailers"]["x-gts-sidecar-error"] == "XID_INVALID"
    assert app.calls == 0


async def test_an_app_error_status_reaches_the_client(sidecar_factory, grpc_app, grpc_client):
    app, port = grpc_app
    sc = await sidecar_factory(_app(port))
    result = await call(grpc_client, sc.ports["inbound"], "unary", "/pkg.Svc/Fail", "x")
    assert (result["code"], result["details"]) == (FAILED_PRECONDITION, "out of stock")


async def test_a_server_stream_reaches_the_client(sidecar_factory, grpc_app, grpc_client):
    app, port = grpc_app
    sc = await sidecar_factory(_app(port))
    result = await call(grpc_client, sc.ports["inbound"], "stream", "/pkg.Svc/Count", "4")
    assert (result["code"], result["replies"]) == (OK, ["0", "1", "2", "3"])


async def test_a_call_declared_as_a_transaction_commits_on_ok(
    sidecar_factory, grpc_app, grpc_client
):
    app, port = grpc_app
    sc = await sidecar_factory({**_app(port), **TXN_RULES})
    result = await call(grpc_client, sc.ports["inbound"], "unary", "/pkg.Svc/Echo", "order")
    assert result["code"] == OK
    xid = result["headers"]["xid"]
    assert app.xids == [xid]
    assert result["headers"]["x-gts-transaction-status"] == "Committed"
    assert (await sc.control.engine.get(xid))[0].status.value == "Committed"


async def test_a_call_declared_as_a_transaction_rolls_back_on_an_error_status(
    sidecar_factory, grpc_app, grpc_client
):
    app, port = grpc_app
    sc = await sidecar_factory({**_app(port), **TXN_RULES})
    result = await call(grpc_client, sc.ports["inbound"], "unary", "/pkg.Svc/Fail", "order")
    assert result["code"] == FAILED_PRECONDITION
    (xid,) = app.xids
    assert result["trailers"]["xid"] == xid
    assert result["trailers"]["x-gts-transaction-status"] == "Rollbacked"
    assert (await sc.control.engine.get(xid))[0].status.value == "Rollbacked"


async def test_a_deadline_reaches_the_app_and_its_expiry_cancels_the_call(
    sidecar_factory, grpc_app, grpc_client
):
    """The client sends its deadline as grpc-timeout and, when it passes, resets the stream: the
    app's context must be cancelled then (RST_STREAM through the sidecar), not at the
    sidecar's own 60 s timeout."""
    app, port = grpc_app
    sc = await sidecar_factory(_app(port, timeouts={"response_header": "50s", "total": "60s"}))
    result = await call(grpc_client, sc.ports["inbound"], "unary", "/pkg.Svc/Slow", "x", "", "1500")
    assert result["code"] == DEADLINE_EXCEEDED
    assert await asyncio.to_thread(app.cancelled.wait, 10)
    # the deadline travelled as grpc-timeout: the app saw at most the 1.5 s it was given
    (left,) = app.time_left
    assert left is not None and left <= 1.5
    await wait_until(lambda: sample(sc, "gts_sidecar_client_aborts_total", listener="inbound") == 1)


async def test_the_outbound_listener_routes_by_authority(sidecar_factory, grpc_app, grpc_go_client):
    """grpc-go pointed at the outbound listener with the upstream's name as its authority
    (`grpc.WithAuthority("inventory")`, as the README tells Go teams to do)."""
    app, port = grpc_app
    sc = await sidecar_factory(
        {"upstreams": {"inventory": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}}}
    )
    result = await call(
        grpc_go_client, sc.ports["outbound"], "unary", "/pkg.Svc/Echo", "out", GOOD_XID, "",
        "inventory",
    )  # fmt: skip
    assert (result["code"], result["replies"]) == (OK, ["echo:out"])
    assert app.xids == [GOOD_XID]
