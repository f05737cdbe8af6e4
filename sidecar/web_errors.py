"""The control plane's JSON responses: answers, errors in the one JSON shape with
`x-gts-sidecar-error` — aiohttp's own refusals (no route, wrong method, body too large) and
unexpected failures included, like every other error."""

from __future__ import annotations

import logging
from typing import Any, Final

import orjson
from aiohttp import web

from sidecar.errors import ERROR_HEADER, SidecarError, error_body

log = logging.getLogger("sidecar.web")

_CODES: Final = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
}


def json_response(data: Any, status: int = 200) -> web.Response:
    """`data` as JSON (bytes are taken as already-rendered JSON)."""
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    return web.Response(body=body, status=status, content_type="application/json")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=error_body(code, message),
        status=status,
        content_type="application/json",
        headers={ERROR_HEADER: code, **(headers or {})},
    )


def from_http_exception(exc: web.HTTPException) -> web.Response:
    code = _CODES.get(exc.status, "INVALID_REQUEST" if exc.status < 500 else "INTERNAL")
    message = exc.reason if exc.status != 404 else "no such route"
    allow = exc.headers.get("Allow") if exc.status == 405 else None
    return error_response(exc.status, code, message, {"Allow": allow} if allow else None)


def internal_error(request: web.BaseRequest, exc: Exception) -> web.Response:
    log.error("unexpected error", exc_info=exc, extra={"path": request.path})
    return error_response(500, "INTERNAL", f"internal error: {type(exc).__name__}")


def sidecar_error(err: SidecarError) -> web.Response:
    return web.Response(
        body=err.body(),
        status=err.status,
        content_type="application/json",
        headers={ERROR_HEADER: err.code},
    )


def as_response(request: web.BaseRequest, exc: Exception) -> web.Response:
    """Any exception out of a control-plane handler, as the JSON error response (HTTP
    exceptions below 400 — redirects — are re-raised for aiohttp to send)."""
    if isinstance(exc, SidecarError):
        return sidecar_error(exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return from_http_exception(exc)
    return internal_error(request, exc)
