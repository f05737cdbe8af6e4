"""aiohttp's own refusals (no route, wrong method, body too large) and unexpected failures,
answered in the DESIGN error shape with `x-gts-sidecar-error`, like every other error."""

from __future__ import annotations

import logging
from typing import Final

from aiohttp import web

from sidecar.errors import ERROR_HEADER, error_body

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
