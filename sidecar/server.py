"""Wiring: build listeners and clusters from config, run them, reload, and drain.

Lifecycle (explicit and ordered, after uvicorn): start → serve until SIGTERM/SIGINT →
readiness false → proxy listeners stop accepting (idle keep-alive connections close) →
in-flight requests get up to `drain_timeout` → whatever is left is aborted → pools and the
control-plane listeners close → exit 0. SIGHUP reloads the config file.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sidecar import __version__, logs, spans
from sidecar.admin import build_admin_app
from sidecar.config import Config, parse_bind
from sidecar.control import ControlPlane, serve_app
from sidecar.coordinator.engine import Engine
from sidecar.errors import ConfigError
from sidecar.metrics import Metrics
from sidecar.proxy import access_log
from sidecar.proxy import headers as h
from sidecar.proxy.inbound import InboundRouter
from sidecar.proxy.listener import ListenerRuntime, ProxyListener
from sidecar.proxy.outbound import OutboundRouter
from sidecar.proxy.upstream import Cluster
from sidecar.reload import ConfigWatcher, restart_needed, watched_files
from sidecar.tls import LISTENERS, ListenerTls, TlsConfigError, TlsSet, publish_expiry
from sidecar.tls import build as build_tls
from sidecar.tls import fingerprint as tls_fingerprint
from sidecar.txn.branches import CALLBACK_PREFIX, BranchRules
from sidecar.txn.rules import RuleSet

log = logging.getLogger("sidecar.server")


def c_parser_problem() -> str | None:
    """Why the data plane's and control plane's parsers are not the strict C ones, if so."""
    import aiohttp.http_parser as hp

    if hp.HttpRequestParser.__module__ != "aiohttp._http_parser":
        return (
            "aiohttp is running its pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS is set, or "
            "its C extension is missing); that parser mis-frames inputs the C parser refuses "
            "(e.g. a bare CR in a chunk extension smuggles a second request). Install aiohttp "
            "with its C extension, or set listeners.require_c_parser: false to run anyway"
        )
    return None


@dataclass
class _Compiled:
    inbound: ListenerRuntime
    outbound: ListenerRuntime
    clusters: dict[str, Cluster]


class Sidecar:
    """The running sidecar: listeners, clusters, config, readiness."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        config_digest: str = "",
        metrics: Metrics | None = None,
        reload_interval: float = 1.0,
    ) -> None:
        self._config = config
        self._digest = config_digest
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.metrics.build_info.info({"version": __version__})
        self.reload_interval = reload_interval
        self.draining = False
        self._clusters: dict[str, Cluster] = {}
        self._compiled: _Compiled | None = None
        self.inbound: ProxyListener | None = None
        self.outbound: ProxyListener | None = None
        self._runners: list[web.AppRunner] = []
        self._watcher: ConfigWatcher | None = None
        #: this sidecar set up the span exporter (flushed and stopped at close)
        self._spans = False
        self._stop = asyncio.Event()
        self._app_probe: tuple[float, str | None] = (0.0, None)
        self._tasks: set[asyncio.Task[Any]] = set()
        #: bound ports by listener name (useful with port 0 in tests)
        self.ports: dict[str, int] = {}
        self.control = ControlPlane(config, self.metrics, role="local")
        self._callback_base = ""
        #: listeners that terminate TLS, and the contexts of the config in force
        self.tls: dict[str, ListenerTls] = {}
        self._tls = TlsSet()

    # --- state read by the admin listener -------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def engine(self) -> Engine | None:
        return self.control.engine

    @property
    def config_digest(self) -> str:
        return self._digest

    async def readiness(self) -> list[str]:
        problems = []
        if self.draining:
            problems.append("draining")
        app_problem = await self._probe_app()
        if app_problem:
            problems.append(app_problem)
        return problems + self.control.readiness_problems()

    async def _probe_app(self) -> str | None:
        """Can the app be connected to? Cached for a second: kubelet and humans both poll."""
        checked_at, result = self._app_probe
        now = time.monotonic()
        if now - checked_at < 1.0:
            return result
        cfg = self._config.app
        assert self._compiled is not None
        app = self._compiled.inbound.router.clusters()[0]
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(app.host, app.port), cfg.timeouts.connect
            )
            writer.close()
            result = None
        except (TimeoutError, OSError) as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else exc.strerror
            result = f"app at {app.host}:{app.port} is unreachable ({reason})"
        self._app_probe = (time.monotonic(), result)
        return result

    # --- compile config into runtimes ---------------------------------------------------------

    def _cluster(
        self, key: str, name: str, cfg: Any, fresh: dict[str, Cluster], tls: TlsSet
    ) -> Cluster:
        ctx = tls.clients.get(key)
        old = self._clusters.get(key)
        if old is not None and old.cfg == cfg:
            cluster = old
            if ctx is not None:
                cluster.ssl = ctx  # files rotated (or not): new connections use this one
        else:
            server_name = cfg.tls.server_name if cfg.tls is not None else None
            kind = Cluster
            if cfg.protocol != "http1":
                # imported here: the h2 library is loaded only when an upstream speaks it
                from sidecar.proxy.h2_upstream import H2Cluster

                kind = H2Cluster
            cluster = kind(name, cfg, self.metrics, ssl_context=ctx, server_name=server_name)
        fresh[key] = cluster
        return cluster

    def _compile(self, config: Config, tls: TlsSet) -> _Compiled:
        fresh: dict[str, Cluster] = {}
        app = self._cluster("app", "app", config.app, fresh, tls)
        upstreams = {
            name: self._cluster(f"upstream:{name}", name, up, fresh, tls)
            for name, up in config.upstreams.items()
        }
        classifier = h.build_classifier(config.xid.headers, config.xid.app_headers)
        lst = config.listeners
        inbound = ListenerRuntime(
            name="inbound",
            router=InboundRouter(
                app, config.xid.app_headers, RuleSet(config.transactions), BranchRules(config)
            ),
            classifier=classifier,
            xid_max_length=config.xid.max_length,
            limits=lst.inbound.limits,
            timeouts=lst.inbound.timeouts,
            clients=lst.inbound.clients,
            metrics=self.metrics,
            coordinator=self.control.coordinator,
            participant=self.control.participant,
            callback_base=self._callback_base,
            xid_aliases=tuple(config.xid.headers),
            on_finished=self.control.releaser.finished,
            repeats=self.control.repeats,
            deadline_tables=self.control.deadline_tables(),
        )
        outbound = ListenerRuntime(
            name="outbound",
            router=OutboundRouter(
                upstreams,
                {
                    name: up.xid_headers or config.xid.app_headers
                    for name, up in config.upstreams.items()
                },
            ),
            classifier=classifier,
            xid_max_length=config.xid.max_length,
            limits=lst.outbound.limits,
            timeouts=lst.outbound.timeouts,
            clients=lst.outbound.clients,
            deadline_tables=self.control.deadline_tables(),
            metrics=self.metrics,
        )
        return _Compiled(inbound, outbound, fresh)

    def _swap(self, compiled: _Compiled) -> None:
        retired = [c for k, c in self._clusters.items() if compiled.clusters.get(k) is not c]
        self._compiled = compiled
        self._clusters = compiled.clusters
        if self.inbound is not None:
            self.inbound.runtime = compiled.inbound
        if self.outbound is not None:
            self.outbound.runtime = compiled.outbound
        for cluster in retired:
            # idle connections close now; busy ones when their exchange releases them
            cluster.close()

    def apply(self, config: Config, digest: str) -> None:
        """Swap in a new, already validated config (the reload path): everything is built
        first (TLS contexts, key ring, runtimes); any failure leaves the old config whole."""
        problems = restart_needed(self._config, config)
        if problems:
            raise ConfigError(problems)
        tls = self._build_tls(config, reloading=True)
        rotation = self.control.prepare_rotation(config)
        compiled = self._compile(config, tls)
        # --- nothing below can fail: swap
        rotation()
        for name, listener_tls in self.tls.items():
            listener_tls.current = tls.servers[name]
        self._set_coordinator_tls(config, tls)
        if tls.fingerprint != self._tls.fingerprint:
            self.metrics.tls_reloads.labels("applied").inc()
            log.info("TLS certificates and keys reloaded", extra={"files": len(tls.servers)})
        publish_expiry(self.metrics.tls_certificate_expiry, self._tls, tls)
        self._tls = tls
        self._swap(compiled)
        self._config = config
        self._set_version(digest)
        logs.set_level(config.logging.level)
        access_log.configure(config.logging.access_log)

    def _unchanged(self, config: Config) -> bool:
        """A loaded config is the one in force: same values (secrets by value) and the same
        certificate, key and CA file contents (reads them: the watcher calls it in a thread)."""
        return config == self._config and tls_fingerprint(config) == self._tls.fingerprint

    def _build_tls(self, config: Config, *, reloading: bool) -> TlsSet:
        try:
            return build_tls(config)
        except TlsConfigError as exc:
            if reloading:
                self.metrics.tls_reloads.labels("invalid").inc()
            raise ConfigError(exc.message.split("; ")) from None

    def _set_coordinator_tls(self, config: Config, tls: TlsSet) -> None:
        """The control plane's own https:// calls: to the coordinator and phase-two
        callbacks (coordinator.tls), to the app for its phase two (app.tls)."""
        origin = config.coordinator.tls
        server_name = origin.server_name if origin is not None else None
        remote, caller = self.control.remote, self.control.caller
        if remote is not None and tls.coordinator is not None:
            remote.ssl_context = tls.coordinator
            remote.server_name = server_name
        if caller is not None:
            caller.set_tls(tls.coordinator, server_name)
        router = self.control.router
        if router is not None and tls.coordinator is not None:
            router.peer_scheme = "https" if config.listeners.peer.tls is not None else "http"
            router.set_peer_tls(tls.coordinator)
        participant, app_ctx = self.control.participant, tls.clients.get("app")
        if participant is not None and app_ctx is not None:
            participant.ssl_context = app_ctx
            participant.server_name = config.app.tls.server_name if config.app.tls else None

    def _set_version(self, digest: str) -> None:
        if self._digest:
            self.metrics.config_info.remove(self._digest[:12])
        self._digest = digest
        self.metrics.config_info.labels(digest[:12] or "inline").set(1)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        config = self._config
        if config.listeners.require_c_parser and (problem := c_parser_problem()):
            raise ConfigError([f"listeners.require_c_parser: {problem}"])
        # every certificate and key first: a bad one is a config error before anything starts
        tls = self._build_tls(config, reloading=False)
        for name in LISTENERS:
            listener_tls = getattr(config.listeners, name).tls
            if listener_tls is not None:
                self.tls[name] = ListenerTls(
                    name, listener_tls, tls.servers[name], self.metrics.tls_handshake_failures
                )
        publish_expiry(self.metrics.tls_certificate_expiry, None, tls)
        self._tls = tls
        self._spans = spans.configure(config.tracing, "sidecar")
        access_log.configure(config.logging.access_log)
        # the local engine always runs: it is the coordinator when no cluster is configured,
        # and the degraded-mode stand-in when the configured cluster is unreachable
        await self.control.start(serve_local=True)
        self._set_coordinator_tls(config, tls)
        compiled = self._compile(config, tls)
        self._swap(compiled)
        self._set_version(self._digest)
        self.inbound = ProxyListener(compiled.inbound)
        self.outbound = ProxyListener(compiled.outbound)
        try:
            for name, proxy in (("inbound", self.inbound), ("outbound", self.outbound)):
                listener_tls = self.tls.get(name)
                await proxy.start(
                    *parse_bind(getattr(config.listeners, name).bind),
                    ssl=listener_tls.base if listener_tls else None,
                    ssl_handshake_timeout=listener_tls.handshake_timeout if listener_tls else None,
                )
            for name, app in (
                ("api", self.control.api_app()),
                ("peer", self.control.peer_app()),
                ("admin", build_admin_app(self)),
            ):
                listener_tls = self.tls.get(name)
                runner, self.ports[name] = await serve_app(
                    app,
                    getattr(config.listeners, name).bind,
                    listener_tls.base if listener_tls else None,
                    listener_tls.handshake_timeout if listener_tls else None,
                )
                self._runners.append(runner)
            owner = self.control.peer_bound(self.ports["peer"])
            scheme = "https" if "peer" in self.tls else "http"
            self._callback_base = f"{scheme}://{owner}{CALLBACK_PREFIX}"
            compiled.inbound.callback_base = self._callback_base
            self.ports["inbound"] = self.inbound.port
            self.ports["outbound"] = self.outbound.port
        except OSError as exc:
            await self.close()
            raise ConfigError([f"listeners: cannot bind: {exc.strerror or exc}"]) from None
        if self.config_path is not None:
            self._watcher = ConfigWatcher(
                self.config_path,
                self._digest,
                self.apply,
                self.metrics,
                self.reload_interval,
                files=lambda: watched_files(self._config),
                same=self._unchanged,
            )
            self._watcher.start()
        log.info(
            "gts-sidecar started",
            extra={
                "version": __version__,
                "inbound": config.listeners.inbound.bind,
                "outbound": config.listeners.outbound.bind,
                "admin": config.listeners.admin.bind,
                "app": config.app.url,
                "ports": self.ports,
            },
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def reload(self, reason: str) -> str:
        if self._watcher is None:
            return "unchanged"
        return await self._watcher.reload(reason)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: self._spawn(self.reload("SIGHUP"), "reload-sighup")
        )
        await self._stop.wait()
        await self.drain()

    async def drain(self) -> None:
        """Graceful shutdown, bounded by drain_timeout."""
        self.draining = True
        self.metrics.ready.set(0)
        timeout = self._config.drain_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        log.info("draining", extra={"drain_timeout": timeout})
        if self._watcher is not None:
            self._watcher.stop()
        listeners = [lst for lst in (self.inbound, self.outbound) if lst is not None]
        for lst in listeners:
            lst.stop_accepting()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(lst.wait_drained() for lst in listeners)), timeout
            )
        except TimeoutError:
            left = sum(len(lst.connections) for lst in listeners)
            log.warning(
                "drain timeout: aborting connections still busy", extra={"connections": left}
            )
            for lst in listeners:
                lst.abort_all()
        # local transactions in phase two get what is left of the drain period; what cannot
        # finish stays journalled and resumes on the next start
        await self.control.stop(max(0.0, deadline - asyncio.get_running_loop().time()))
        await self.close()
        log.info("stopped")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        listeners = [lst for lst in (self.inbound, self.outbound) if lst is not None]
        for lst in listeners:
            if lst.server is not None:
                lst.server.close()
            # a server's close leaves the connections it accepted open (until Python 3.13's
            # close_clients); after a drain none is left, after a hard stop these end now
            lst.abort_all()
        if any(lst.connections for lst in listeners):
            await asyncio.sleep(0)  # the transports report their loss on the next turn
        for cluster in self._clusters.values():
            cluster.close()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        await self.control.stop(0)
        if self._spans:  # after the engine: its last spans are sent too
            self._spans = False
            await asyncio.to_thread(spans.shutdown)
        access_log.writer = None  # (process-wide, like the span exporter)
