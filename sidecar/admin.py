"""The admin listener (aiohttp): /metrics, /healthz, /readyz and /admin/*.

Metrics and health are open (kubelet and Prometheus call them). /admin/* is closed unless
`admin.token_file` is configured (403 ADMIN_DISABLED: settling a branch by hand must never be
one unauthenticated POST away), and then needs that bearer token (401 otherwise). The token
is read from the config in force per request, so a rotated token file applies on its reload.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.admin_outbox import add_outbox_routes
from sidecar.config import Config
from sidecar.coordinator.engine import Engine
from sidecar.coordinator.protocol import id_value, render_branch
from sidecar.errors import InvalidRequest, SidecarError
from sidecar.metrics import Metrics
from sidecar.web_errors import as_response, error_response, json_response


class AdminState(Protocol):
    """What the admin listener reads from the running sidecar."""

    metrics: Metrics

    @property
    def config(self) -> Config: ...
    @property
    def config_digest(self) -> str: ...
    async def readiness(self) -> list[str]: ...
    @property
    def engine(self) -> Engine | None: ...


STATE = web.AppKey("state", AdminState)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not state.config.metrics.enabled:  # read per scrape: a reload turns it on or off
        return error_response(404, "NOT_FOUND", "metrics are off (metrics.enabled: false)")
    body = generate_latest(state.metrics.registry)
    response = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
    if "gzip" in request.headers.get("Accept-Encoding", "").lower():  # Prometheus sends it
        response.enable_compression(web.ContentCoding.gzip)
    return response


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    problems = await state.readiness()
    if problems:
        state.metrics.ready.set(0)
        return json_response({"ready": False, "reasons": problems}, status=503)
    state.metrics.ready.set(1)
    return json_response({"ready": True})


async def stuck_branches(request: web.Request) -> web.Response:
    """Branches whose phase two gave up (GET /admin/branches?state=stuck)."""
    state = request.query.get("state", "stuck")
    if state != "stuck":
        return error_response(400, "INVALID_REQUEST", "only state=stuck is supported")
    engine = request.app[STATE].engine
    branches = engine.stuck() if engine is not None else []
    return json_response({"branches": [{"xid": b.xid, **render_branch(b)} for b in branches]})


async def _operate(request: web.Request, action: str) -> web.Response:
    engine = request.app[STATE].engine
    if engine is None:
        return error_response(404, "BRANCH_NOT_FOUND", "this process coordinates nothing")
    try:
        # digits only, 1..2^63-1 (int() would also take "+5", " 5", "5_0" or other scripts' digits)
        branch_id = id_value(request.match_info["branch_id"], "branch id")
    except InvalidRequest as err:
        return error_response(400, "INVALID_REQUEST", err.message)
    found = engine.find_branch(branch_id)
    if found is None:
        return error_response(404, "BRANCH_NOT_FOUND", f"no live branch {branch_id}")
    try:
        if action == "retry":
            branch = await engine.retry_branch(found.xid, branch_id)
        else:
            branch = await engine.skip_branch(found.xid, branch_id)
    except SidecarError as err:
        return error_response(err.status, err.code, err.message)
    return json_response({"xid": branch.xid, **render_branch(branch)})


async def retry_branch(request: web.Request) -> web.Response:
    """POST /admin/branches/{branch_id}/retry: un-stick a branch; phase two resumes."""
    return await _operate(request, "retry")


async def skip_branch(request: web.Request) -> web.Response:
    """POST /admin/branches/{branch_id}/skip: settle a stuck branch by hand."""
    return await _operate(request, "skip")


async def admin_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return json_response({"sha256": state.config_digest, "config": state.config.redacted()})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        if request.path.startswith("/admin/"):
            token = request.app[STATE].config.admin.token_file
            if token is None:
                return error_response(
                    403,
                    "ADMIN_DISABLED",
                    "admin endpoints are off: configure admin.token_file to turn them on",
                )
            # bytes as received (aiohttp keeps undecodable ones as surrogates)
            sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            expected = ("Bearer " + token.reveal()).encode()
            if not hmac.compare_digest(sent, expected):
                return error_response(
                    401, "UNAUTHORIZED", "admin endpoints need 'Authorization: Bearer <token>'"
                )
        return await handler(request)
    except Exception as exc:
        return as_response(request, exc)


def build_admin_app(state: AdminState) -> web.Application:
    app = web.Application(middlewares=[admin_auth])
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/config", admin_config)
    app.router.add_get("/admin/branches", stuck_branches)
    app.router.add_post("/admin/branches/{branch_id}/retry", retry_branch)
    app.router.add_post("/admin/branches/{branch_id}/skip", skip_branch)
    add_outbox_routes(app, STATE)  # /admin/outbox: undelivered and refused decisions
    return app
