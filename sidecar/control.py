"""Wiring of the control plane: signing, the local engine and its journal, the coordinator
client, and the aiohttp apps of the api and peer listeners.

Used by the sidecar (server.py) and by the standalone coordinator (standalone.py). Which
coordinator serves the app's transactions: the cluster when `coordinator.endpoints` is set,
else this process's own engine on its durable journal (the embedded default).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from sidecar import web_lean
from sidecar.config import Config, format_duration, parse_bind
from sidecar.coordinator.auth import TokenSource
from sidecar.coordinator.callbacks import HttpBranchCaller
from sidecar.coordinator.client import Coordinator, LocalCoordinator, RemoteCoordinator
from sidecar.coordinator.engine import Engine
from sidecar.coordinator.journal import SqliteJournal, open_journal
from sidecar.coordinator.protocol import render_branch
from sidecar.coordinator.records import BranchRecord, GlobalRecord, Journal
from sidecar.coordinator.retention import Retention
from sidecar.coordinator.router import RoutingCoordinator
from sidecar.coordinator.server import DECISION_WAIT, SignatureGate, build_peer_app
from sidecar.coordinator.signing import KeyRing
from sidecar.coordinator.states import GlobalStatus
from sidecar.errors import ConfigError, JournalUnavailable
from sidecar.idempotency import IdempotencyStore
from sidecar.metrics import Metrics
from sidecar.tls import TlsSite
from sidecar.txn.api import build_api_app
from sidecar.txn.branches import AppCall, BranchRules, Participant
from sidecar.txn.callbacks_api import add_callback_routes
from sidecar.txn.fence_store import FenceStore, open_fence_store
from sidecar.txn.journal_locks import JournalLocks
from sidecar.txn.locks import LockManager, MemoryLocks, RedisLocks, ReleaseOnFinish
from sidecar.txn.locks_api import add_lock_routes
from sidecar.txn.locks_remote import CoordinatorLocks
from sidecar.txn.repeats import Repeats
from sidecar.txn.sqlite_file import file_bytes
from sidecar.xid import format_owner

log = logging.getLogger("sidecar.control")


class MetricsEvents:
    """The engine's events as metrics, and stuck branches POSTed to the alert webhook."""

    def __init__(
        self,
        metrics: Metrics,
        role: str,
        webhook: str | None = None,
        on_finished: Callable[[str], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.role = role
        self.webhook = webhook
        self.on_finished = on_finished
        self._tasks: set[asyncio.Task[None]] = set()
        # the label children, bound once (a labels() lookup per event costs more than inc)
        self._finished = {
            s: metrics.transactions.labels(role, s.value) for s in GlobalStatus if s.finished
        }
        self._durations = {
            s: metrics.transaction_duration.labels(s.value) for s in GlobalStatus if s.finished
        }
        self._calls = {
            ok: metrics.phase_two_calls.labels("ok" if ok else "failed") for ok in (True, False)
        }

    def finished(self, record: GlobalRecord) -> None:
        self._finished[record.status].inc()
        # begin to final, both wall-clock stamps of the journal (a restart in between counts)
        self._durations[record.status].observe(max(0, record.updated_ms - record.begin_ms) / 1000)
        if self.on_finished is not None:
            self.on_finished(record.xid)  # e.g. release the transaction's global locks

    def branch_stuck(self, branch: BranchRecord) -> None:
        self.metrics.branches_stuck.inc()
        if self.webhook is not None:
            task = asyncio.get_running_loop().create_task(
                self._alert(branch), name=f"stuck-alert {branch.branch_id}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _alert(self, branch: BranchRecord) -> None:
        assert self.webhook is not None
        event = {
            "event": "branch_stuck",
            "xid": branch.xid,
            **render_branch(branch),
        }
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    self.webhook, json=event, timeout=aiohttp.ClientTimeout(total=5)
                ) as resp:
                    await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("stuck-branch alert not delivered", extra={"error": str(exc)})

    def phase_two_call(self, ok: bool) -> None:
        self._calls[ok].inc()


async def serve_app(
    app: web.Application,
    bind: str,
    ssl_context: ssl.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
) -> tuple[web.AppRunner, int]:
    """Run one control-plane app on `bind` (with TLS when given a context); returns its
    runner and the port bound. The api and peer apps' own routes take the lean path
    (web_lean.py); no access log."""
    runner = await web_lean.setup(app)
    host, port = parse_bind(bind)
    site = TlsSite(
        runner,
        host,
        port,
        reuse_address=True,
        ssl_context=ssl_context,
        handshake_timeout=ssl_handshake_timeout,
    )
    await site.start()
    return runner, int(runner.addresses[0][1])


def owner_address(config: Config) -> tuple[str, int]:
    """host:port that this process's XIDs name: the advertised address and the peer port."""
    host = config.node.advertise_address
    _, port = parse_bind(config.listeners.peer.bind)
    return host, port


@dataclass
class ControlPlane:
    config: Config
    metrics: Metrics
    role: str
    ring: KeyRing = field(init=False)
    gate: SignatureGate = field(init=False)
    journal: Journal | None = None
    engine: Engine | None = None
    caller: HttpBranchCaller | None = None
    remote: RemoteCoordinator | None = None
    coordinator: Coordinator | None = None
    fence: FenceStore | None = None
    participant: Participant | None = None
    router: RoutingCoordinator | None = None
    #: replicas on a PostgreSQL journal: this one's lease (pg_lease.Replica)
    replica: Any = None
    retention: Retention | None = None
    #: pools of the participant's phase-two calls to an HTTP/2 app (closed at stop)
    _phase_two_clusters: list[Any] = field(default_factory=list)
    _stopped: bool = False

    def __post_init__(self) -> None:
        idem, lk = self.config.idempotency, self.config.locks
        self.idempotency = IdempotencyStore.from_url(
            idem.store,
            ttl=idem.ttl,
            password=idem.password_file.reveal() if idem.password_file else None,
        )
        #: declared-route requests with an Idempotency-Key, recorded in that store
        self.repeats = Repeats(self.idempotency)
        # the locks' safety net: no lock outlives the longest transaction allowed
        safety = self.config.local_coordinator.max_timeout
        password = lk.password_file.reveal() if lk.password_file else None
        locks_path = self.config.local_coordinator.beside_journal(".locks")
        self.locks: LockManager
        if lk.backend == "memory" or (lk.backend == "journal" and locks_path is None):
            self.locks = MemoryLocks(default_ttl=safety)
        elif lk.backend == "journal":
            assert locks_path is not None
            self.locks = JournalLocks(locks_path, default_ttl=safety)
        elif lk.backend == "coordinator":  # the cluster's (its client is set in start)
            self.locks = CoordinatorLocks(default_ttl=safety)
        else:
            self.locks = RedisLocks.from_url(lk.backend, password=password, default_ttl=safety)
        self.releaser = ReleaseOnFinish(self.locks)
        cfg = self.config.coordinator
        self.ring = KeyRing.from_config(cfg.signing)
        if self.ring.ephemeral:
            log.warning(
                "coordinator.signing has no key: using a random one; calls from other "
                "processes will be refused (configure key_id and secret_file)"
            )
        verify_key = cfg.auth.verify_key_file.reveal() if cfg.auth.verify_key_file else None
        self.gate = SignatureGate(
            self.ring,
            # with Redis, replicas that share a signing key share replay protection too
            self.idempotency.nonce_store(),
            cfg.signing.window,
            self.metrics,
            bearer_key=verify_key,
            bearer_algorithms=list(cfg.auth.algorithms),
            bearer_audience=cfg.auth.audience,
        )

    async def start(self, *, serve_local: bool, peer_port: int | None = None) -> None:
        """Open the journal and engine when this process coordinates (`serve_local`), and
        the client of the cluster when endpoints are configured."""
        cfg = self.config
        if isinstance(self.locks, JournalLocks):
            try:
                await self.locks.open()
            except JournalUnavailable as exc:
                raise ConfigError([f"locks.backend: {exc.message}"]) from None
        if serve_local:
            lc = cfg.local_coordinator
            host, port = owner_address(cfg)
            if peer_port:
                port = peer_port
            if lc.replicated:
                # imported only here: a sidecar without PostgreSQL never loads asyncpg
                from sidecar.coordinator.pg_lease import open_replica

                self.journal, self.replica = await open_replica(
                    cfg,
                    format_owner(host, port),
                    standalone=self.role == "standalone",
                    metrics=self.metrics,
                )
                self.gate.nonces = self.replica.nonces  # a replay to another replica too
            else:
                try:
                    self.journal = open_journal(lc.journal)
                except ValueError as exc:
                    raise ConfigError([f"local_coordinator.journal: {exc}"]) from None
            try:
                await self.journal.open()
            except JournalUnavailable as exc:
                raise ConfigError([f"local_coordinator.journal: {exc.message}"]) from None
            self.caller = HttpBranchCaller(
                self.ring,
                timeout=cfg.coordinator.timeouts.request,
                connect_timeout=cfg.coordinator.timeouts.connect,
                metrics=self.metrics,
            )
            self.engine = Engine(
                self.journal,
                self.caller,
                owner_host=host,
                owner_port=port,
                policy=lc.phase_two,
                default_timeout_ms=int(lc.default_timeout * 1000),
                max_timeout_ms=int(lc.max_timeout * 1000),
                retention_ms=int(lc.retention * 1000),
                events=MetricsEvents(
                    self.metrics, self.role, lc.alert_webhook, self.releaser.finished
                ),
            )
            if self.replica is not None:
                await self.replica.begin(self.engine)
            await self.engine.start()
            engine = self.engine
            # counted at scrape time: stuck now, whatever retried or skipped them since
            self.metrics.stuck_branches.set_function(lambda: len(engine.stuck()))
            if self.replica is not None:
                self.replica.start()
        if cfg.coordinator.endpoints:
            if cfg.coordinator.timeouts.request <= DECISION_WAIT:
                # found by the soak: a decision whose phase two waits (a slow try) is answered
                # after up to DECISION_WAIT; a shorter call timeout turns it into Unknown
                log.warning(
                    "coordinator.timeouts.request (%s) does not exceed the %s a coordinator "
                    "may wait for phase two before answering a commit or rollback: such "
                    "decisions will time out here and be re-sent as Unknown",
                    format_duration(cfg.coordinator.timeouts.request),
                    format_duration(DECISION_WAIT),
                )
            tokens = TokenSource.from_config(cfg.coordinator.auth, aiohttp.ClientSession)
            self.remote = RemoteCoordinator(cfg.coordinator, self.ring, self.metrics, tokens=tokens)
            if isinstance(self.locks, CoordinatorLocks):
                self.locks.client = self.remote
            if self.engine is not None:
                # degraded mode: the local engine stands in while the cluster is unreachable
                self.router = RoutingCoordinator(
                    LocalCoordinator(self.engine),
                    self.remote,
                    cfg.coordinator,
                    cfg.degraded,
                    self.ring,
                    self.metrics,
                    outbox_path=cfg.local_coordinator.beside_journal(".outbox"),
                    outbox_max_items=cfg.local_coordinator.outbox_max_items,
                )
                try:
                    await self.router.open()
                except JournalUnavailable as exc:
                    raise ConfigError([f"local_coordinator.journal: {exc.message}"]) from None
                self.coordinator = self.router
            else:
                self.coordinator = self.remote
        elif self.engine is not None:
            self.coordinator = LocalCoordinator(self.engine)
        rules = BranchRules(cfg)
        if not rules.empty:
            self.fence = open_fence_store(cfg.local_coordinator.beside_journal(".fence"))
            try:
                await self.fence.open()
            except JournalUnavailable as exc:
                raise ConfigError([f"local_coordinator.journal: {exc.message}"]) from None
            self.participant = Participant(
                rules,
                self.fence,
                cfg.app.url,
                timeout=cfg.app.timeouts.total,
                connect_timeout=cfg.app.timeouts.connect,
                app_call=self._h2_app_call() if cfg.app.protocol != "http1" else None,
            )
        self._start_retention()

    def deadline_tables(self) -> tuple[Mapping[str, float], ...]:
        """XID → deadline (event-loop clock) of the transactions this process knows: those it
        began, or registered a branch of. The data plane clamps calls made for them."""
        coordinator = self.coordinator
        clients = (getattr(coordinator, "local", None), getattr(coordinator, "remote", None))
        if not any(clients):
            clients = (coordinator, None)
        tables = []
        for client in clients:
            deadlines = getattr(client, "deadlines", None)
            if deadlines is not None:
                tables.append(deadlines.table)
        return tuple(tables)

    def _h2_app_call(self) -> AppCall:
        """Phase two to an HTTP/2 (h2c) app, a gRPC server, over a small pool of its own."""
        from sidecar.proxy.fetch import fetch_h2
        from sidecar.proxy.h2_upstream import H2Cluster

        ssl_context = None
        if self.config.app.protocol == "h2":
            # (built at start: the phase-two pool of an h2 app takes a rotated app.tls at the
            # next restart; the data plane's pools take it at once)
            from sidecar.tls import H2_ALPN_PROTOCOLS, client_context

            ssl_context = client_context(self.config.app.tls, H2_ALPN_PROTOCOLS)
        server_name = self.config.app.tls.server_name if self.config.app.tls else None
        cluster = H2Cluster(
            "app_phase_two",
            self.config.app,
            self.metrics,
            ssl_context=ssl_context,
            server_name=server_name,
        )
        self._phase_two_clusters.append(cluster)

        async def call(
            method: str, target: str, headers: list[tuple[str, str]], body: bytes, timeout: float
        ) -> tuple[int, list[tuple[bytes, bytes]]]:
            response = await fetch_h2(cluster, method, target, headers, body, timeout=timeout)
            return response.status, response.headers

        return call

    def _start_retention(self) -> None:
        """Everything beside the journal is compacted after local_coordinator.retention,
        and its size on disk is a gauge (the alert before the volume fills reads it)."""
        self.retention = Retention(self.config.local_coordinator.retention, metrics=self.metrics)
        files = self.metrics.journal_files
        if self.journal is not None:
            self.retention.add("journal", self.journal)
            if isinstance(self.journal, SqliteJournal):
                files.add("journal", self.journal.size_bytes)
        if isinstance(self.locks, JournalLocks):
            self.retention.add("locks", self.locks)
            files.add("locks", self.locks.size_bytes)
        if self.router is not None:
            self.retention.add("outbox", self.router.outbox)
            files.add("outbox", self.router.outbox.size_bytes)
        if self.fence is not None:
            self.retention.add("fence", self.fence)
            fence_path = getattr(self.fence, "path", None)
            if isinstance(fence_path, str):
                files.add("fence", lambda: file_bytes(fence_path))
        self.retention.start()

    def peer_bound(self, peer_port: int) -> str:
        """The peer listener is bound: XIDs (and callback URLs) name the port actually bound
        (it differs from the config's when that is 0). Returns host:port."""
        host, _ = owner_address(self.config)
        owner = format_owner(host, peer_port)
        if self.engine is not None:
            self.engine.owner = owner
        return owner

    def prepare_rotation(self, config: Config) -> Callable[[], None]:
        """Build what a reloaded config changes live in the control plane, and return the
        swap (which cannot fail): signing keys (the current one signs, current and previous
        verify), the JWT access and verify keys, phase-two header values. Raises ConfigError
        when something cannot be built; nothing has changed then."""
        old, new = self.config.coordinator, config.coordinator
        ring = None
        if new.signing != old.signing:  # unchanged: keep even an ephemeral key as it is
            try:
                ring = KeyRing.from_config(new.signing)
            except ValueError as exc:
                raise ConfigError([f"coordinator.signing: {exc}"]) from None
        verify_key = new.auth.verify_key_file.reveal() if new.auth.verify_key_file else None
        access_key = new.auth.access_key_file.reveal() if new.auth.access_key_file else None
        rules = BranchRules(config) if self.participant is not None else None

        def swap() -> None:
            if ring is not None:
                self.ring.replace(ring)
                log.info("signing keys rotated", extra={"key_id": ring.key_id})
            self.gate.bearer_key = verify_key
            tokens = self.remote.tokens if self.remote is not None else None
            if tokens is not None and access_key is not None:
                tokens.rotate_access_key(access_key)
            if self.participant is not None and rules is not None:
                self.participant.rules = rules
            self.config = config

        return swap

    def readiness_problems(self) -> list[str]:
        if self.engine is not None and not self.engine.journal_ok:
            return ["journal unavailable: new transactions are refused"]
        return []

    def peer_app(self) -> web.Application:
        app = build_peer_app(self.gate, self.engine, xid_max_length=self.config.xid.max_length)
        if self.participant is not None:
            add_callback_routes(app, self.participant)
        return app

    def api_app(self) -> web.Application:
        assert self.coordinator is not None
        app = build_api_app(
            self.coordinator,
            on_finished=self.releaser.finished,
            xid_max_length=self.config.xid.max_length,
            call_timeout=self.config.coordinator.timeouts.request,
            max_timeout=self.config.local_coordinator.max_timeout,
        )
        add_lock_routes(app, self.locks, xid_max_length=self.config.xid.max_length)
        return app

    async def stop(self, timeout: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.retention is not None:
            await self.retention.stop()
        if self.engine is not None:
            await self.engine.stop(timeout)
        if self.replica is not None:
            await self.replica.stop()
        await self.releaser.drain(min(timeout, 5.0))
        await self.locks.close()
        await self.idempotency.close()
        if self.caller is not None:
            await self.caller.close()
        if self.router is not None:
            await self.router.close()
        if self.remote is not None:
            await self.remote.close()
            if self.remote.tokens is not None:
                await self.remote.tokens.close()
        if self.participant is not None:
            await self.participant.close()
        for cluster in self._phase_two_clusters:
            cluster.close()
        if self.fence is not None:
            await self.fence.close()
        if self.journal is not None:
            await self.journal.close()
