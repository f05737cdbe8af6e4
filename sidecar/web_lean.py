"""The control plane's lean serving path: the api and peer listeners' own routes answered by
one handler on aiohttp's low-level server, from tables built once.

Why. aiohttp serves the control plane, but an `Application` does per request what these
routes do not need: the router's resolve and its match info, the middleware chain rebuilt
around the handler, the app's current-app bookkeeping (about 5 µs a request on the VM this
was measured on; a degraded-mode transaction is three such requests). Here a route is a
plain coroutine `handler(request, param)` (param: the one `{name}` path segment, or "")
behind one guard per app, the middleware as a plain function (error shape, trace context,
signature gate).

The `web.Application` stays the declaration and the fallback: each lean route is also
registered on it, behind the same guard as middleware, so the app is complete on its own
(tests serve it with aiohttp's test server, the OpenAPI check reads its router). Set up by
`setup`, the app's `web.Server` gets `dispatch` as its request handler: a request for a lean
route in its plain form (no percent-escape, query, dot segment or `Expect`) is answered
directly; everything else — routes others add to the app (locks, phase-two callbacks), a
method the path does not allow, 404s, odd paths — goes to the Application as before, so
those answers stay aiohttp's.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

#: a route: (request, the path parameter or "") → response
LeanHandler = Callable[[web.BaseRequest, str], Awaitable[web.StreamResponse]]
#: the app's middleware as a function: (request, handler, param) → response
Guard = Callable[[web.BaseRequest, LeanHandler, str], Awaitable[web.StreamResponse]]
AiohttpHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

#: `{name}`: aiohttp's default parameter pattern, one whole segment
_PARAM: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class LeanRoutes:
    """One app's lean routes: exact paths, and templates with one `{name}` segment."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._exact: dict[str, dict[str, LeanHandler]] = {}
        #: (prefix, suffix, handlers by method), in registration order
        self._templates: list[tuple[str, str, dict[str, LeanHandler]]] = []

    def add(self, app: web.Application, method: str, path: str, handler: LeanHandler) -> None:
        """Serve `method path` with `handler`, here and on `app` (behind `app`'s middleware,
        which must be `middleware(self.guard)`)."""
        params = _PARAM.findall(path)
        if len(params) > 1 or (not params and "{" in path):
            raise ValueError(f"a lean route has at most one {{name}} segment: {path!r}")
        if params:
            prefix, _, suffix = path.partition("{" + params[0] + "}")
            if not prefix.endswith("/") or (suffix and not suffix.startswith("/")):
                raise ValueError(f"a lean route's parameter is a whole segment: {path!r}")
            for p, s, handlers in self._templates:
                if (p, s) == (prefix, suffix):
                    handlers[method] = handler
                    break
            else:
                self._templates.append((prefix, suffix, {method: handler}))
        else:
            self._exact.setdefault(path, {})[method] = handler
        on_aiohttp = _for_aiohttp(handler, params[0] if params else None)
        if method == "GET":
            app.router.add_get(path, on_aiohttp)  # and HEAD, as aiohttp does (answered there)
        else:
            app.router.add_route(method, path, on_aiohttp)

    def find(self, method: str, raw_path: str) -> tuple[LeanHandler, str] | None:
        """The handler and parameter of a request in plain form; None: aiohttp's to answer
        (an odd path, no such route, or a method the path does not allow)."""
        if "%" in raw_path or "?" in raw_path or "/." in raw_path:
            return None
        handlers = self._exact.get(raw_path)
        if handlers is not None:
            handler = handlers.get(method)
            return None if handler is None else (handler, "")
        for prefix, suffix, handlers in self._templates:
            if not raw_path.startswith(prefix) or not raw_path.endswith(suffix):
                continue
            end = len(raw_path) - len(suffix)
            if end <= len(prefix):
                continue
            param = raw_path[len(prefix) : end]
            if "/" in param or "{" in param or "}" in param:
                continue
            handler = handlers.get(method)
            return None if handler is None else (handler, param)
        return None

    def dispatcher(self, fallback: AiohttpHandler) -> AiohttpHandler:
        """The server's request handler: lean routes here, the rest to `fallback` (the
        Application's own handler)."""
        find, guard = self.find, self.guard

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            found = find(request.method, request.raw_path)
            if found is None or "Expect" in request.headers:
                return await fallback(request)
            return await guard(request, found[0], found[1])

        return dispatch


def _for_aiohttp(handler: LeanHandler, param: str | None) -> AiohttpHandler:
    """The route as aiohttp calls it (its middleware, the guard, has run)."""
    if param is None:

        async def plain(request: web.BaseRequest) -> web.StreamResponse:
            return await handler(request, "")

        return plain

    async def with_param(request: web.BaseRequest) -> web.StreamResponse:
        assert isinstance(request, web.Request)
        return await handler(request, request.match_info[param])

    return with_param


def middleware(guard: Guard) -> Callable[..., Awaitable[web.StreamResponse]]:
    """`guard` as the app's aiohttp middleware: the same checks on every route aiohttp
    answers (routes added by others included)."""

    @web.middleware
    async def guarded(request: web.Request, handler: AiohttpHandler) -> web.StreamResponse:
        async def call(req: web.BaseRequest, _: str) -> web.StreamResponse:
            return await handler(req)

        return await guard(request, call, "")

    return guarded


#: an app's lean routes, found by `serve`
LEAN: Final = web.AppKey("lean_routes", LeanRoutes)


async def setup(app: web.Application) -> web.AppRunner:
    """An AppRunner for `app`, set up; with its lean routes answered by `dispatch` when it
    has any. (Sites are the caller's.)"""
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    routes = app.get(LEAN)
    server = runner.server
    if routes is not None and server is not None:
        # read by each connection as it opens: set before any site listens
        server.request_handler = routes.dispatcher(server.request_handler)
    return runner
