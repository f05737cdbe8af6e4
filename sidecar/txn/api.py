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
from sidecar.coordinator.client import Coordinator, TxState
from sidecar.coordinator.outbox import DecisionPending
from sidecar.coordinator.protocol import CONTROL_CHARS, ids_as_text, json_object
from sidecar.coordinator.states import is_final
from sidecar.errors import InvalidRequest, PayloadTooLarge
from sidecar.tracing import enter, leave
from sidecar.tracing import parse as parse_traceparent
from sidecar.web_errors import as_response, json_response, sidecar_error
from sidecar.web_lean import LEAN, LeanHandler, LeanRoutes, middleware
from sidecar.web_routing import application
from sidecar.xid import DEFAULT_MAX_LENGTH
from sidecar.xid import parse as parse_xid

MAX_BODY: Final = 64 * 1024
#: the config's defaults for coordinator.timeouts.request and local_coordinator.max_timeout
CALL_TIMEOUT_DEFAULT: Final = CoordinatorTimeouts().request
MAX_TIMEOUT_DEFAULT: Final = LocalCoordinatorConfig().max_timeout
STATUS_HEADER: Final = "x-gts-transaction-status"
_KEY_RE: Final = re.compile(r"[!-~]{1,255}")
_BEGIN_FIELDS: Final = frozenset({"name", "timeout"})
_BEGIN_SHAPE: Final = '{"name": "create-order", "timeout": "30s"}'


async def errors(request: web.BaseRequest, handler: LeanHandler, param: str) -> web.StreamResponse:
    """Every route's guard: errors in the one JSON shape; the calls a handler makes (a begin:
    the transaction's trace) and its log lines are about the caller's trace, reset after
    (the connection's next request is not)."""
    token = enter(parse_traceparent(request.headers.get("traceparent")), None)
    try:
        return await handler(request, param)
    except web.HTTPRequestEntityTooLarge:
        return sidecar_error(PayloadTooLarge(f"body larger than {MAX_BODY} bytes"))
    except Exception as exc:
        return as_response(request, exc)
    finally:
        leave(token)


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


def _ignore(xid: str) -> None:
    pass


