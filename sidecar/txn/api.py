"""The app-facing transaction-manager API on the `api` listener (localhost).

    POST /v1/transactions                {"name": "...", "timeout": "30s"} → {xid, status}
    POST /v1/transactions/{xid}/commit   → {xid, status}
    POST /v1/transactions/{xid}/rollback → {xid, status}
    GET  /v1/transactions/{xid}          → {xid, status, name, timeoutMs, beginTime, branches}

`Idempotency-Key` on a begin makes a retried begin return the original transaction. Errors
are JSON `{"error": {"code", "message"}}` with `x-gts-sidecar-error`; a begin with a field the
API does not take (the coordinator protocol's `timeoutMs`, say) is refused, never ignored, and
one whose timeout does not exceed `coordinator.timeouts.request` is refused too (a coordinator
call made for it could outlive it). The calls go to the coordinator cluster, or to this
sidecar's own coordinator when no cluster is configured. 64-bit ids in answers are strings.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from sidecar.config import (
    CoordinatorTimeouts,
    LocalCoordinatorConfig,
    format_duration,
    parse_duration,
)
from sidecar.coordinator.client import Coordinator
from sidecar.coordinator.outbox import DecisionPending
from sidecar.coordinator.protocol import CONTROL_CHARS, ids_as_text, json_object
from sidecar.coordinator.states import is_final
from sidecar.errors import InvalidRequest, PayloadTooLarge
from sidecar.tracing import enter, leave
from sidecar.tracing import parse as parse_traceparent
from sidecar.web_errors import as_response, json_response, sidecar_error
from sidecar.web_routing import application
from sidecar.xid import DEFAULT_MAX_LENGTH
from sidecar.xid import parse as parse_xid

COORDINATOR: Final = web.AppKey("coordinator", Coordinator)
#: told the XID of every transaction this API saw finish (releases its global locks)
ON_FINISHED: Final[web.AppKey[Callable[[str], None]]] = web.AppKey("on_finished")
#: xid.max_length: XIDs in paths are held to the same limit as on the data plane
XID_MAX_LENGTH: Final = web.AppKey("xid_max_length", int)
#: seconds: coordinator.timeouts.request, which a begun transaction's timeout must exceed
CALL_TIMEOUT: Final = web.AppKey("call_timeout", float)
#: seconds: local_coordinator.max_timeout, the longest transaction this sidecar coordinates
MAX_TIMEOUT: Final = web.AppKey("max_timeout", float)
MAX_BODY: Final = 64 * 1024
#: the config's defaults for coordinator.timeouts.request and local_coordinator.max_timeout
CALL_TIMEOUT_DEFAULT: Final = CoordinatorTimeouts().request
MAX_TIMEOUT_DEFAULT: Final = LocalCoordinatorConfig().max_timeout
STATUS_HEADER: Final = "x-gts-transaction-status"
_KEY_RE: Final = re.compile(r"[!-~]{1,255}")
_BEGIN_FIELDS: Final = frozenset({"name", "timeout"})
_BEGIN_SHAPE: Final = '{"name": "create-order", "timeout": "30s"}'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    # the calls a handler makes (a begin: the transaction's trace) and its log lines are
    # about the caller's trace; reset after, the connection's next request is not
    token = enter(parse_traceparent(request.headers.get("traceparent")), None)
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return sidecar_error(PayloadTooLarge(f"body larger than {MAX_BODY} bytes"))
    except Exception as exc:
        return as_response(request, exc)
    finally:
        leave(token)


def _xid(request: web.Request) -> str:
    return parse_xid(request.match_info["xid"], request.app[XID_MAX_LENGTH]).raw


def _unknown_fields(data: dict[str, object]) -> None:
    """A field the begin does not take is refused: ignoring it would silently drop what the
    caller meant (a `timeoutMs` would leave the default timeout in force)."""
    unknown = sorted(set(data) - _BEGIN_FIELDS)
    if not unknown:
        return
    hint = (
        ' (the TM API takes "timeout", a duration string such as "30s"; timeoutMs belongs to '
        "the coordinator protocol)"
        if "timeoutMs" in unknown
        else ""
    )
    names = ", ".join(repr(k[:64]) for k in unknown[:5])
    raise InvalidRequest(
        f"unknown field(s) {names}{hint}: a begin takes only name and timeout: {_BEGIN_SHAPE}"
    )


def _timeout_ms(request: web.Request, timeout: object) -> int | None:
    """The begin's `timeout` (a duration string) in ms; every message names `timeout` and
    the value sent."""
    if timeout is None:
        return None
    if not isinstance(timeout, str):
        raise InvalidRequest(f'timeout must be a duration string such as "30s", got {timeout!r}')
    try:
        seconds = parse_duration(timeout)
    except ValueError as exc:
        raise InvalidRequest(f"timeout: {exc}") from None
    if seconds <= 0:
        raise InvalidRequest(f"timeout must be positive, got {timeout!r}")
    longest = request.app[MAX_TIMEOUT]
    if seconds > longest:
        raise InvalidRequest(
            f"timeout {timeout!r} must be at most {format_duration(longest)} "
            "(local_coordinator.max_timeout)"
        )
    call = request.app[CALL_TIMEOUT]
    if seconds <= call:
        # "committed, response lost": a coordinator call that outlives its transaction
        raise InvalidRequest(
            f"timeout {timeout!r} must be above coordinator.timeouts.request "
            f"({format_duration(call)}): every coordinator call made for the transaction "
            "must be able to give up before the transaction does"
        )
    return int(seconds * 1000)


async def begin(request: web.Request) -> web.Response:
    data = json_object(await request.read(), _BEGIN_SHAPE)
    _unknown_fields(data)
    name = data.get("name")
    if not isinstance(name, str) or not name or len(name) > 128:
        raise InvalidRequest("name must be a non-empty string of at most 128 characters")
    if CONTROL_CHARS.search(name):
        raise InvalidRequest("name must not contain control characters")
    timeout = data.get("timeout")
    timeout_ms = _timeout_ms(request, timeout)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _KEY_RE.fullmatch(key):
        raise InvalidRequest("Idempotency-Key must be 1-255 visible ASCII characters")
    try:
        state = await request.app[COORDINATOR].begin(name, timeout_ms, key)
    except InvalidRequest as exc:
        if timeout is None or "timeoutMs" not in exc.message:
            raise
        # a cluster whose limit is below ours: say so about the field the caller sent
        raise InvalidRequest(
            f"timeout {timeout!r} is refused by the coordinator ("
            + exc.message.replace("timeoutMs", "its timeout in ms")
            + ")"
        ) from None
    return json_response({"xid": state.xid, "status": state.status})


def _pending(err: DecisionPending) -> web.Response:
    response = sidecar_error(err)
    response.headers[STATUS_HEADER] = "Unknown"
    return response


async def commit(request: web.Request) -> web.Response:
    try:
        state = await request.app[COORDINATOR].commit(_xid(request))
    except DecisionPending as err:
        return _pending(err)
    _maybe_finished(request, state.xid, state.status)
    return json_response({"xid": state.xid, "status": state.status})


async def rollback(request: web.Request) -> web.Response:
    try:
        state = await request.app[COORDINATOR].rollback(_xid(request))
    except DecisionPending as err:
        return _pending(err)
    _maybe_finished(request, state.xid, state.status)
    return json_response({"xid": state.xid, "status": state.status})


def _maybe_finished(request: web.Request, xid: str, status: str) -> None:
    # with a remote coordinator no engine event says so: the final answer does (releasing
    # twice is harmless)
    if is_final(status):
        request.app[ON_FINISHED](xid)


async def status(request: web.Request) -> web.Response:
    return json_response(ids_as_text(await request.app[COORDINATOR].status(_xid(request))))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def _ignore(xid: str) -> None:
    pass


def build_api_app(
    coordinator: Coordinator,
    on_finished: Callable[[str], None] = _ignore,
    *,
    xid_max_length: int = DEFAULT_MAX_LENGTH,
    call_timeout: float = CALL_TIMEOUT_DEFAULT,
    max_timeout: float = MAX_TIMEOUT_DEFAULT,
) -> web.Application:
    """`call_timeout`: coordinator.timeouts.request; `max_timeout`:
    local_coordinator.max_timeout (both in seconds; the config's defaults when not given)."""
    app = application(middlewares=[errors], client_max_size=MAX_BODY)
    app[COORDINATOR] = coordinator
    app[ON_FINISHED] = on_finished
    app[XID_MAX_LENGTH] = xid_max_length
    app[CALL_TIMEOUT] = call_timeout
    app[MAX_TIMEOUT] = max_timeout
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/v1/transactions", begin)
    app.router.add_post("/v1/transactions/{xid}/commit", commit)
    app.router.add_post("/v1/transactions/{xid}/rollback", rollback)
    app.router.add_get("/v1/transactions/{xid}", status)
    return app
