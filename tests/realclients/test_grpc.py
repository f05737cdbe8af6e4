"""gRPC through the sidecar with a real grpcio client and server (generic handlers on raw
bytes: no generated code). The app is a grpcio server speaking h2c (`app.protocol: h2c`);
the XID travels as the metadata key `xid`."""

from __future__ import annotations

import asyncio
import queue
import ssl
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import trustme
from aiohttp import web

from tests.component.servers import sample, wait_until
from tests.realclients.grpcapp import App, _handlers, _metadata

GOOD_XID = "10.0.0.1:8091:2001"


def unary(ch: grpc.Channel, method: str, request: bytes, **kw: Any) -> bytes:
    result: bytes = ch.unary_unary(method)(request, timeout=10, **kw)
    return result


async def test_a_unary_call_reaches_the_app_with_its_xid(sidecar_factory, grpc_app, channel):
    app, port = grpc_app
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}})
    ch = channel(sc.ports["inbound"])
    reply = await asyncio.to_thread(unary, ch, "/pkg.Svc/Echo", b"hi", metadata=[("xid", GOOD_XID)])
    assert reply == b"echo:hi"
    assert app.xids == [GOOD_XID]


async def test_a_truncated_xid_is_invalid_argument_before_the_app(
    sidecar_factory, grpc_app, channel
):
    app, port = grpc_app
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}})
    ch = channel(sc.ports["inbound"])
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(
            unary, ch, "/pkg.Svc/Echo", b"hi", metadata=[("xid", "10.0.0.1:8091:")]
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "XID" in (info.value.details() or "")
    trailing = dict(info.value.trailing_metadata() or ())
    assert trailing.get("x-gts-sidecar-error") == "XID_INVALID"
    assert app.calls == 0


async def test_an_app_error_status_passes_through(sidecar_factory, grpc_app, channel):
    app, port = grpc_app
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}})
    ch = channel(sc.ports["inbound"])
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(unary, ch, "/pkg.Svc/Fail", b"x")
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "out of stock"


async def test_a_server_streaming_call_passes_through(sidecar_factory, grpc_app, channel):
    app, port = grpc_app
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}})
    ch = channel(sc.ports["inbound"])

    def stream() -> list[bytes]:
        return list(ch.unary_stream("/pkg.Svc/Count")(b"5", timeout=10))

    assert await asyncio.to_thread(stream) == [b"0", b"1", b"2", b"3", b"4"]


