"""The injector's HTTPS server (`gts-sidecar injector`): `POST /mutate` answers the Kubernetes
API server's AdmissionReviews with injector.review; `GET /healthz` for probes. Thin: the
decisions are injector.py's.

The certificate and key are loaded at start (a pair that cannot be loaded stops the start
with exit 2) and loaded again whenever either file changes (cert-manager renewing its
Secret): each new handshake gets the newest good pair; a bad new pair is logged and the old
one stays in use. SIGTERM stops taking connections, lets the reviews in flight finish and
exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
from typing import Any

from aiohttp import web

from sidecar import __version__
from sidecar.config import ListenerTlsConfig, parse_bind
from sidecar.errors import AdmissionReviewInvalid, ConfigError
from sidecar.injector import review
from sidecar.injector_config import InjectConfig, InjectorConfig, TlsFiles
from sidecar.tls import TlsConfigError, TlsSite, server_context
from sidecar.web_errors import as_response, json_response

log = logging.getLogger("sidecar.injector")

SETTINGS = web.AppKey("settings", InjectConfig)


def _server_context(tls: TlsFiles) -> ssl.SSLContext:
    """The listeners' own recipe (TLS 1.2+, secure defaults, ALPN); TlsConfigError names the
    file that cannot be used (a key that does not belong to its certificate included)."""
    return server_context(ListenerTlsConfig(cert_file=tls.cert_file, key_file=tls.key_file))


class CertificateReloader:
    """The listening SSLContext, whose SNI callback hands each handshake the newest context
    that loaded cleanly (OpenSSL calls it for every ClientHello, with or without a server
    name). Loading into the live context instead could leave it half-updated — a new
    certificate beside the old key — when a new pair is bad."""

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        try:
            self.current = _server_context(tls)
            self.listening = _server_context(tls)
        except TlsConfigError as exc:
            raise ConfigError([f"listen.tls: cannot load the certificate and key: {exc}"]) from None
        self.listening.sni_callback = self._pick
        self.loads = 1
        self._stat = self._stat_key()
        self._task: asyncio.Task[None] | None = None

    def _pick(self, sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        sock.context = self.current

    def _stat_key(self) -> tuple[tuple[int, int, int, int] | None, ...]:
        keys: list[tuple[int, int, int, int] | None] = []
        for path in (self.tls.cert_file, self.tls.key_file):
            try:
                st = os.stat(path)  # follows the symlinks a Secret volume swaps
            except OSError:
                keys.append(None)
            else:
                keys.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(keys)

    def check(self) -> bool:
        """Load the pair again if either file changed; True when a new pair is in use."""
        key = self._stat_key()
        if key == self._stat:
            return False
        self._stat = key
        try:
            ctx = _server_context(self.tls)
        except TlsConfigError as exc:
            log.warning("new certificate refused, the old one stays", extra={"error": str(exc)})
            return False
        self.current = ctx
        self.loads += 1
        log.info("certificate reloaded", extra={"cert_file": self.tls.cert_file})
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="injector-certs")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.tls.reload_interval)
            self.check()


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except Exception as exc:  # noqa: BLE001 - every error becomes the JSON error shape
        return as_response(request, exc)
    return response


async def mutate(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        answer = review(body, request.app[SETTINGS])
    except AdmissionReviewInvalid as exc:
        log.warning("admission review refused", extra={"error": exc.message})
        raise
    response = answer["response"]
    if not response["allowed"]:
        log.info("pod refused", extra={"uid": response["uid"], "reason": response["status"]})
    elif "patch" in response:
        log.info("sidecar injected", extra={"uid": response["uid"]})
    return json_response(answer)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "version": __version__})


def build_app(config: InjectorConfig) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=config.max_request_bytes)
    app[SETTINGS] = config.inject
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    return app


class Injector:
    """Start → serve until SIGTERM/SIGINT → stop, in that order."""

    def __init__(self, config: InjectorConfig) -> None:
        self.config = config
        self.certificates = CertificateReloader(config.listen.tls)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        runner = web.AppRunner(build_app(self.config), handle_signals=False, access_log=None)
        await runner.setup()
        host, port = parse_bind(self.config.listen.bind)
        site = TlsSite(
            runner,
            host,
            port,
            ssl_context=self.certificates.listening,
            reuse_address=True,
            # a client that never finishes its handshake is cut off (asyncio's default: 60 s)
            handshake_timeout=self.config.listen.tls.handshake_timeout,
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError([f"listen.bind: cannot bind: {exc.strerror or exc}"]) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.certificates.start()
        log.info(
            "gts-sidecar injector started",
            extra={
                "version": __version__,
                "ports": {"https": self.port},
                "image": self.config.inject.image,
            },
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        await self._stop.wait()
        log.info("stopping")
        await self.close()
        log.info("stopped")

    async def close(self) -> None:
        await self.certificates.stop()
        if self._runner is not None:
            # stops listening, then lets the reviews in flight finish (aiohttp's
            # shutdown_timeout bounds the wait)
            await self._runner.cleanup()
            self._runner = None


async def serve(config: InjectorConfig) -> None:
    injector = Injector(config)
    await injector.start()
    await injector.serve_forever()
