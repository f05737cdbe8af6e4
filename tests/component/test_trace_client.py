"""The coordinator client (RemoteCoordinator) over a real socket to a recording stand-in for
a coordinator: every call carries a traceparent, a new span id per call, in the trace of the
request it is made for, or in the trace its begin started when there was none."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from sidecar import config as configmod
from sidecar import tracing
from sidecar.coordinator.client import RemoteCoordinator
from sidecar.coordinator.signing import KeyRing
from sidecar.metrics import Metrics

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
XID = "127.0.0.1:17020:42"


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, request.headers.get("traceparent")))
        if request.path.endswith("/start"):
            return web.json_response({"xid": XID, "status": "Begin", "timeoutMs": 30_000})
        return web.json_response({"xid": XID, "status": "Committed"})

    def traces(self) -> list[tracing.TraceContext]:
        out = [tracing.parse(tp) for _, tp in self.seen]
        assert all(t is not None for t in out), self.seen
        return [t for t in out if t is not None]


async def _client(tmp_path: Path, aiohttp_server) -> tuple[RemoteCoordinator, Recorder]:
    recorder = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = await aiohttp_server(app)
    key = tmp_path / "k.key"
    key.write_text("trace-client-secret-0123456789abcdef\n")
    cfg = configmod.parse(
        {
            "coordinator": {
                "endpoints": [f"http://127.0.0.1:{server.port}"],
                "signing": {"key_id": "k1", "secret_file": str(key)},
            }
        },
        env={},
    )
    client = RemoteCoordinator(
        cfg.coordinator, KeyRing.from_config(cfg.coordinator.signing), Metrics()
    )
    return client, recorder


async def test_calls_carry_the_request_trace(tmp_path: Path, aiohttp_server) -> None:
    client, recorder = await _client(tmp_path, aiohttp_server)
    token = tracing.enter(tracing.TraceContext(TRACE, SPAN), None)
    try:
        await client.begin("order", 30_000)
    finally:
        tracing.leave(token)
    # the commit comes from a task that is not about the request any more
    await client.commit(XID)
    await client.close()
    begin, commit = recorder.traces()
    assert begin.trace_id == commit.trace_id == TRACE
    assert len({SPAN, begin.span_id, commit.span_id}) == 3


async def test_a_begin_outside_any_trace_starts_one_its_decision_shares(
    tmp_path: Path, aiohttp_server
) -> None:
    client, recorder = await _client(tmp_path, aiohttp_server)
    await client.begin("order", 30_000)
    await client.rollback(XID)
    await client.close()
    begin, rollback = recorder.traces()
    assert begin.trace_id == rollback.trace_id
    assert rollback.span_id != begin.span_id
