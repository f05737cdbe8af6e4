"""The admin listener's outbox endpoints: decisions for the coordinator cluster that are kept
undelivered (pending) or that the cluster refused (stuck), for an operator to see and settle.

- `GET /admin/outbox[?state=pending|stuck]` lists them, oldest first, with the depth and cap;
- `POST /admin/outbox/{xid}/retry` sends a stuck (or pending) decision again now;
- `POST /admin/outbox/{xid}/skip` forgets it (the operator settled the transaction by hand).

Behind the admin token like the rest of /admin/*. A sidecar with no cluster configured has
no outbox: the list is empty and retry/skip answer 404.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from sidecar.coordinator.outbox import Outbox, OutboxItemNotFound
from sidecar.web_errors import error_response, json_response

_STATES = ("pending", "stuck")


def _outbox(request: web.Request, key: web.AppKey[Any]) -> Outbox | None:
    # the running sidecar's control plane owns the router that owns the outbox
    control = getattr(request.app[key], "control", None)
    router = getattr(control, "router", None)
    outbox = getattr(router, "outbox", None)
    return outbox if isinstance(outbox, Outbox) else None


def add_outbox_routes(app: web.Application, key: web.AppKey[Any]) -> None:
    """`key` is the admin app's state key (the running sidecar or coordinator)."""

    async def listing(request: web.Request) -> web.Response:
        state = request.query.get("state")
        if state is not None and state not in _STATES:
            return error_response(
                400, "INVALID_REQUEST", f"state must be one of {', '.join(_STATES)}"
            )
        outbox = _outbox(request, key)
        if outbox is None:
            return json_response({"items": [], "depth": 0, "maxItems": None})
        items = await outbox.items(state if state in _STATES else None)  # type: ignore[arg-type]
        return json_response(
            {
                "items": [i.render() for i in items],
                "depth": outbox.depth,
                "maxItems": outbox.max_items,
            }
        )

    async def operate(request: web.Request, action: str) -> web.Response:
        xid = request.match_info["xid"]
        outbox = _outbox(request, key)
        if outbox is None:
            err = OutboxItemNotFound("this process has no outbox (no coordinator cluster)")
            return error_response(err.status, err.code, err.message)
        item = await (outbox.retry(xid) if action == "retry" else outbox.skip(xid))
        return json_response({**item.render(), "action": action})

    async def retry(request: web.Request) -> web.Response:
        return await operate(request, "retry")

    async def skip(request: web.Request) -> web.Response:
        return await operate(request, "skip")

    app.router.add_get("/admin/outbox", listing)
    app.router.add_post("/admin/outbox/{xid}/retry", retry)
    app.router.add_post("/admin/outbox/{xid}/skip", skip)
