"""aiohttp's own refusals (no route, wrong method, body too large) and unexpected failures,
answered in the DESIGN error shape with `x-gts-sidecar-error`, like every other error."""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import web

from sidecar.errors import ERROR_HEADER, SidecarError, error_body

log = logging.getLogger("sidecar.web")

_CODES: Final = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
}


def from_http_exception(exc: web.HTTPException) -> web.Response:
    code = _CODES.get(exc.status, "INVALID_REQUEST" if exc.status < 500 else "INTERNAL")
    message = exc.reason if exc.status != 404 else "no such route"
    headers = {ERROR_HEADER: code}
    if exc.status == 405 and "Allow" in exc.headers:
        headers["Allow"] = exc.headers["Allow"]
    return web.Response(
        body=error_body(code, message),
        status=exc.status,
        content_type="application/json",
        headers=headers,
    )


def internal_error(request: web.Request, exc: Exception) -> web.Response:
    log.error("unexpected error", exc_info=exc, extra={"path": request.path})
    return web.Response(
        body=error_body("INTERNAL", f"internal error: {type(exc).__name__}"),
        status=500,
        content_type="application/json",
        headers={ERROR_HEADER: "INTERNAL"},
    )


def sidecar_error(err: SidecarError) -> web.Response:
    return web.Response(
        body=err.body(),
        status=err.status,
        content_type="application/json",
        headers={ERROR_HEADER: err.code},
    )


def as_response(request: web.Request, exc: Exception) -> web.Response:
    """Any exception out of a control-plane handler, as the DESIGN error response (HTTP
    exceptions below 400 — redirects — are re-raised for aiohttp to send)."""
    if isinstance(exc, SidecarError):
        return sidecar_error(exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        return from_http_exception(exc)
    return internal_error(request, exc)
