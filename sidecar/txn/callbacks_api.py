"""The phase-two callback routes on the peer listener (behind the signature gate):

POST /v1/resources/{resource}/commit     → {"status": "PhaseTwo_Committed" | …_Retryable}
POST /v1/resources/{resource}/rollback   → {"status": "PhaseTwo_Rollbacked" | …_Retryable}
"""

from __future__ import annotations

from typing import Final

import orjson
from aiohttp import web

from sidecar.coordinator.server import BODY
from sidecar.tracing import enter, leave
from sidecar.tracing import parse as parse_traceparent
from sidecar.txn.branches import CALLBACK_PREFIX, Participant

PARTICIPANT: Final = web.AppKey("participant", Participant)


async def _phase_two(request: web.Request, commit: bool) -> web.Response:
    traceparent = request.headers.get("traceparent")
    # this handler's log lines carry the transaction's trace (and XID) ...
    token = enter(parse_traceparent(traceparent), request.headers.get("XID"))
    try:
        answer = await request.app[PARTICIPANT].phase_two(
            request.match_info["resource"], commit, request[BODY], traceparent
        )
    finally:
        leave(token)  # ... and nothing after it on the same connection does
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def commit(request: web.Request) -> web.Response:
    return await _phase_two(request, True)


async def rollback(request: web.Request) -> web.Response:
    return await _phase_two(request, False)


def add_callback_routes(app: web.Application, participant: Participant) -> None:
    app[PARTICIPANT] = participant
    app.router.add_post(f"{CALLBACK_PREFIX}/{{resource}}/commit", commit)
    app.router.add_post(f"{CALLBACK_PREFIX}/{{resource}}/rollback", rollback)
