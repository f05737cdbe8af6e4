"""GTS REST v1 served over aiohttp: the standalone coordinator's and the local coordinator's
routes, behind the signature gate.

Every request on the peer listener (but /healthz) passes the gate before its body is parsed:
key id known → timestamp within the window → signature → nonce never seen → optional bearer
JWT. Handlers stay thin: parse (protocol.py), call the engine, render.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from aiohttp import web

from sidecar.coordinator import protocol
from sidecar.coordinator.auth import verify_bearer
from sidecar.coordinator.engine import Engine
from sidecar.coordinator.nonces import NonceStore
from sidecar.coordinator.signing import WATCHED_RAW, KeyRing, verify
from sidecar.errors import PayloadTooLarge, SignatureInvalid
from sidecar.metrics import Metrics
from sidecar.tracing import enter, leave
from sidecar.tracing import parse as parse_traceparent
from sidecar.web_errors import as_response, json_response
from sidecar.web_lean import LEAN, Guard, LeanHandler, LeanRoutes, middleware
from sidecar.web_routing import application
from sidecar.xid import DEFAULT_MAX_LENGTH

log = logging.getLogger("sidecar.coordinator")

#: request bodies on the peer listener are small JSON documents
MAX_BODY: Final = 256 * 1024
#: how long commit/rollback waits for phase two before answering with the current status
DECISION_WAIT: Final = 1.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class SignatureGate:
    """Checks every signed request in the documented order (docs/signing.md: key id,
    timestamp, signature, nonce, bearer token); only then may its body be parsed."""

    def __init__(
        self,
        ring: KeyRing,
        nonces: NonceStore,
        window_s: float,
        metrics: Metrics,
        *,
        bearer_key: str | None = None,
        bearer_algorithms: list[str] | None = None,
        bearer_audience: str | None = None,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self.ring = ring
        self.nonces = nonces
        self.window_ms = int(window_s * 1000)
        self.metrics = metrics
        self.bearer_key = bearer_key
        self.bearer_algorithms = bearer_algorithms or ["HS256"]
        self.bearer_audience = bearer_audience
        self._clock_ms = clock_ms

    async def check(self, request: web.BaseRequest, body: bytes) -> None:
        raw_path, _, raw_query = request.raw_path.partition("?")
        try:
            verified = verify(
                self.ring,
                request.method,
                raw_path,
                raw_query,
                # only the headers the signature looks at (decoded; repeats kept)
                [
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in request.raw_headers
                    if k.lower() in WATCHED_RAW
                ],
                body,
                now_ms=self._clock_ms(),
                window_ms=self.window_ms,
            )
            if await self.nonces.seen(verified.key_id, verified.nonce, 2 * self.window_ms / 1000):
                raise SignatureInvalid(
                    "nonce already used: the request is a replay", reason="replay"
                )
        except SignatureInvalid as exc:
            self.metrics.signature_failures.labels(exc.reason).inc()
            raise
        if self.bearer_key is not None:
            verify_bearer(
                request.headers.get("Authorization"),
                self.bearer_key,
                algorithms=self.bearer_algorithms,
                audience=self.bearer_audience,
            )


#: the request body, read once by the gate (signed bytes) and parsed by the handler
BODY: Final = web.RequestKey("body", bytes)


def signed_only(gate: SignatureGate) -> Guard:
    """The peer listener's guard: every route but health passes the gate before its body is
    parsed; our errors become the error shape `{"error": {"code", "message"}}` with
    `x-gts-sidecar-error`. Log lines written while a request is handled carry its trace_id
    and XID."""

    async def guard(
        request: web.BaseRequest, handler: LeanHandler, param: str
    ) -> web.StreamResponse:
        headers = request.headers
        token = enter(parse_traceparent(headers.get("traceparent")), headers.get("XID"))
        try:
            if request.path != "/healthz":
                length = request.content_length
                if length is not None and length > MAX_BODY:
                    raise PayloadTooLarge(f"body larger than {MAX_BODY} bytes")
                try:
                    body = await request.read()
                except web.HTTPRequestEntityTooLarge:
                    raise PayloadTooLarge(f"body larger than {MAX_BODY} bytes") from None
                await gate.check(request, body)
                request[BODY] = body
            return await handler(request, param)
        except Exception as exc:
            return as_response(request, exc)
        finally:
            leave(token)

    return guard


class GtsRoutes:
    """GTS REST v1's handlers on one engine. (A handler runs once the gate has passed.)"""

    def __init__(self, engine: Engine, xid_max_length: int = DEFAULT_MAX_LENGTH) -> None:
        self.engine = engine
        #: xid.max_length: XIDs in paths and bodies are held to the same limit as on the
        #: data plane
        self.xid_max_length = xid_max_length

    def _xid(self, value: str) -> str:
        return protocol.xid_field(value, max_length=self.xid_max_length)

    async def start(self, request: web.BaseRequest, _: str) -> web.Response:
        body = request[BODY]
        req = protocol.parse_start(body)
        headers = request.headers
        record = await self.engine.begin(
            req.name,
            req.timeout_ms,
            idempotency_key=headers.get("Idempotency-Key"),
            request_hash=protocol.body_hash(body),
            # the caller's trace: stored with the transaction, every later call made for it
            # (phase two, after a restart too) belongs to it
            traceparent=headers.get("traceparent"),
        )
        # timeoutMs: the timeout applied (the default when none was asked), so that the
        # client knows the transaction's deadline and keeps its own calls within it
        return json_response(
            {"xid": record.xid, "status": record.status.value, "timeoutMs": record.timeout_ms}
        )

    async def commit(self, request: web.BaseRequest, xid: str) -> web.Response:
        record = await self.engine.commit(self._xid(xid), wait=DECISION_WAIT)
        return json_response({"xid": record.xid, "status": record.status.value})

    async def rollback(self, request: web.BaseRequest, xid: str) -> web.Response:
        record = await self.engine.rollback(self._xid(xid), wait=DECISION_WAIT)
        return json_response({"xid": record.xid, "status": record.status.value})

    async def status(self, request: web.BaseRequest, xid: str) -> web.Response:
        record, branches = await self.engine.get(self._xid(xid))
        return json_response(protocol.render_global(record, branches))

    async def register(self, request: web.BaseRequest, _: str) -> web.Response:
        body = request[BODY]
        req = protocol.parse_register(body, self.xid_max_length)
        headers = request.headers
        engine = self.engine
        branch = await engine.register(
            req.xid,
            req.branch_type,
            req.resource_id,
            req.callback_url,
            req.application_data,
            idempotency_key=headers.get("Idempotency-Key"),
            request_hash=protocol.body_hash(body),
            traceparent=headers.get("traceparent"),
        )
        answer: dict[str, object] = {
            "xid": branch.xid,
            "branchId": protocol.id_text(branch.branch_id),
        }
        deadline = engine.deadline_ms(branch.xid)
        if deadline is not None:
            # how long the transaction has left: the branch's sidecar keeps its calls (and
            # the try it forwards) within it, though it did not begin the transaction
            answer["timeLeftMs"] = max(0, deadline - _now_ms())
        return json_response(answer)

    async def report(self, request: web.BaseRequest, _: str) -> web.Response:
        req = protocol.parse_report(request[BODY], self.xid_max_length)
        branch = await self.engine.report(req.xid, req.branch_id, req.status)
        return json_response(
            {
                "xid": branch.xid,
                "branchId": protocol.id_text(branch.branch_id),
                "status": branch.status.value,
            }
        )


