"""Hostile clients of the inbound listener (issue 12: F3 forged phase two, F4 rule bypass
by path spelling, F5 XID alias spellings), over real loopback sockets. The app is the
recording `servers.Upstream`, so each test says exactly what reached it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.component.servers import (
    UpstreamFactory,
    error_of,
    get,
    request,
    wait_until,
)

GOOD_XID = "10.0.0.1:8091:2001"
TCC = [
    {
        "resource": "inventory-deduct",
        "try": {"method": "POST", "path": "/deduct"},
        "confirm": {"method": "POST", "path": "/deduct/confirm"},
        "cancel": {"method": "POST", "path": "/deduct/cancel"},
    }
]
SAGA = [
    {
        "resource": "ship",
        "action": {"method": "PUT", "path": "/ship"},
        "compensation": {"method": "DELETE", "path": "/ship"},
    }
]


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    factory = UpstreamFactory()
    yield factory
    await factory.close()


async def start(sidecar_factory: Any, upstream: UpstreamFactory, **cfg: Any):
    app = await upstream()
    app_cfg = {"url": app.url, **cfg.pop("app", {})}
    sc = await sidecar_factory({"app": app_cfg, **cfg})
    return sc, app, sc.ports["inbound"]


def post(path: str, *headers: str, body: bytes = b"{}") -> bytes:
    return get(path, *headers, method="POST", body=body)


# --- F3: phase two cannot be forged from outside -----------------------------------------------


async def test_client_sent_gts_headers_and_idempotency_key_never_reach_the_app(
    sidecar_factory, upstream
):
    sc, app, port = await start(sidecar_factory, upstream)
    forged = (
        "x-gts-branch-id: 7",
        "X-GTS-Phase: cancel",
        "X_GTS_Phase: cancel",
        "x-gts-anything: 1",
        "Idempotency-Key: gts:forged",
        "Idempotency_Key: gts:forged",
        "X-Other: kept",
    )
    resp = await request(port, post("/plain", *forged))
    assert resp.status == 200
    (req,) = app.requests
    names = req.names()
    assert not {n for n in names if n.replace("_", "-").startswith("x-gts-")}, req.raw_head
    assert "idempotency-key" not in names and "idempotency_key" not in names
    assert req.get("X-Other") == "kept"


async def test_idempotency_key_is_kept_only_on_allowlisted_routes(sidecar_factory, upstream):
    sc, app, port = await start(
        sidecar_factory,
        upstream,
        app={"idempotency_key_routes": [{"method": "POST", "path_prefix": "/payments/"}]},
    )
    await request(port, post("/payments/", "Idempotency-Key: k1", "x-gts-phase: confirm"))
    await request(port, post("/payments/42", "Idempotency-Key: k2"))
    await request(port, post("/orders", "Idempotency-Key: k3"))
    await request(port, get("/payments/42", "Idempotency-Key: k4"))  # GET: not listed
    got = [(r.target, r.get_all("Idempotency-Key"), r.get("x-gts-phase")) for r in app.requests]
    assert got == [
        ("/payments/", ["k1"], None),
        ("/payments/42", ["k2"], None),
        ("/orders", [], None),
        ("/payments/42", [], None),
    ]


async def test_outbound_passes_the_apps_own_idempotency_key(sidecar_factory, upstream):
    app = await upstream()
    peer = await upstream()
    sc = await sidecar_factory({"app": {"url": app.url}, "upstreams": {"svc": {"url": peer.url}}})
    resp = await request(sc.ports["outbound"], post("/svc/pay", "Idempotency-Key: mine"))
    assert resp.status == 200
    assert peer.requests[0].get_all("Idempotency-Key") == ["mine"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/deduct/confirm"),
        ("POST", "/deduct/cancel"),
        ("POST", "/deduct/cancel/"),
        ("POST", "//deduct/./cancel;x"),
        ("POST", "/deduct/%63ancel"),
        ("POST", "/deduct/cancel?xid=1"),
        ("DELETE", "/ship"),
    ],
)
async def test_declared_phase_two_routes_are_refused_on_the_inbound_listener(
    sidecar_factory, upstream, method, path
):
    sc, app, port = await start(sidecar_factory, upstream, tcc=TCC, saga=SAGA)
    resp = await request(
        port,
        get(path, f"XID: {GOOD_XID}", "x-gts-branch-id: 1", "x-gts-phase: cancel",
            method=method, body=b"{}"),
    )  # fmt: skip
    assert resp.status == 403
    err = error_of(resp)
    assert err["code"] == "PHASE_TWO_PATH"
    assert app.requests == []


async def test_other_methods_on_a_phase_two_path_and_the_saga_action_still_pass(
    sidecar_factory, upstream
):
    sc, app, port = await start(sidecar_factory, upstream, tcc=TCC)
    resp = await request(port, get("/deduct/confirm"))
    assert resp.status == 200
    assert [r.target for r in app.requests] == ["/deduct/confirm"]


async def test_an_encoded_slash_that_makes_a_declared_route_is_refused(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream, tcc=TCC)
    # a WSGI/ASGI or Go app decodes %2F before routing: to it these are phase-two routes
    for path in ("/deduct%2Fcancel", "/deduct%2fconfirm", "/deduct%5Ccancel"):
        resp = await request(port, post(path, f"XID: {GOOD_XID}"))
        assert resp.status == 403, path
        assert error_of(resp)["code"] == "PHASE_TWO_PATH"
    # a try for one reading, nothing for the other: neither is safe to assume
    resp = await request(port, post("/x%2F..%2Fdeduct"))
    assert resp.status == 400
    assert "encoded '/'" in error_of(resp)["message"]
    # an encoded slash that no reading turns into a declared route is the app's business
    resp = await request(port, get("/files/a%2Fb"))
    assert resp.status == 200
    assert [r.target for r in app.requests] == ["/files/a%2Fb"]


async def test_the_try_carries_only_the_sidecars_branch_id_and_phase_two_still_arrives(
    sidecar_factory, upstream
):
    sc, app, port = await start(sidecar_factory, upstream, tcc=TCC)
    engine = sc.control.engine
    tx = await engine.begin("t", 60_000)
    resp = await request(
        port,
        post("/deduct", f"XID: {tx.xid}", "x-gts-branch-id: 999", "X_GTS_Branch_Id: 998",
             "Idempotency-Key: forged"),
    )  # fmt: skip
    assert resp.status == 200
    (tried,) = app.requests
    assert len(tried.get_all("x-gts-branch-id")) == 1
    branch_id = tried.get("x-gts-branch-id")
    assert branch_id not in ("999", "998")
    assert "x_gts_branch_id" not in tried.names()
    assert tried.get_all("Idempotency-Key") == []
    # the sidecar's own phase two goes to the app directly, with its own headers
    await engine.commit(tx.xid)
    await wait_until(lambda: len(app.requests) == 2)
    confirm = app.requests[1]
    assert confirm.target == "/deduct/confirm"
    assert confirm.get_all("x-gts-branch-id") == [branch_id]
    assert confirm.get("x-gts-phase") == "confirm"
    assert confirm.get("Idempotency-Key") not in (None, "forged")


# --- F4: the rules match what the app will route -------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/deduct/", "//deduct", "/./deduct", "/%64educt", "/deduct;x", "/a/../deduct",
             "/deduct/.", "/%2e/deduct"]
)  # fmt: skip
async def test_a_try_in_another_spelling_still_needs_an_xid(sidecar_factory, upstream, path):
    sc, app, port = await start(sidecar_factory, upstream, tcc=TCC)
    resp = await request(port, post(path))
    assert resp.status == 400
    assert error_of(resp)["code"] == "XID_REQUIRED"
    assert app.requests == []


@pytest.mark.parametrize("path", ["/orders/", "//orders", "/orders;v=2", "/%6Frders"])
async def test_a_transaction_route_in_another_spelling_still_begins_one(
    sidecar_factory, upstream, path
):
    sc, app, port = await start(
        sidecar_factory,
        upstream,
        transactions=[{"name": "order", "match": {"method": "POST", "path": "/orders"}}],
    )
    resp = await request(port, post(path))
    assert resp.status == 200
    (req,) = app.requests
    assert req.target == path  # forwarded as sent: only matching uses the normal form
    xid = req.get("XID")
    assert xid is not None and xid.startswith("127.0.0.1:")


# --- F5: XID alias spellings --------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["TX-XID", "X_GTS_XID", "x_gts-xid", "Tx-Xid"])
async def test_an_alias_in_its_other_spelling_is_validated_not_passed_raw(
    sidecar_factory, upstream, alias
):
    sc, app, port = await start(sidecar_factory, upstream)
    resp = await request(port, get("/pay", f"{alias}: not-an-xid"))
    assert resp.status == 400
    assert error_of(resp)["code"] == "XID_INVALID"
    assert app.requests == []

    resp = await request(port, get("/pay", f"{alias}: {GOOD_XID}"))
    assert resp.status == 200
    (req,) = app.requests
    assert req.get_all("XID") == [GOOD_XID]
    assert alias.lower() not in req.names()


async def test_both_spellings_of_one_alias_are_a_repeated_header(sidecar_factory, upstream):
    sc, app, port = await start(sidecar_factory, upstream)
    resp = await request(port, get("/", f"TX_XID: {GOOD_XID}", f"TX-XID: {GOOD_XID}"))
    assert resp.status == 400
    assert error_of(resp)["code"] == "XID_INVALID"
    assert app.requests == []


async def test_an_app_header_that_is_no_alias_is_never_taken_from_the_client(
    sidecar_factory, upstream
):
    sc, app, port = await start(
        sidecar_factory, upstream, xid={"app_headers": ["XID", "X-Trace-Xid"]}
    )
    await request(port, get("/a", "X-Trace-Xid: 10.9.9.9:1:1", "X_Trace_Xid: 10.9.9.9:1:2"))
    await request(port, get("/b", f"XID: {GOOD_XID}", "X-Trace-Xid: 10.9.9.9:1:1"))
    first, second = app.requests
    assert first.get("X-Trace-Xid") is None and "x_trace_xid" not in first.names()
    assert second.get_all("X-Trace-Xid") == [GOOD_XID]  # only the validated one