async def test_a_bidi_stream_converses_through_the_sidecar(sidecar_factory, grpc_app, channel):
    """Each message is answered before the client sends the next: the sidecar must pass the
    request stream on as it comes, never hold it back whole."""
    app, port = grpc_app
    sc = await sidecar_factory({"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}})
    ch = channel(sc.ports["inbound"])

    def converse() -> list[bytes]:
        outbox: queue.Queue[bytes | None] = queue.Queue()
        outbox.put(b"1")

        def requests() -> Iterator[bytes]:
            while (message := outbox.get(timeout=10)) is not None:
                yield message

        got = []
        for reply in ch.stream_stream("/pkg.Svc/Chat")(requests(), timeout=10):
            got.append(reply)
            outbox.put(b"%d" % (len(got) + 1) if len(got) < 3 else None)
        return got

    assert await asyncio.to_thread(converse) == [b"re:1", b"re:2", b"re:3"]


async def test_a_client_cancel_reaches_the_app_as_a_cancelled_context(
    sidecar_factory, grpc_app, channel
):
    app, port = grpc_app
    sc = await sidecar_factory(
        {
            "app": {
                "url": f"http://127.0.0.1:{port}",
                "protocol": "h2c",
                "timeouts": {"response_header": "50s", "total": "60s"},
            }
        }
    )
    ch = channel(sc.ports["inbound"])
    future = ch.unary_unary("/pkg.Svc/Slow").future(b"x", timeout=30)
    assert await asyncio.to_thread(app.started.wait, 10)
    future.cancel()
    # the app's context ends now (RST_STREAM both ways), not after 30 s
    assert await asyncio.to_thread(app.cancelled.wait, 10)
    await wait_until(lambda: sample(sc, "gts_sidecar_client_aborts_total", listener="inbound") == 1)


async def test_the_outbound_listener_routes_grpc_by_authority(sidecar_factory, grpc_app, channel):
    app, port = grpc_app
    sc = await sidecar_factory(
        {"upstreams": {"inventory": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}}}
    )
    ch = channel(sc.ports["outbound"], authority="inventory")
    reply = await asyncio.to_thread(
        unary, ch, "/pkg.Svc/Echo", b"out", metadata=[("x-gts-xid", GOOD_XID)]
    )
    assert reply == b"echo:out"
    # written under the name the upstream expects (xid.app_headers, lowercased on HTTP/2)
    assert app.xids == [GOOD_XID]


async def test_many_concurrent_calls_share_the_pool(sidecar_factory, grpc_app, channel):
    app, port = grpc_app
    sc = await sidecar_factory(
        {
            "app": {
                "url": f"http://127.0.0.1:{port}",
                "protocol": "h2c",
                "pool": {"max_connections": 1, "max_idle": 1},
            }
        }
    )
    ch = channel(sc.ports["inbound"])
    replies = await asyncio.gather(
        *(asyncio.to_thread(unary, ch, "/pkg.Svc/Echo", b"%d" % i) for i in range(30))
    )
    assert sorted(replies) == sorted(b"echo:%d" % i for i in range(30))


# --- declarative transactions on gRPC methods --------------------------------------------------

TXN_RULES = {
    "transactions": [
        {"match": {"method": "POST", "path": "/pkg.Svc/Echo"}, "name": "echo", "timeout": "20s"},
        {"match": {"method": "POST", "path": "/pkg.Svc/Fail"}, "name": "fail", "timeout": "20s"},
    ]
}


def unary_with_call(ch: grpc.Channel, method: str, request: bytes) -> tuple[bytes, Any]:
    result: tuple[bytes, Any] = ch.unary_unary(method).with_call(request, timeout=60)
    return result


async def test_a_grpc_method_declared_as_a_transaction_commits_on_ok(
    sidecar_factory, grpc_app, channel
):
    app, port = grpc_app
    sc = await sidecar_factory(
        {"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}, **TXN_RULES}
    )
    ch = channel(sc.ports["inbound"])
    reply, call = await asyncio.to_thread(unary_with_call, ch, "/pkg.Svc/Echo", b"order")
    assert reply == b"echo:order"
    initial = dict(call.initial_metadata())
    xid = initial["xid"]
    assert app.xids == [xid]
    assert initial["x-gts-transaction-status"] == "Committed"
    assert (await sc.control.engine.get(xid))[0].status.value == "Committed"
    # the call's deadline (60 s) was clamped to the transaction's time left (20 s)
    (left,) = app.time_left
    assert left is not None and left <= 20.0


async def test_a_grpc_method_declared_as_a_transaction_rolls_back_on_an_error_status(
    sidecar_factory, grpc_app, channel
):
    app, port = grpc_app
    sc = await sidecar_factory(
        {"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}, **TXN_RULES}
    )
    ch = channel(sc.ports["inbound"])
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(unary_with_call, ch, "/pkg.Svc/Fail", b"order")
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    trailing = dict(info.value.trailing_metadata() or ())
    (xid,) = app.xids
    assert trailing["xid"] == xid
    assert trailing["x-gts-transaction-status"] == "Rollbacked"
    assert (await sc.control.engine.get(xid))[0].status.value == "Rollbacked"


# --- TCC branches on gRPC methods --------------------------------------------------------------

INV_TCC = {
    "tcc": [
        {
            "resource": "inv",
            "try": {"method": "POST", "path": "/pkg.Inv/Try"},
            "confirm": {"method": "POST", "path": "/pkg.Inv/Confirm"},
            "cancel": {"method": "POST", "path": "/pkg.Inv/Cancel"},
        }
    ]
}


@pytest.fixture
def inventory_app() -> Iterator[tuple[list[tuple[str, bytes, str | None]], int]]:
    """A grpcio inventory with Try/Confirm/Cancel recording (method, message, branch id)."""
    calls: list[tuple[str, bytes, str | None]] = []

    def handler(name: str) -> Any:
        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            calls.append((name, request, _metadata(context).get("x-gts-branch-id")))
            if request == b"fail":
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no stock")
            return b"ok"

        return grpc.unary_unary_rpc_method_handler(handle)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "pkg.Inv", {name: handler(name) for name in ("Try", "Confirm", "Cancel")}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield calls, port
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize("commit", [True, False])
async def test_a_grpc_try_gets_its_confirm_or_cancel_with_its_message_replayed(
    sidecar_factory, inventory_app, channel, commit
):
    calls, port = inventory_app
    sc = await sidecar_factory(
        {"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}, **INV_TCC}
    )
    engine = sc.control.engine
    tx = await engine.begin("order", 60_000)
    ch = channel(sc.ports["inbound"])
    reply = await asyncio.to_thread(
        unary, ch, "/pkg.Inv/Try", b"sku-42", metadata=[("xid", tx.xid)]
    )
    assert reply == b"ok"
    await (engine.commit if commit else engine.rollback)(tx.xid)
    await wait_until(lambda: len(calls) == 2, timeout=10)
    (try_name, try_msg, branch), (phase_name, phase_msg, phase_branch) = calls
    assert (try_name, try_msg) == ("Try", b"sku-42")
    # phase two is a gRPC call to the declared method with the try's message, once
    assert phase_name == ("Confirm" if commit else "Cancel")
    assert phase_msg == b"sku-42"
    assert phase_branch is not None
    # the app has the call before the sidecar has its answer: the final state follows it
    final = "Committed" if commit else "Rollbacked"
    deadline = asyncio.get_running_loop().time() + 10
    while (await engine.get(tx.xid))[0].status.value != final:
        assert asyncio.get_running_loop().time() < deadline, "phase two never finished"
        await asyncio.sleep(0.005)


async def test_a_failed_grpc_try_is_reported_failed_before_its_caller_hears(
    sidecar_factory, inventory_app, channel
):
    calls, port = inventory_app
    sc = await sidecar_factory(
        {"app": {"url": f"http://127.0.0.1:{port}", "protocol": "h2c"}, **INV_TCC}
    )
    engine = sc.control.engine
    tx = await engine.begin("order", 60_000)
    ch = channel(sc.ports["inbound"])
    with pytest.raises(grpc.RpcError) as info:
        await asyncio.to_thread(unary, ch, "/pkg.Inv/Try", b"fail", metadata=[("xid", tx.xid)])
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # by the time the caller has its error, the branch is recorded failed: a commit the
    # caller sends anyway cannot confirm it
    _, branches = await engine.get(tx.xid)
    (branch,) = branches
    assert branch.status.value == "PhaseOne_Failed"


# --- HTTP/2 through TLS to the app (protocol: h2) -----------------------------------------------


async def _sidecar_to_h2_tls_app(sidecar_factory: Any, port: int, ca: Any, tmp: Any) -> Any:
    """A sidecar whose app is https://localhost:PORT with protocol h2, trusting `ca`."""
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    app = {"url": f"https://localhost:{port}", "protocol": "h2", "tls": {"ca_file": str(ca_file)}}
    return await sidecar_factory({"app": app})


async def test_protocol_h2_reaches_a_grpc_server_through_tls(sidecar_factory, channel, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    app = App()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((_handlers(app),))
    chain = b"".join(b.bytes() for b in cert.cert_chain_pems)
    creds = grpc.ssl_server_credentials([(cert.private_key_pem.bytes(), chain)])
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        sc = await _sidecar_to_h2_tls_app(sidecar_factory, port, ca, tmp_path)
        ch = channel(sc.ports["inbound"])
        reply = await asyncio.to_thread(
            unary, ch, "/pkg.Svc/Echo", b"tls", metadata=[("xid", GOOD_XID)]
        )
        assert reply == b"echo:tls"
        assert app.xids == [GOOD_XID]
    finally:
        server.stop(grace=None)


async def test_protocol_h2_to_a_server_without_http2_is_a_clear_502(
    sidecar_factory, channel, tmp_path
):
    """An https upstream that answers ALPN with http/1.1 only: UNAVAILABLE naming why."""
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(ctx)
    ctx.set_alpn_protocols(["http/1.1"])

    async def h1(request: web.Request) -> web.Response:
        return web.Response(text="h1")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", h1)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    try:
        sc = await _sidecar_to_h2_tls_app(sidecar_factory, runner.addresses[0][1], ca, tmp_path)
        ch = channel(sc.ports["inbound"])
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(unary, ch, "/pkg.Svc/Echo", b"x")
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "ALPN" in (info.value.details() or "")
    finally:
        await runner.cleanup()