#: the health answer, rendered once
_HEALTHY: Final = b'{"status":"ok"}'


async def healthz(request: web.BaseRequest, _: str) -> web.Response:
    return json_response(_HEALTHY)


def add_gts_routes(
    app: web.Application, engine: Engine, *, xid_max_length: int = DEFAULT_MAX_LENGTH
) -> None:
    """GTS REST v1 on `app` (a peer app: its lean routes are in `app[LEAN]`)."""
    gts = GtsRoutes(engine, xid_max_length)
    routes = app[LEAN]
    api = protocol.API
    routes.add(app, "POST", f"{api}/transaction/start", gts.start)
    routes.add(app, "POST", f"{api}/transaction/{{xid}}/commit", gts.commit)
    routes.add(app, "POST", f"{api}/transaction/{{xid}}/rollback", gts.rollback)
    routes.add(app, "GET", f"{api}/transaction/{{xid}}", gts.status)
    routes.add(app, "POST", f"{api}/branch/register", gts.register)
    routes.add(app, "POST", f"{api}/branch/report", gts.report)


def build_peer_app(
    gate: SignatureGate, engine: Engine | None, *, xid_max_length: int = DEFAULT_MAX_LENGTH
) -> web.Application:
    """The peer listener: health, and (when this process coordinates) GTS REST v1. Its own
    routes are lean (web_lean.py: served by `web_lean.setup`, they skip aiohttp's router and
    middleware chain); routes added later (phase-two callbacks) take aiohttp's path, behind
    the same gate."""
    guard = signed_only(gate)
    app = application(middlewares=[middleware(guard)], client_max_size=MAX_BODY)
    routes = app[LEAN] = LeanRoutes(guard)
    routes.add(app, "GET", "/healthz", healthz)
    if engine is not None:
        add_gts_routes(app, engine, xid_max_length=xid_max_length)
    return app
