"""The journal on PostgreSQL (asyncpg), shared by the replicas of `gts-sidecar coordinator`;
the same `records.Journal` as the SQLite journal, plus what replicas need: leases, takeover
and fenced writes.

Theory of operation. Each replica incarnation joins with a row in gts_replicas and a
fencing token (a sequence value, never reused). Every unfinished transaction row names the
token of the replica that drives it (`owner_token`). A write is applied only when, inside its
database transaction, the writer's replica row still exists (locked FOR KEY SHARE, so nobody
can reap it until the commit) and every transaction it touches is still its own (locked FOR
UPDATE, in xid order so that two writers never deadlock). A write that fails the check fails
alone with `NotOwner` and stores nothing: a replica that was paused past its lease and taken
over cannot write work it no longer holds, whatever its own clock believes.

Leases use the database's clock: `renew` moves `expires_at` to now() + lease; `reap` takes
the rows whose lease has passed (FOR UPDATE SKIP LOCKED, so concurrent reapers split them
and never wait on a live writer) and moves their unfinished transactions to the reaper.
`adopt` moves one transaction still in Begin to the caller: every replica answers for every
XID, and the one that is asked to change it takes it over (the fence makes the previous
driver's next write fail, and it forgets the transaction).

Group commit. Concurrent `write()` calls queue up; up to `_FLUSHERS` batches run at once,
each taking everything queued so far: several transactions' writes in one statement (the
`gts_write` function of pg_schema.py: the fence check and the upserts, one round trip), one
commit, one WAL flush. A batch that hits a constraint is re-run one write at a time, so one
bad write fails alone. The engine never has two writes of one transaction in flight
(its per-transaction lock), so batches never reorder a transaction's writes.

Errors. asyncpg and OS errors are translated here into JournalUnavailable (a reused
idempotency key into DuplicateKey), with the statement timeout and the pool's connect
timeout bounding every call; asyncpg is imported only when this journal is opened.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sidecar.coordinator.journal_rows import branch_record, branch_row, global_record, global_row
from sidecar.coordinator.pg_schema import BRANCH_COLS, FINISHED_SQL, GLOBAL_COLS, migrate
from sidecar.coordinator.records import BranchRecord, GlobalRecord
from sidecar.errors import DuplicateKey, JournalUnavailable, NotOwner

#: database transactions of writes in flight at once (one commits while the next fills)
_FLUSHERS: Final = 2
#: writes taken into one database transaction at most
_MAX_BATCH: Final = 512
#: finished transactions deleted per compaction transaction (short row locks)
_COMPACT_BATCH: Final = 500
#: the advisory lock held by the one replica compacting at a time
_COMPACT_LOCK: Final = 0x67747332

_G: Final = GLOBAL_COLS
_B: Final = BRANCH_COLS
_WRITE: Final = "SELECT gts_write(" + ", ".join(f"${n}" for n in range(1, 26)) + ")"


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as one list per column (gts_write takes arrays)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(col) for col in zip(*rows, strict=True)]


_ALIVE: Final = "SELECT 1 FROM gts_replicas WHERE token = $1 FOR KEY SHARE"
_NOT_FINISHED: Final = f"status NOT IN ({FINISHED_SQL})"


async def _keep_session(conn: Any) -> None:
    """The pool's reset of a released connection: nothing to send. asyncpg's default sends
    `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on every release, a
    second round trip per statement; this journal leaves no session state behind (advisory
    locks are transaction-scoped, no LISTEN, no cursors, no SET), and asyncpg still rolls
    back a transaction left open before calling this."""


def _translate(what: str, exc: BaseException) -> BaseException:
    """The edge table: asyncpg, socket and timeout errors become JournalUnavailable."""
    import asyncpg

    if isinstance(exc, JournalUnavailable):
        return exc
    if isinstance(exc, asyncpg.UniqueViolationError) and "idempotency_key" in str(exc):
        dup = DuplicateKey(f"{what}: {exc}")
        dup.__cause__ = exc
        return dup
    if isinstance(
        exc,
        asyncpg.PostgresError
        | asyncpg.InterfaceError
        | OSError
        | TimeoutError
        | ValueError
        | asyncpg.exceptions.InternalClientError,
    ):
        detail = str(exc) or type(exc).__name__
        err = JournalUnavailable(f"{what}: {detail}")
        err.__cause__ = exc
        return err
    return exc


def _branch_params(b: BranchRecord) -> tuple[Any, ...]:
    row = branch_row(b)
    return (*row[:9], bool(row[9]), *row[10:])


@dataclass(slots=True)
class _Write:
    globals_: list[tuple[Any, ...]]
    branches: list[tuple[Any, ...]]
    #: every transaction the write touches (the fence checks each)
    xids: frozenset[str]
    future: asyncio.Future[None]


Loaded = tuple[GlobalRecord, list[BranchRecord]]


class PgJournal:
    """The journal in a PostgreSQL database shared by replicas; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        statement_timeout: float = 5.0,
        pool_size: int = 10,
    ) -> None:
        self.url = url
        self._password = password
        self.statement_timeout = statement_timeout
        self.pool_size = pool_size
        #: this replica's fencing token, once joined
        self.token: int | None = None
        self.commits = 0
        self.writes = 0
        #: called (on the loop) when a write finds this replica's lease gone
        self.on_lease_lost: Callable[[], None] | None = None
        self._pool: Any = None
        self._fast_pool: Any = None
        self._queue: list[_Write] = []
        self._flushers: set[asyncio.Task[None]] = set()
        self._closed = False
        #: schema versions the last open() applied (empty: the database was current)
        self.migrated: list[int] = []

    def __repr__(self) -> str:  # never the password
        return f"<PgJournal {self.url!r} token={self.token}>"

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect the pool and apply the schema's migrations."""
        if self._pool is not None:
            return
        try:
            import asyncpg
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise JournalUnavailable(f"PostgreSQL journal needs asyncpg: {exc}") from None
        timeout_ms = str(int(self.statement_timeout * 1000))

        async def connect(size: int, **settings: str) -> Any:
            return await asyncpg.create_pool(
                self.url,
                password=self._password,  # None: libpq's PGPASSWORD / .pgpass
                min_size=1,
                max_size=size,
                reset=_keep_session,
                timeout=self.statement_timeout,  # connect
                command_timeout=self.statement_timeout + 1.0,
                server_settings={
                    "statement_timeout": timeout_ms,
                    "lock_timeout": timeout_ms,
                    # a replica paused mid-transaction (SIGSTOP, a long GC pause) would hold
                    # its row's fence lock, and the reapers skip locked rows: its work would
                    # not be taken over until it woke. PostgreSQL ends such a session.
                    "idle_in_transaction_session_timeout": timeout_ms,
                    "application_name": "gts-sidecar coordinator",
                    # plan every execution with the table's current size: a plan cached
                    # while the table was small (a new database) keeps a sequential scan
                    # for the fence's row locks, whose cost then grows with every row
                    # (measured: 50 -> 103 us of PostgreSQL CPU per write over 16k rows)
                    "plan_cache_mode": "force_custom_plan",
                    **settings,
                },
            )

        try:
            pool = await connect(self.pool_size)
        except BaseException as exc:
            raise _translate(f"cannot connect to the journal at {self.url!r}", exc) from None
        try:
            async with pool.acquire() as conn:
                self.migrated = await migrate(conn)
            # the replay cache's rows need no WAL flush of their own (pg_nonces.py)
            self._fast_pool = await connect(2, synchronous_commit="off")
        except BaseException as exc:
            pool.terminate()
            raise _translate(f"cannot open the journal at {self.url!r}", exc) from None
        self._pool = pool
        self._closed = False

    async def close(self) -> None:
        if self._pool is None:
            return
        self._closed = True
        if self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)
        pools = (self._pool, self._fast_pool)
        self._pool = self._fast_pool = None
        for pool in pools:
            try:
                await asyncio.wait_for(pool.close(), self.statement_timeout)
            except (TimeoutError, OSError, Exception):  # a dead server: drop the connections
                pool.terminate()

    def _check_open(self, what: str) -> Any:
        if self._pool is None or self._closed:
            raise JournalUnavailable(f"journal {what} failed: the journal is not open")
        return self._pool

    async def transaction(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """Run `fn(conn)` in one database transaction; errors translated."""
        pool = self._check_open("read" if "read" in what else "write")
        try:
            async with pool.acquire(timeout=self.statement_timeout) as conn:
                async with conn.transaction():
                    return await fn(conn)
        except BaseException as exc:
            raise _translate(what, exc) from None

    def _me(self) -> int:
        if self.token is None:
            raise NotOwner("this replica has not joined (no lease)", lease_lost=True)
        return self.token

    # --- replicas and leases ---------------------------------------------------------------

    async def join(self, name: str, lease_s: float) -> int:
        """Register a new replica incarnation; returns its fencing token."""

        async def insert(conn: Any) -> int:
            return int(
                await conn.fetchval(
                    "INSERT INTO gts_replicas (token, name, expires_at) VALUES "
                    "(nextval('gts_fence_tokens'), $1, now() + $2 * interval '1 second') "
                    "RETURNING token",
                    name,
                    lease_s,
                )
            )

        self.token = await self.transaction("replica join failed", insert)
        return self.token

    async def renew(self, lease_s: float) -> bool:
        """Extend this replica's lease; False when its row is gone (it was taken over)."""
        me = self._me()

        async def update(conn: Any) -> bool:
            status = await conn.execute(
                "UPDATE gts_replicas SET expires_at = now() + $2 * interval '1 second' "
                "WHERE token = $1",
                me,
                lease_s,
            )
            return bool(status != "UPDATE 0")

        return bool(await self.transaction("lease renewal failed", update))

    async def leave(self) -> None:
        """A graceful stop: expire this replica's lease now, so another takes over at once."""
        if self.token is None or self._pool is None:
            return
        me = self.token

        async def expire(conn: Any) -> None:
            await conn.execute(
                "UPDATE gts_replicas SET expires_at = now() - interval '1 second' WHERE token = $1",
                me,
            )

        await self.transaction("replica leave failed", expire)

    async def reap(self) -> list[Loaded]:
        """Take over the unfinished transactions of replicas whose lease has expired (and of
        none: a safety net for rows whose replica row is gone); returns them loaded."""
        me = self._me()

        async def take(conn: Any) -> list[Loaded]:
            if await conn.fetchval(_ALIVE, me) is None:
                raise NotOwner("this replica's lease is gone", lease_lost=True)
            dead = [
                r[0]
                for r in await conn.fetch(
                    "SELECT token FROM gts_replicas WHERE expires_at < now() AND token <> $1 "
                    "FOR UPDATE SKIP LOCKED",
                    me,
                )
            ]
            rows = await conn.fetch(
                f"UPDATE gts_globals g SET owner_token = $1 WHERE {_NOT_FINISHED} AND "
                "owner_token <> $1 AND (owner_token = ANY($2::bigint[]) OR NOT EXISTS "
                "(SELECT 1 FROM gts_replicas r WHERE r.token = g.owner_token)) "
                f"RETURNING {_G}",
                me,
                dead,
            )
            if dead:
                await conn.execute("DELETE FROM gts_replicas WHERE token = ANY($1::bigint[])", dead)
            return await self._with_branches(conn, rows)

        return list(await self.transaction("takeover failed", take))

    async def adopt(self, xid: str) -> Loaded | None:
        """Take over one transaction still in Begin; None when it is not in Begin (or
        unknown). Its current driver's next write then fails the fence."""
        me = self._me()

        async def take(conn: Any) -> Loaded | None:
            if await conn.fetchval(_ALIVE, me) is None:
                raise NotOwner("this replica's lease is gone", lease_lost=True)
            rows = await conn.fetch(
                f"UPDATE gts_globals SET owner_token = $2 WHERE xid = $1 AND status = 'Begin' "
                f"RETURNING {_G}",
                xid,
                me,
            )
            loaded = await self._with_branches(conn, rows)
            return loaded[0] if loaded else None

        found: Loaded | None = await self.transaction("takeover failed", take)
        return found

    @staticmethod
    async def _with_branches(conn: Any, rows: Sequence[Any]) -> list[Loaded]:
        if not rows:
            return []
        xids = [r[0] for r in rows]
        branches: dict[str, list[BranchRecord]] = {x: [] for x in xids}
        for b in await conn.fetch(
            f"SELECT {_B} FROM gts_branches WHERE xid = ANY($1::text[]) "
            "ORDER BY xid, seq, branch_id",
            xids,
        ):
            branches[b[1]].append(branch_record(b))
        loaded = [(global_record(r), branches[r[0]]) for r in rows]
        loaded.sort(key=lambda item: (item[0].begin_ms, item[0].xid))
        return loaded

    # --- the Journal API -------------------------------------------------------------------

    async def write(
        self,
        globals_: Sequence[GlobalRecord] = (),
        branches: Sequence[BranchRecord] = (),
    ) -> None:
        """Upsert the records, fenced; returns once they are committed (WAL flushed)."""
        self._check_open("write")
        if not globals_ and not branches:
            return
        self._me()  # raises when this replica has no lease
        write = _Write(
            [global_row(g) for g in globals_],
            [_branch_params(b) for b in branches],
            frozenset([g.xid for g in globals_] + [b.xid for b in branches]),
            asyncio.get_running_loop().create_future(),
        )
        self._queue.append(write)
        if len(self._flushers) < _FLUSHERS:
            task = asyncio.ensure_future(self._flush())
            task.set_name("journal-flush")
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        await write.future

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
            outcomes = await self._commit(batch)
            lost = False
            for w, exc in zip(batch, outcomes, strict=True):
                if w.future.done():
                    continue
                if exc is None:
                    w.future.set_result(None)
                else:
                    lost = lost or (isinstance(exc, NotOwner) and exc.lease_lost)
                    w.future.set_exception(exc)
            if lost and self.on_lease_lost is not None:
                self.on_lease_lost()

    async def _commit(self, batch: list[_Write]) -> list[BaseException | None]:
        """One batch in one statement (gts_write: fence and upserts, one round trip, one
        commit); outcomes in batch order."""
        import asyncpg

        me = self._me()
        pool = self._pool
        if pool is None:
            return [JournalUnavailable("journal write failed: the journal is closed")] * len(batch)
        globals_ = [row for w in batch for row in w.globals_]
        branches = [row for w in batch for row in w.branches]
        xids = sorted(set().union(*(w.xids for w in batch)))
        try:
            async with pool.acquire(timeout=self.statement_timeout) as conn:
                moved = await conn.fetchval(
                    _WRITE, me, xids, *_columns(globals_, 9), *_columns(branches, 14)
                )
        except (
            asyncpg.IntegrityConstraintViolationError,
            asyncpg.CardinalityViolationError,
        ) as exc:
            if len(batch) == 1:
                return [_translate("journal write failed", exc)]
            # one bad write must not fail its batch: each in its own transaction
            return [outcome for w in batch for outcome in await self._commit([w])]
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return [_translate("journal write failed", exc)] * len(batch)
        if moved is None:
            lost = NotOwner("journal write refused: this replica's lease is gone", lease_lost=True)
            return [lost] * len(batch)
        refused = set(moved)
        outcomes: list[BaseException | None] = []
        for w in batch:
            mine = tuple(x for x in w.xids if x in refused)
            outcomes.append(
                NotOwner(
                    f"journal write refused: transaction {mine[0]!r} is driven by another "
                    "replica now",
                    xids=mine,
                )
                if mine
                else None
            )
        done = sum(1 for o in outcomes if o is None)
        if done:
            self.commits += 1
            self.writes += done
        return outcomes

    async def unfinished(self) -> list[Loaded]:
        """The unfinished transactions this replica drives (oldest begin first); a replica
        that has not joined drives none."""
        if self.token is None:
            return []
        me = self.token

        async def query(conn: Any) -> list[Loaded]:
            rows = await conn.fetch(
                f"SELECT {_G} FROM gts_globals WHERE owner_token = $1 AND {_NOT_FINISHED}", me
            )
            return await self._with_branches(conn, rows)

        return list(await self.transaction("journal read failed", query))

    async def find(self, xid: str) -> Loaded | None:
        async def query(conn: Any) -> Loaded | None:
            rows = await conn.fetch(f"SELECT {_G} FROM gts_globals WHERE xid = $1", xid)
            loaded = await self._with_branches(conn, rows)
            return loaded[0] if loaded else None

        found: Loaded | None = await self.transaction("journal read failed", query)
        return found

    async def find_global_by_key(self, idempotency_key: str) -> GlobalRecord | None:
        row = await self._fetchrow(
            f"SELECT {_G} FROM gts_globals WHERE idempotency_key = $1", idempotency_key
        )
        return None if row is None else global_record(row)

    async def find_branch_by_key(self, idempotency_key: str) -> BranchRecord | None:
        row = await self._fetchrow(
            f"SELECT {_B} FROM gts_branches WHERE idempotency_key = $1", idempotency_key
        )
        return None if row is None else branch_record(row)

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        """One statement, no explicit transaction (one round trip)."""
        return await self.run("journal read failed", lambda conn: conn.fetchrow(sql, *args))

    async def run(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """`fn(conn)` on a pooled connection without an explicit transaction (each statement
        commits by itself: one round trip for one statement); errors translated."""
        pool = self._check_open("read" if "read" in what else "write")
        try:
            async with pool.acquire(timeout=self.statement_timeout) as conn:
                return await fn(conn)
        except BaseException as exc:
            raise _translate(what, exc) from None

    async def compact(self, finished_before_ms: int) -> int:
        """Delete finished transactions last updated before the time (their branches by
        cascade), expired nonces and expired global locks, in small batches, until none is
        left (each kind on its own: a busy cluster makes several nonces per transaction);
        one replica at a time (the others find the advisory lock taken and return 0).
        Returns the transactions removed."""
        removed = 0
        while True:

            async def delete(conn: Any) -> tuple[int, bool] | None:
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _COMPACT_LOCK):
                    return None
                status = await conn.execute(
                    "DELETE FROM gts_globals WHERE xid IN (SELECT xid FROM gts_globals "
                    f"WHERE status IN ({FINISHED_SQL}) AND updated_ms < $1 LIMIT $2)",
                    finished_before_ms,
                    _COMPACT_BATCH,
                )
                nonces = await conn.execute(
                    "DELETE FROM gts_nonces WHERE ctid IN (SELECT ctid FROM gts_nonces "
                    "WHERE expires_at < now() LIMIT $1)",
                    _COMPACT_BATCH * 4,
                )
                # global locks whose timeout passed (those of finished transactions went
                # with their final state)
                locks = await conn.execute(
                    "DELETE FROM gts_locks WHERE key IN (SELECT key FROM gts_locks "
                    "WHERE expires_at < now() ORDER BY key LIMIT $1 FOR UPDATE SKIP LOCKED)",
                    _COMPACT_BATCH,
                )
                n = int(status.split()[-1])
                more = (
                    n >= _COMPACT_BATCH
                    or int(nonces.split()[-1]) >= _COMPACT_BATCH * 4
                    or int(locks.split()[-1]) >= _COMPACT_BATCH
                )
                return n, more

            done: tuple[int, bool] | None = await self.transaction(
                "journal compaction failed", delete
            )
            if done is None:
                return removed
            removed += done[0]
            if not done[1]:
                return removed

    async def fetch_unflushed(self, what: str, sql: str, *args: Any) -> list[Any]:
        """One statement on a connection with `synchronous_commit = off`: its commit does
        not wait for the WAL flush (for rows whose loss in a crash is harmless)."""
        self._check_open("write")
        try:
            async with self._fast_pool.acquire(timeout=self.statement_timeout) as conn:
                return list(await conn.fetch(sql, *args))
        except BaseException as exc:
            raise _translate(what, exc) from None
