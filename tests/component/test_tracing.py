"""Trace context end to end, over real sockets: one sidecar with its local coordinator, an app
that begins an order (declared transaction) and calls a TCC participant through the sidecar,
and an OTLP/HTTP receiver in the test that decodes the spans the SDK exports.

A request carrying `traceparent` reaches the app unchanged, its transaction's confirm
reaches the participant app in the same trace, and the spans (transaction, registration,
phase-two call, confirm) arrive with the parent/child links of that story. Log lines about
the transaction carry its trace_id and xid; the access log writes one line per request."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from sidecar import tracing
from sidecar.logs import JsonFormatter
from sidecar.proxy import access_log
from tests.component.h2client import H2Client
from tests.component.otlp_receiver import OtlpReceiver
from tests.component.servers import free_port, wait_until

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
APP_SPAN = "b7ad6b7169203331"


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Every log line as the sidecar writes it (the JSON formatter), at info and above."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


class Apps:
    """The order app and the inventory participant, in one aiohttp app."""

    def __init__(self) -> None:
        self.outbound = 0
        self.seen: dict[str, list[dict[str, str]]] = {}
        self.confirm_failures = 1  # the first confirm fails: the coordinator retries

    def _record(self, request: web.Request) -> None:
        self.seen.setdefault(request.path, []).append(dict(request.headers))

    async def orders(self, request: web.Request) -> web.Response:
        self._record(request)
        async with aiohttp.ClientSession() as s:
            async with s.post(
                f"http://127.0.0.1:{self.outbound}/inventory/deduct",
                data=b'{"sku":"A1"}',
                # the app propagates its trace, as an instrumented app does
                headers={"XID": request.headers["XID"],
                         "traceparent": f"00-{TRACE}-{APP_SPAN}-01"},
            ) as r:  # fmt: skip
                assert r.status == 200, await r.text()
        return web.json_response({"order": 1}, status=201)

    async def deduct(self, request: web.Request) -> web.Response:
        self._record(request)
        return web.json_response({"ok": True})

    async def confirm(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.confirm_failures:
            self.confirm_failures -= 1
            return web.json_response({"busy": True}, status=503)
        return web.json_response({"ok": True})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/orders", self.orders)
        app.router.add_post("/deduct", self.deduct)
        app.router.add_post("/deduct/confirm", self.confirm)
        app.router.add_post("/deduct/cancel", self.confirm)
        return app


async def _stack(sidecar_factory, aiohttp_server, *, otlp: int | None, access: bool):
    apps = Apps()
    server = await aiohttp_server(apps.app())
    inbound_port = free_port()  # known before start: the app calls its own sidecar
    cfg: dict[str, Any] = {
        "listeners": {"inbound": {"bind": f"127.0.0.1:{inbound_port}"}},
        "upstreams": {"inventory": {"url": f"http://127.0.0.1:{inbound_port}"}},
        "app": {"url": f"http://127.0.0.1:{server.port}"},
        "transactions": [
            {"match": {"method": "POST", "path": "/orders"}, "name": "order", "timeout": "30s"}
        ],
        "tcc": [
            {
                "resource": "inventory-deduct",
                "try": {"method": "POST", "path": "/deduct"},
                "confirm": {"method": "POST", "path": "/deduct/confirm"},
                "cancel": {"method": "POST", "path": "/deduct/cancel"},
            }
        ],
        "local_coordinator": {"phase_two": {"initial": "10ms", "max": "50ms"}},
        "logging": {"level": "info", "access_log": {"enabled": access}},
    }
    if otlp is not None:
        cfg["tracing"] = {"otlp_endpoint": f"http://127.0.0.1:{otlp}"}
    sc = await sidecar_factory(cfg)
    apps.outbound = sc.ports["outbound"]
    return sc, apps


async def _order(sc) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{sc.ports['inbound']}/orders",
            headers={"traceparent": f"00-{TRACE}-{CLIENT_SPAN}-01", "tracestate": "vendor=a1"},
        ) as r:
            await r.read()
            return r


async def test_a_traced_order_confirms_in_its_trace_with_linked_spans(
    sidecar_factory, aiohttp_server, log_lines
) -> None:
    receiver = OtlpReceiver()
    otlp = await aiohttp_server(receiver.app())
    sc, apps = await _stack(sidecar_factory, aiohttp_server, otlp=otlp.port, access=True)

    r = await _order(sc)
    assert r.status == 201
    assert r.headers["x-gts-transaction-status"] == "Committed"
    xid = r.headers["XID"]

    # the trace context passes through the proxy unchanged
    (order,) = apps.seen["/orders"]
    assert order["traceparent"] == f"00-{TRACE}-{CLIENT_SPAN}-01"
    assert order["tracestate"] == "vendor=a1"
    # ... and through the outbound listener and the participant's inbound one
    (deduct,) = apps.seen["/deduct"]
    assert deduct["traceparent"] == f"00-{TRACE}-{APP_SPAN}-01"

    # the confirm (after one failed attempt) reaches the participant app in the same trace
    await wait_until(lambda: len(apps.seen.get("/deduct/confirm", [])) == 2, 20)
    confirms = [tracing.parse(h["traceparent"]) for h in apps.seen["/deduct/confirm"]]
    assert all(c is not None and c.trace_id == TRACE for c in confirms)
    assert confirms[0] != confirms[1]  # a new span per call
    assert apps.seen["/deduct/confirm"][1]["XID"] == xid

    # spans at the OTLP receiver, with the links of the story
    def arrived() -> bool:
        return (
            len(receiver.named("gts confirm inventory-deduct")) == 2
            and len(receiver.named("gts transaction order")) == 1
        )

    await wait_until(arrived, 20)
    assert {s.trace_id for s in receiver.spans} == {TRACE}
    (txn,) = receiver.named("gts transaction order")
    assert txn.parent_span_id == CLIENT_SPAN  # the request that began it
    assert txn.span_id == tracing.transaction_span_id(xid)
    assert txn.attributes["gts.xid"] == xid
    assert txn.attributes["gts.status"] == "Committed"
    assert txn.end_ns >= txn.start_ns > 0
    (register,) = receiver.named("gts register branch")
    assert register.parent_span_id == APP_SPAN  # the try request that registered it
    phase_two = receiver.named("gts phase two commit")
    assert len(phase_two) == 2
    assert {p.parent_span_id for p in phase_two} == {txn.span_id}
    confirm_spans = receiver.named("gts confirm inventory-deduct")
    by_parent = {c.parent_span_id: c for c in confirm_spans}
    assert set(by_parent) == {p.span_id for p in phase_two}
    # the app got the confirm span's own position as its parent
    assert {c.span_id for c in confirm_spans} == {c.span_id for c in confirms if c}
    assert sorted(c.status_code for c in confirm_spans) == [0, 2]  # unset, then error
    assert txn.resource["service.name"] == "gts-sidecar"

    lines = _lines(log_lines)
    # the failed confirm's log line carries the transaction's trace and XID
    failed = [ln for ln in lines if ln["msg"].startswith("phase two at the app failed")]
    assert failed and failed[0]["trace_id"] == TRACE and failed[0]["xid"] == xid
    # the access log: one line per proxied request, with its fields
    access = [ln for ln in lines if ln["logger"] == "sidecar.access"]
    first = next(ln for ln in access if ln["path"] == "/orders")
    assert first["listener"] == "inbound"
    assert first["method"] == "POST"
    assert first["status"] == 201
    assert first["xid"] == xid
    assert first["trace_id"] == TRACE
    assert first["upstream"] == "app"
    assert first["bytes_out"] == len(b'{"order": 1}')
    assert first["duration_ms"] > 0
    deduct = [ln for ln in access if ln["path"] in ("/deduct", "/inventory/deduct")]
    assert {ln["listener"] for ln in deduct} == {"inbound", "outbound"}
    assert all(ln["xid"] == xid and ln["bytes_in"] == len(b'{"sku":"A1"}') for ln in deduct)


async def test_without_an_exporter_calls_still_carry_the_trace(
    sidecar_factory, aiohttp_server, log_lines, monkeypatch
) -> None:
    """No tracing section: nothing is exported, the confirm still belongs to the trace; the
    access log is off and its hook never runs."""
    calls: list[object] = []
    monkeypatch.setattr(access_log.AccessLog, "write", lambda *a: calls.append(a))
    sc, apps = await _stack(sidecar_factory, aiohttp_server, otlp=None, access=False)
    assert access_log.writer is None
    apps.confirm_failures = 0
    r = await _order(sc)
    assert r.status == 201
    await wait_until(lambda: len(apps.seen.get("/deduct/confirm", [])) == 1, 20)
    (confirm,) = apps.seen["/deduct/confirm"]
    parsed = tracing.parse(confirm["traceparent"])
    assert parsed is not None and parsed.trace_id == TRACE
    assert calls == []
    assert not [ln for ln in _lines(log_lines) if ln["logger"] == "sidecar.access"]


async def test_a_transaction_begun_without_a_trace_gets_one(sidecar_factory, aiohttp_server):
    sc, apps = await _stack(sidecar_factory, aiohttp_server, otlp=None, access=False)
    apps.confirm_failures = 0
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{sc.ports['inbound']}/orders") as r:
            assert r.status == 201
            xid = r.headers["XID"]
    await wait_until(lambda: len(apps.seen.get("/deduct/confirm", [])) == 1, 20)
    parsed = tracing.parse(apps.seen["/deduct/confirm"][0]["traceparent"])
    assert parsed is not None
    record, _ = await sc.control.engine.get(xid)
    stored = tracing.parse(record.traceparent)
    assert stored is not None and stored.trace_id == parsed.trace_id
    # the transaction's span is the root of its new trace
    assert stored.span_id == tracing.transaction_span_id(xid)


async def test_http2_requests_keep_their_trace(sidecar_factory, aiohttp_server) -> None:
    """h2c on the inbound listener: the trace context passes unchanged, and the transaction
    the request begins confirms in its trace."""
    sc, apps = await _stack(sidecar_factory, aiohttp_server, otlp=None, access=False)
    apps.confirm_failures = 0
    client = await H2Client.connect(sc.ports["inbound"])
    try:
        sid = await client.send_request(
            "/orders",
            method="POST",
            headers=[("traceparent", f"00-{TRACE}-{CLIENT_SPAN}-01"), ("tracestate", "v=1")],
            body=b"",
        )
        while not client.responses[sid].ended:
            assert await client.pump(10)
        assert client.responses[sid].status == 201
    finally:
        client.close()
    (order,) = apps.seen["/orders"]
    assert order["traceparent"] == f"00-{TRACE}-{CLIENT_SPAN}-01"
    assert order["tracestate"] == "v=1"
    await wait_until(lambda: len(apps.seen.get("/deduct/confirm", [])) == 1, 20)
    parsed = tracing.parse(apps.seen["/deduct/confirm"][0]["traceparent"])
    assert parsed is not None and parsed.trace_id == TRACE


async def test_a_tm_api_begin_stores_the_callers_trace(sidecar_factory) -> None:
    sc = await sidecar_factory()
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{sc.ports['api']}/v1/transactions",
            json={"name": "manual", "timeout": "30s"},
            headers={"traceparent": f"00-{TRACE}-{APP_SPAN}-01"},
        ) as r:
            assert r.status == 200, await r.text()
            xid = (await r.json())["xid"]
    record, _ = await sc.control.engine.get(xid)
    assert record.traceparent == f"00-{TRACE}-{APP_SPAN}-01"
    assert tracing.current() == (None, None)  # nothing left behind in the test's context


async def test_the_access_log_records_what_the_sidecar_answered_itself(
    sidecar_factory, aiohttp_server, log_lines
) -> None:
    sc, _ = await _stack(sidecar_factory, aiohttp_server, otlp=None, access=True)
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"http://127.0.0.1:{sc.ports['inbound']}/stock?sku=1",
            headers={"XID": "10.0.0.1:17020:", "traceparent": f"00-{TRACE}-{APP_SPAN}-01"},
        ) as r:
            assert r.status == 400
    await wait_until(lambda: any(ln["logger"] == "sidecar.access" for ln in _lines(log_lines)), 5)
    (line,) = [ln for ln in _lines(log_lines) if ln["logger"] == "sidecar.access"]
    assert line["status"] == 400 and line["error"] == "XID_INVALID"
    assert line["path"] == "/stock?sku=1" and line["method"] == "GET"
    assert line["trace_id"] == TRACE and line["xid"] is None and line["upstream"] is None


async def test_the_access_log_follows_a_reload_and_tracing_needs_a_restart(
    tmp_path, aiohttp_server
) -> None:
    import yaml

    from sidecar import config as configmod
    from sidecar.metrics import Metrics
    from sidecar.reload import file_digest
    from sidecar.server import Sidecar
    from tests.conftest import LOOPBACK_LISTENERS

    app = await aiohttp_server(web.Application())
    path = tmp_path / "sidecar.yaml"
    data: dict[str, Any] = {
        "listeners": LOOPBACK_LISTENERS,
        "app": {"url": f"http://127.0.0.1:{app.port}"},
        "local_coordinator": {"journal": "memory://"},
    }
    path.write_text(yaml.safe_dump(data))
    sc = Sidecar(
        configmod.load(str(path)), config_path=str(path), config_digest=file_digest(str(path)),
        metrics=Metrics(), reload_interval=3600,
    )  # fmt: skip
    await sc.start()
    try:
        assert access_log.writer is None
        data["logging"] = {"access_log": {"enabled": True, "sample_ratio": 0.5}}
        path.write_text(yaml.safe_dump(data))
        assert await sc.reload("SIGHUP") == "applied"
        assert access_log.writer is not None and access_log.writer.ratio == 0.5
        path.write_text(yaml.safe_dump({**data, "tracing": {"otlp_endpoint": "http://o:4318"}}))
        assert await sc.reload("SIGHUP") != "applied"  # refused: needs a restart
        assert sc.config.tracing.otlp_endpoint is None
    finally:
        await sc.close()
    assert access_log.writer is None