class TmApi:
    """The routes' handlers, with what they need bound once. `call_timeout`:
    coordinator.timeouts.request; `max_timeout`: local_coordinator.max_timeout (seconds)."""

    def __init__(
        self,
        coordinator: Coordinator,
        on_finished: Callable[[str], None] = _ignore,
        *,
        xid_max_length: int = DEFAULT_MAX_LENGTH,
        call_timeout: float = CALL_TIMEOUT_DEFAULT,
        max_timeout: float = MAX_TIMEOUT_DEFAULT,
    ) -> None:
        self.coordinator = coordinator
        #: told the XID of every transaction this API saw finish (releases its global locks)
        self.on_finished = on_finished
        #: xid.max_length: XIDs in paths are held to the same limit as on the data plane
        self.xid_max_length = xid_max_length
        #: a begun transaction's timeout must exceed it
        self.call_timeout = call_timeout
        #: the longest transaction this sidecar coordinates
        self.max_timeout = max_timeout

    def _xid(self, value: str) -> str:
        return parse_xid(value, self.xid_max_length).raw

    def _timeout_ms(self, timeout: object) -> int | None:
        """The begin's `timeout` (a duration string) in ms; every message names `timeout`
        and the value sent."""
        if timeout is None:
            return None
        if not isinstance(timeout, str):
            raise InvalidRequest(
                f'timeout must be a duration string such as "30s", got {timeout!r}'
            )
        try:
            seconds = parse_duration(timeout)
        except ValueError as exc:
            raise InvalidRequest(f"timeout: {exc}") from None
        if seconds <= 0:
            raise InvalidRequest(f"timeout must be positive, got {timeout!r}")
        longest = self.max_timeout
        if seconds > longest:
            raise InvalidRequest(
                f"timeout {timeout!r} must be at most {format_duration(longest)} "
                "(local_coordinator.max_timeout)"
            )
        call = self.call_timeout
        if seconds <= call:
            # "committed, response lost": a coordinator call that outlives its transaction
            raise InvalidRequest(
                f"timeout {timeout!r} must be above coordinator.timeouts.request "
                f"({format_duration(call)}): every coordinator call made for the transaction "
                "must be able to give up before the transaction does"
            )
        return int(seconds * 1000)

    async def begin(self, request: web.BaseRequest, _: str) -> web.Response:
        data = json_object(await request.read(), _BEGIN_SHAPE)
        _unknown_fields(data)
        name = data.get("name")
        if not isinstance(name, str) or not name or len(name) > 128:
            raise InvalidRequest("name must be a non-empty string of at most 128 characters")
        if CONTROL_CHARS.search(name):
            raise InvalidRequest("name must not contain control characters")
        timeout = data.get("timeout")
        timeout_ms = self._timeout_ms(timeout)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not _KEY_RE.fullmatch(key):
            raise InvalidRequest("Idempotency-Key must be 1-255 visible ASCII characters")
        try:
            state = await self.coordinator.begin(name, timeout_ms, key)
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

    async def commit(self, request: web.BaseRequest, xid: str) -> web.Response:
        return await self._decide(self.coordinator.commit, xid)

    async def rollback(self, request: web.BaseRequest, xid: str) -> web.Response:
        return await self._decide(self.coordinator.rollback, xid)

    async def _decide(
        self, decision: Callable[[str], Awaitable[TxState]], xid: str
    ) -> web.Response:
        try:
            state = await decision(self._xid(xid))
        except DecisionPending as err:
            return _pending(err)
        self._maybe_finished(state.xid, state.status)
        return json_response({"xid": state.xid, "status": state.status})

    def _maybe_finished(self, xid: str, status: str) -> None:
        # with a remote coordinator no engine event says so: the final answer does (releasing
        # twice is harmless)
        if is_final(status):
            self.on_finished(xid)

    async def status(self, request: web.BaseRequest, xid: str) -> web.Response:
        return json_response(ids_as_text(await self.coordinator.status(self._xid(xid))))


def _pending(err: DecisionPending) -> web.Response:
    response = sidecar_error(err)
    response.headers[STATUS_HEADER] = "Unknown"
    return response


#: the health answer, rendered once
_HEALTHY: Final = b'{"status":"ok"}'


async def healthz(request: web.BaseRequest, _: str) -> web.Response:
    return json_response(_HEALTHY)


def build_api_app(
    coordinator: Coordinator,
    on_finished: Callable[[str], None] = _ignore,
    *,
    xid_max_length: int = DEFAULT_MAX_LENGTH,
    call_timeout: float = CALL_TIMEOUT_DEFAULT,
    max_timeout: float = MAX_TIMEOUT_DEFAULT,
) -> web.Application:
    """`call_timeout`: coordinator.timeouts.request; `max_timeout`:
    local_coordinator.max_timeout (both in seconds; the config's defaults when not given).
    Its own routes are lean (web_lean.py): served by `web_lean.setup`, they skip aiohttp's
    router and middleware chain; routes added later (the locks) take aiohttp's path."""
    api = TmApi(
        coordinator,
        on_finished,
        xid_max_length=xid_max_length,
        call_timeout=call_timeout,
        max_timeout=max_timeout,
    )
    app = application(middlewares=[middleware(errors)], client_max_size=MAX_BODY)
    routes = app[LEAN] = LeanRoutes(errors)
    routes.add(app, "GET", "/healthz", healthz)
    routes.add(app, "POST", "/v1/transactions", api.begin)
    routes.add(app, "POST", "/v1/transactions/{xid}/commit", api.commit)
    routes.add(app, "POST", "/v1/transactions/{xid}/rollback", api.rollback)
    routes.add(app, "GET", "/v1/transactions/{xid}", api.status)
    return app
