"""Global locks on the `api` listener (docs/locks.md), for the app on localhost:

    POST   /v1/locks        {"xid": "…", "keys": ["resource:key", …], "timeout": "30s"}
                            → 200 {xid, keys}
                            → 409 {"error": {"code": "LOCK_CONFLICT", "message", "holder", "key"}}
    DELETE /v1/locks/{xid}  → 200 {xid, released}
    GET    /v1/locks/{key}  → 200 {key, holder}   (holder: null when the key is free)

`timeout` (optional) is the lock TTL, a safety net: the sidecar frees the locks when the
global transaction ends. Any other field is refused. Errors are `{"error": {"code",
"message"}}` with `x-gts-sidecar-error`, whatever middleware the host application has.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from sidecar.config import parse_duration
from sidecar.coordinator.protocol import json_object
from sidecar.errors import InvalidRequest, PayloadTooLarge, SidecarError
from sidecar.txn.locks import LockManager, check_key, check_keys
from sidecar.web_errors import json_response, sidecar_error
from sidecar.xid import DEFAULT_MAX_LENGTH
from sidecar.xid import parse as parse_xid

Handler = Callable[[web.Request], Awaitable[web.Response]]


def _answering_errors(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except SidecarError as err:
            return sidecar_error(err)
        except web.HTTPRequestEntityTooLarge as exc:
            return sidecar_error(PayloadTooLarge(exc.text or "request body too large"))

    return wrapped


_ACQUIRE_FIELDS: Final = frozenset({"xid", "keys", "timeout"})
_ACQUIRE_SHAPE: Final = '{"xid": "...", "keys": ["..."], "timeout": "30s"}'


async def _json_object(request: web.Request) -> dict[str, Any]:
    data = json_object(await request.read(), _ACQUIRE_SHAPE)
    # a field this API does not take is refused, never ignored (a "ttl" or "timeoutMs" meant
    # something to its sender)
    unknown = sorted(set(data) - _ACQUIRE_FIELDS)
    if unknown:
        names = ", ".join(repr(k[:64]) for k in unknown[:5])
        raise InvalidRequest(
            f"unknown field(s) {names}: an acquire takes only xid, keys and timeout: "
            + _ACQUIRE_SHAPE
        )
    return data


def _ttl(value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest('timeout must be a duration string such as "30s"')
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise InvalidRequest(f"timeout: {exc}") from None
    if seconds <= 0:
        raise InvalidRequest("timeout must be positive")
    return seconds


def add_lock_routes(
    app: web.Application,
    locks: LockManager,
    *,
    xid_max_length: int = DEFAULT_MAX_LENGTH,
    prefix: str = "/v1",
) -> None:
    """Add the lock routes to `app` under `prefix`: the api listener's application
    (`/v1/locks`), or a replicated coordinator's peer listener (`/api/v1/locks`, signed)."""

    def xid_of(value: object) -> str:
        if not isinstance(value, str):
            raise InvalidRequest("xid must be a string")
        return parse_xid(value, xid_max_length).raw

    async def acquire(request: web.Request) -> web.Response:
        data = await _json_object(request)
        xid = xid_of(data.get("xid"))
        keys = check_keys(data.get("keys"))
        ttl = _ttl(data.get("timeout"))
        cap = getattr(locks, "default_ttl", None)
        if ttl is not None and cap is not None and ttl > cap:
            # no lock outlives the longest transaction allowed (local_coordinator.max_timeout)
            raise InvalidRequest(f"timeout must not exceed {cap:g}s")
        await locks.acquire(xid, keys, ttl=ttl)
        return json_response({"xid": xid, "keys": keys})

    async def release(request: web.Request) -> web.Response:
        xid = xid_of(request.match_info["xid"])
        return json_response({"xid": xid, "released": await locks.release_all(xid)})

    async def holder(request: web.Request) -> web.Response:
        key = check_key(request.match_info["key"])
        return json_response({"key": key, "holder": await locks.holder(key)})

    app.router.add_post(f"{prefix}/locks", _answering_errors(acquire))
    app.router.add_delete(f"{prefix}/locks/{{xid}}", _answering_errors(release))
    # keys may hold '/', so the key is the whole rest of the path
    app.router.add_get(f"{prefix}/locks/{{key:.+}}", _answering_errors(holder))
