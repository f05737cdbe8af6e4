"""A replica's lease on the shared PostgreSQL journal: join, renew, take over the work of
replicas whose lease expired, and gate phase two on the lease being held.

Theory of operation. A replica joins with a new fencing token and a lease of `lease`
seconds (the database's clock). A named task renews it every lease/3 and, on the same beat,
reaps: it takes over the unfinished transactions of replicas whose lease has expired and
hands them to the engine, which re-arms their timeouts and restarts their phase two.

Phase two is gated by `may_drive`: the app is called only while the lease is held by this
process's monotonic clock, with a third of the lease to spare (a renewal that was sent at t
makes the lease good until t + lease at least, since the database added the lease to a later
now()). A replica that was paused (SIGSTOP, a long GC, a partition) past its lease therefore
waits for a renewal before it calls anything; if the renewal finds its row reaped, it forgets
every transaction (another replica drives them now) and joins again with a new token. Its
writes were refused by the fence meanwhile anyway (pg_journal.py).

While the database is unreachable the renewals fail; the engine's `journal_ok` goes false
(readiness says so) until one succeeds again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

from sidecar.config import Config
from sidecar.coordinator.engine import Engine
from sidecar.coordinator.pg_journal import Loaded, PgJournal
from sidecar.coordinator.pg_nonces import PgNonceStore
from sidecar.errors import ConfigError, JournalUnavailable, NotOwner
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.replica")

#: the lease left at least before a phase-two call (a fraction of the lease)
_SPARE: Final = 1 / 3


class Replica:
    def __init__(
        self,
        journal: PgJournal,
        *,
        name: str,
        lease: float,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.journal = journal
        self._lease_gauge = metrics.replica_lease if metrics is not None else None
        self._adopted = metrics.replica_takeovers.labels("adopted") if metrics else None
        self._expired = metrics.replica_takeovers.labels("expired") if metrics else None
        self.name = name
        self.lease = lease
        self._clock = clock
        self.engine: Engine | None = None
        #: monotonic time until which the lease is surely held
        self.held_until = 0.0
        self.takeovers = 0
        self._renewed = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: the replay cache of signed requests, shared by the replicas
        self.nonces = PgNonceStore(journal)

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        engine.ownership = self
        self.journal.on_lease_lost = self._wake.set

    async def begin(self, engine: Engine) -> None:
        """Attach to the engine and join, before the engine starts."""
        self.attach(engine)
        try:
            await self.join()
        except JournalUnavailable as exc:
            raise ConfigError([f"local_coordinator.journal: {exc.message}"]) from None

    # --- lifecycle -----------------------------------------------------------------------

    async def join(self) -> int:
        """Join (before the engine starts: its resume asks for this replica's work)."""
        sent = self._clock()
        token = await self.journal.join(self.name, self.lease)
        self._held(sent)
        log.info("replica joined", extra={"token": token, "lease": self.lease})
        return token

    def start(self) -> None:
        """Start renewing and reaping (after the engine started)."""
        self._task = asyncio.ensure_future(self._run())
        self._task.set_name("replica-lease")
        self.nonces.start_sweeping(self.lease)

    async def stop(self) -> None:
        """Stop renewing; expire the lease so another replica takes over at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.nonces.stop()
        try:
            await self.journal.leave()
        except JournalUnavailable as exc:
            log.warning("lease not released: it expires by itself", extra={"error": exc.message})

    def _held(self, sent: float) -> None:
        self.held_until = sent + self.lease
        self._renewed.set()
        self._renewed = asyncio.Event()
        self._gauge(1)

    def _gauge(self, value: int) -> None:
        if self._lease_gauge is not None:
            self._lease_gauge.set(value)

    # --- the Ownership hooks of the engine -------------------------------------------------

    async def adopt(self, xid: str) -> Loaded | None:
        found = await self.journal.adopt(xid)
        if found is not None:
            self.takeovers += 1
            if self._adopted is not None:
                self._adopted.inc()
            log.info("transaction taken over", extra={"xid": xid})
        return found

    async def may_drive(self) -> None:
        while self.held_until - self._clock() < self.lease * _SPARE:
            self._wake.set()  # renew now rather than at the next beat
            await self._renewed.wait()

    # --- the beat ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._beat()
            except Exception:  # a bug: keep beating, or phase two would wait forever
                log.exception("lease beat failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.lease / 3)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _beat(self) -> None:
        assert self.engine is not None
        sent = self._clock()
        try:
            if self.journal.token is None or not await self.journal.renew(self.lease):
                await self._rejoin()
                return
            self._held(sent)
            self.engine.journal_ok = True
            found = await self.journal.reap()
        except NotOwner:
            await self._rejoin()
            return
        except JournalUnavailable as exc:
            self.engine.journal_ok = False
            self._gauge(0)
            log.warning("lease not renewed: journal unavailable", extra={"error": exc.message})
            return
        if found:
            self.takeovers += len(found)
            if self._expired is not None:
                self._expired.inc(len(found))
            self.engine.resume(found)
            log.info(
                "took over transactions of expired replicas",
                extra={"count": len(found), "xids": [g.xid for g, _ in found][:20]},
            )

    async def _rejoin(self) -> None:
        """The lease was taken over: everything this replica drove is another's now."""
        assert self.engine is not None
        log.warning("lease lost: another replica took over; joining again")
        self.engine.forget_all()
        self.held_until = 0.0
        self._gauge(0)
        sent = self._clock()
        try:
            await self.journal.join(self.name, self.lease)
        except JournalUnavailable as exc:
            self.engine.journal_ok = False
            log.warning("rejoin failed: journal unavailable", extra={"error": exc.message})
            return
        self._held(sent)
        self.engine.journal_ok = True


async def open_replica(
    config: Config, name: str, *, standalone: bool, metrics: Metrics | None = None
) -> tuple[PgJournal, Replica]:
    """The PostgreSQL journal of `local_coordinator` and this replica's lease on it (the
    journal still to be opened). Only `gts-sidecar coordinator` runs on PostgreSQL: a
    sidecar's own coordinator keeps its SQLite journal beside it."""
    lc = config.local_coordinator
    if not standalone:
        raise ConfigError(
            [
                "local_coordinator.journal: a PostgreSQL journal is for replicas of "
                "`gts-sidecar coordinator`; the sidecar's own coordinator uses sqlite:///"
            ]
        )
    journal = PgJournal(
        lc.journal,
        password=lc.password_file.reveal() if lc.password_file else None,
        statement_timeout=lc.statement_timeout,
        pool_size=lc.pool_size,
    )
    return journal, Replica(journal, name=name, lease=lc.lease, metrics=metrics)
