"""`gts-sidecar coordinator`: the coordinator on its own, for development, tests and dev clusters.

It serves GTS REST v1 on `listeners.peer.bind` (signed requests only) and metrics and health
on `listeners.admin.bind`, with the engine on the durable journal of `local_coordinator`.
SIGTERM: stop accepting, give phase two in progress `drain_timeout`, exit 0; whatever is
unfinished is journalled and resumes on the next start.

Replicas: with `local_coordinator.journal: postgresql://…` any number of these processes
share one database (pg_journal.py, pg_lease.py); each answers for every XID, and the work of
one that stops or dies is taken over by the others once its lease has expired.
`--migrate-only` applies the database's schema migrations and exits (a Kubernetes Job or
init container can run it before the replicas roll).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import time

from aiohttp import web

from sidecar import __version__, spans
from sidecar.admin import build_admin_app
from sidecar.config import Config, load
from sidecar.control import ControlPlane, serve_app
from sidecar.coordinator.engine import Engine
from sidecar.errors import ConfigError
from sidecar.metrics import Metrics
from sidecar.server import c_parser_problem
from sidecar.tls import ListenerTls, TlsFileWatcher, publish_expiry
from sidecar.tls import check as check_tls

log = logging.getLogger("sidecar.coordinator")


class StandaloneCoordinator:
    def __init__(self, config: Config, *, metrics: Metrics | None = None) -> None:
        self._config = config
        self.metrics = metrics or Metrics()
        self.metrics.build_info.info({"version": __version__})
        self.control = ControlPlane(config, self.metrics, role="standalone")
        self.draining = False
        self.ports: dict[str, int] = {}
        self._runners: list[web.AppRunner] = []
        self._stop = asyncio.Event()
        self._tls_watcher: TlsFileWatcher | None = None
        #: this process set up the span exporter (flushed and stopped at close)
        self._spans = False

    # what the admin listener reads
    @property
    def config(self) -> Config:
        return self._config

    @property
    def engine(self) -> Engine | None:
        return self.control.engine

    @property
    def config_digest(self) -> str:
        return ""

    async def readiness(self) -> list[str]:
        return (["draining"] if self.draining else []) + self.control.readiness_problems()

    async def start(self) -> None:
        cfg = self._config
        if cfg.listeners.require_c_parser and (problem := c_parser_problem()):
            raise ConfigError([f"listeners.require_c_parser: {problem}"])
        tls = check_tls(cfg)
        listeners = {
            name: ListenerTls(name, t, tls.servers[name], self.metrics.tls_handshake_failures)
            for name in ("peer", "admin")
            if (t := getattr(cfg.listeners, name).tls) is not None
        }
        self._spans = spans.configure(cfg.tracing, "coordinator")
        await self.control.start(serve_local=True)
        expiry = self.metrics.tls_certificate_expiry
        publish_expiry(expiry, None, tls)
        self._tls_watcher = TlsFileWatcher(
            cfg, listeners, self._origin_tls, self.metrics.tls_reloads, tls, expiry=expiry
        )
        self._origin_tls(tls.coordinator)
        self._tls_watcher.start()
        try:
            for name, app in (("peer", self._peer_app()), ("admin", build_admin_app(self))):
                lt = listeners.get(name)
                runner, self.ports[name] = await serve_app(
                    app,
                    getattr(cfg.listeners, name).bind,
                    lt.base if lt else None,
                    lt.handshake_timeout if lt else None,
                )
                self._runners.append(runner)
        except OSError as exc:
            await self.close()
            raise ConfigError([f"listeners: cannot bind: {exc.strerror or exc}"]) from None
        assert self.control.engine is not None
        self.control.peer_bound(self.ports["peer"])
        log.info(
            "gts-sidecar coordinator started",
            extra={
                "version": __version__,
                "owner": self.control.engine.owner,
                "journal": cfg.local_coordinator.journal,
                "resumed": self.control.engine.active,
                "ports": self.ports,
            },
        )

    def _peer_app(self) -> web.Application:
        """GTS REST v1; replicas on PostgreSQL also serve the global locks they share
        (`/api/v1/locks`, signed like every peer call: coordinator/pg_locks.py)."""
        app = self.control.peer_app()
        if self.control.replica is not None:
            from sidecar.coordinator.pg_locks import PgLocks
            from sidecar.coordinator.protocol import API
            from sidecar.txn.locks_api import add_lock_routes

            add_lock_routes(
                app,
                PgLocks(self.control.replica.journal),
                xid_max_length=self._config.xid.max_length,
                prefix=API,
            )
        return app

    def _origin_tls(self, context: ssl.SSLContext | None) -> None:
        """Phase-two callbacks to https:// participants: coordinator.tls (rotated files too)."""
        if self.control.caller is not None:
            origin = self._config.coordinator.tls
            self.control.caller.set_tls(context, origin.server_name if origin else None)

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        await self._stop.wait()
        self.draining = True
        log.info("draining", extra={"drain_timeout": self._config.drain_timeout})
        started = time.monotonic()
        # stop taking requests first, so nothing new starts while phase two finishes
        for runner in self._runners[:1]:
            for site in list(runner.sites):
                await site.stop()
        left = self._config.drain_timeout - (time.monotonic() - started)
        await self.control.stop(max(0.0, left))
        await self.close()
        log.info("stopped")

    async def close(self) -> None:
        if self._tls_watcher is not None:
            self._tls_watcher.stop()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        await self.control.stop(0)
        if self._spans:  # after the engine: its last spans are sent too
            self._spans = False
            await asyncio.to_thread(spans.shutdown)


def migrate_only(path: str) -> int:
    """`gts-sidecar coordinator --migrate-only`: 0 when the PostgreSQL journal's schema is
    current (migrations applied now or before), 2 with the reason otherwise."""
    try:
        config = load(path)
        lc = config.local_coordinator
        if not lc.replicated:
            raise ConfigError(
                [
                    "local_coordinator.journal: --migrate-only is for a postgresql:// journal "
                    "(a SQLite journal migrates itself when it opens)"
                ]
            )
        from sidecar.coordinator.pg_journal import PgJournal
        from sidecar.errors import JournalUnavailable

        journal = PgJournal(
            lc.journal,
            password=lc.password_file.reveal() if lc.password_file else None,
            statement_timeout=lc.statement_timeout,
            pool_size=2,
        )

        async def migrate() -> list[int]:
            try:
                await journal.open()
            except JournalUnavailable as exc:
                raise ConfigError([f"local_coordinator.journal: {exc.message}"]) from None
            await journal.close()
            return journal.migrated

        applied = asyncio.run(migrate())
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 2
    print(f"journal schema current; migrations applied now: {applied or 'none'}")
    return 0
