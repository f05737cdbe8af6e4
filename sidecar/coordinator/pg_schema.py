"""The PostgreSQL journal's schema as numbered migrations, applied at start (and by
`gts-sidecar coordinator --migrate-only`).

Rules: each migration is a list of statements that is applied once, in one database
transaction, in version order; a version, once released, never changes (add a new one).
Replicas that start together serialise on one advisory lock, so exactly one applies each
migration and the others see it done. A database whose version is newer than this code knows
is refused rather than written with an older idea of the tables.

Tables: gts_globals and gts_branches hold the engine's records (the same columns as the
SQLite journal) plus `owner_token`, the fencing token of the replica that drives the
transaction; gts_replicas holds one row per live replica with its lease's expiry (the
database's clock: every replica judges expiry by the same one); gts_nonces is the replay
cache of signed requests shared by the replicas.
"""

from __future__ import annotations

from typing import Any, Final

from sidecar.coordinator.states import GlobalStatus
from sidecar.errors import JournalUnavailable

#: any constant: the key of the advisory lock that serialises migrations between replicas
MIGRATION_LOCK: Final = 0x67747331  # "gts1"

FINISHED_SQL: Final = ", ".join(f"'{s.value}'" for s in GlobalStatus if s.finished)

#: the columns of version 2 (its migration's text never changes)
_GLOBAL_COLS_V2: Final = (
    "xid, name, status, timeout_ms, begin_ms, updated_ms, idempotency_key, request_hash"
)
GLOBAL_COLS: Final = _GLOBAL_COLS_V2 + ", traceparent"
BRANCH_COLS: Final = (
    "branch_id, xid, seq, branch_type, resource_id, callback_url, application_data, status, "
    "attempts, stuck, updated_ms, last_error, idempotency_key, request_hash"
)


def _sets(cols: str, key: str) -> str:
    return ", ".join(f"{c} = excluded.{c}" for c in cols.split(", ") if c != key)


#: Version 2: one fenced group-commit batch in one statement (one round trip, autocommit).
#: Arguments: the writer's token, every xid the batch touches, then the globals' and the
#: branches' columns as arrays. Returns the xids the writer does not own (their rows are
#: skipped), or NULL when the writer's replica row is gone (nothing written).
def _write_function(global_cols: str, trace: bool, release_locks: bool = False) -> str:
    g_trace = ", g_trace text[]" if trace else ""
    g_trace_arg = ", g_trace" if trace else ""
    # version 4: a transaction's global locks go in the same commit as its final state,
    # whichever replica writes it (the one that took it over too); nothing to call after.
    # Key rows are locked in key order, as gts_lock takes them: the two never deadlock
    release = (
        f"""
    DELETE FROM gts_locks WHERE key IN (
        SELECT l.key FROM gts_locks l WHERE l.xid = ANY(ARRAY(
            SELECT u.xid FROM unnest(g_xid, g_status) AS u(xid, status)
            WHERE u.status IN ({FINISHED_SQL}) AND NOT (u.xid = ANY(moved))))
        ORDER BY l.key FOR UPDATE);"""
        if release_locks
        else ""
    )
    return f"""
CREATE FUNCTION gts_write(
    me bigint, xids text[],
    g_xid text[], g_name text[], g_status text[], g_timeout bigint[], g_begin bigint[],
    g_updated bigint[], g_key text[], g_hash text[]{g_trace},
    b_id bigint[], b_xid text[], b_seq integer[], b_type text[], b_resource text[],
    b_url text[], b_data bytea[], b_status text[], b_attempts integer[], b_stuck boolean[],
    b_updated bigint[], b_error text[], b_key text[], b_hash text[]
) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    moved text[];
BEGIN
    -- the writer's lease row, held until the commit: nobody can reap it meanwhile
    PERFORM 1 FROM gts_replicas WHERE token = me FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- the transactions' rows, locked in xid order (two writers never deadlock)
    SELECT coalesce(array_agg(t.xid), '{{}}') INTO moved FROM (
        SELECT g.xid, g.owner_token FROM gts_globals g WHERE g.xid = ANY(xids)
        ORDER BY g.xid FOR UPDATE
    ) t WHERE t.owner_token <> me;
    INSERT INTO gts_globals ({global_cols}, owner_token)
        SELECT u.*, me FROM unnest(g_xid, g_name, g_status, g_timeout, g_begin, g_updated,
                                   g_key, g_hash{g_trace_arg})
            AS u({global_cols})
        WHERE NOT (u.xid = ANY(moved))
        ON CONFLICT (xid) DO UPDATE SET {_sets(global_cols, "xid")},
            owner_token = excluded.owner_token;
    INSERT INTO gts_branches ({BRANCH_COLS})
        SELECT u.* FROM unnest(b_id, b_xid, b_seq, b_type, b_resource, b_url, b_data,
                               b_status, b_attempts, b_stuck, b_updated, b_error, b_key,
                               b_hash)
            AS u({BRANCH_COLS})
        WHERE NOT (u.xid = ANY(moved))
        ON CONFLICT (branch_id) DO UPDATE SET {_sets(BRANCH_COLS, "branch_id")};{release}
    RETURN moved;
END
$$"""


WRITE_FUNCTION: Final = _write_function(_GLOBAL_COLS_V2, trace=False)
#: version 3: the same with the transactions' traceparent
WRITE_FUNCTION_V3: Final = _write_function(GLOBAL_COLS, trace=True)
#: version 4: the same, releasing the global locks of the transactions it finishes
WRITE_FUNCTION_V4: Final = _write_function(GLOBAL_COLS, trace=True, release_locks=True)
#: Version 4: acquire global locks for a transaction, all or nothing, in one statement.
#: The transaction's row is locked first (FOR NO KEY UPDATE: acquires for one transaction
#: take turns, branch inserts are not held up): a concurrent final write (gts_write locks it
#: FOR UPDATE) waits for the acquire's commit and then releases the new locks too, and an
#: acquire after the final write finds the transaction finished. Keys are inserted in
#: sorted order, so two acquirers of overlapping keys wait in one order (no deadlock); a
#: key held by another transaction whose TTL has passed is taken over. Returns a NULL
#: reason when every key is now held; ('not_found', NULL) or ('not_active', status) when the
#: transaction is unknown or not in Begin; a conflict raises SQLSTATE GT001 with the holder
#: as DETAIL and the key as HINT, and undoes the statement (nothing changed).
LOCK_FUNCTION: Final = """
CREATE FUNCTION gts_lock(x text, ks text[], ttl float8, OUT reason text, OUT detail text)
LANGUAGE plpgsql AS $$
DECLARE
    st text;
    lock_key text;
    expiry timestamptz;
    taken integer;
BEGIN
    SELECT status INTO st FROM gts_globals WHERE xid = x FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        reason := 'not_found';
        RETURN;
    END IF;
    IF st <> 'Begin' THEN
        reason := 'not_active';
        detail := st;
        RETURN;
    END IF;
    -- every key of a transaction shares one expiry: an acquire with a TTL sets it for all,
    -- one without keeps the current one (none: held until the transaction ends)
    IF ttl IS NOT NULL THEN
        expiry := now() + ttl * interval '1 second';
    ELSE
        SELECT l.expires_at INTO expiry FROM gts_locks l WHERE l.xid = x LIMIT 1;
    END IF;
    WITH got AS (
        INSERT INTO gts_locks AS l (key, xid, expires_at)
            SELECT k, x, expiry FROM unnest(ks) AS k ORDER BY k
        ON CONFLICT (key) DO UPDATE SET xid = excluded.xid, expires_at = excluded.expires_at
            WHERE l.xid = excluded.xid OR l.expires_at <= now()
        RETURNING 1
    ) SELECT count(*) INTO taken FROM got;
    IF taken < cardinality(ks) THEN
        SELECT l.xid, l.key INTO detail, lock_key FROM gts_locks l
            WHERE l.key = ANY(ks) AND l.xid <> x ORDER BY l.key LIMIT 1;
        -- all or nothing: the error undoes this statement's inserts
        RAISE EXCEPTION 'gts lock conflict' USING ERRCODE = 'GT001', DETAIL = detail,
            HINT = lock_key;
    END IF;
    IF ttl IS NOT NULL THEN
        UPDATE gts_locks SET expires_at = expiry
            WHERE xid = x AND expires_at IS DISTINCT FROM expiry;
    END IF;
END
$$"""
_V2_SIGNATURE: Final = (
    "bigint, text[], text[], text[], text[], bigint[], bigint[], bigint[], text[], text[], "
    "bigint[], text[], integer[], text[], text[], text[], bytea[], text[], integer[], "
    "boolean[], bigint[], text[], text[], text[]"
)
_V3_SIGNATURE: Final = (
    "bigint, text[], text[], text[], text[], bigint[], bigint[], bigint[], text[], text[], "
    "text[], bigint[], text[], integer[], text[], text[], text[], bytea[], text[], integer[], "
    "boolean[], bigint[], text[], text[], text[]"
)
MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (
        1,
        (
            """CREATE TABLE gts_replicas (
                token bigint PRIMARY KEY,
                name text NOT NULL,
                started_at timestamptz NOT NULL DEFAULT now(),
                expires_at timestamptz NOT NULL
            )""",
            # fencing tokens: every replica incarnation gets a new, larger one
            "CREATE SEQUENCE gts_fence_tokens",
            """CREATE TABLE gts_globals (
                xid text PRIMARY KEY,
                name text NOT NULL,
                status text NOT NULL,
                timeout_ms bigint NOT NULL,
                begin_ms bigint NOT NULL,
                updated_ms bigint NOT NULL,
                idempotency_key text UNIQUE,
                request_hash text,
                owner_token bigint NOT NULL
            )""",
            f"""CREATE INDEX gts_globals_owner ON gts_globals (owner_token)
                WHERE status NOT IN ({FINISHED_SQL})""",
            f"""CREATE INDEX gts_globals_finished ON gts_globals (updated_ms)
                WHERE status IN ({FINISHED_SQL})""",
            """CREATE TABLE gts_branches (
                branch_id bigint PRIMARY KEY,
                xid text NOT NULL REFERENCES gts_globals (xid) ON DELETE CASCADE,
                seq integer NOT NULL,
                branch_type text NOT NULL,
                resource_id text NOT NULL,
                callback_url text NOT NULL,
                application_data bytea NOT NULL,
                status text NOT NULL,
                attempts integer NOT NULL,
                stuck boolean NOT NULL,
                updated_ms bigint NOT NULL,
                last_error text,
                idempotency_key text UNIQUE,
                request_hash text
            )""",
            "CREATE INDEX gts_branches_xid ON gts_branches (xid, seq)",
            """CREATE TABLE gts_nonces (
                key_id text NOT NULL,
                nonce text NOT NULL,
                expires_at timestamptz NOT NULL,
                PRIMARY KEY (key_id, nonce)
            )""",
            "CREATE INDEX gts_nonces_expiry ON gts_nonces (expires_at)",
        ),
    ),
    (2, (WRITE_FUNCTION,)),
    (
        3,
        (
            # the begin call's W3C traceparent: phase two after a failover or restart
            # still belongs to the transaction's trace
            "ALTER TABLE gts_globals ADD COLUMN traceparent text",
            f"DROP FUNCTION gts_write({_V2_SIGNATURE})",
            WRITE_FUNCTION_V3,
        ),
    ),
    (
        4,
        (
            # global locks shared by the replicas: a lock taken through one is seen by all,
            # released in the commit of its transaction's final state (or by DELETE)
            """CREATE TABLE gts_locks (
                key text PRIMARY KEY,
                xid text NOT NULL,
                expires_at timestamptz
            )""",
            "CREATE INDEX gts_locks_xid ON gts_locks (xid)",
            "CREATE INDEX gts_locks_expiry ON gts_locks (expires_at) WHERE expires_at IS NOT NULL",
            LOCK_FUNCTION,
            f"DROP FUNCTION gts_write({_V3_SIGNATURE})",
            WRITE_FUNCTION_V4,
        ),
    ),
)

SCHEMA_VERSION: Final = MIGRATIONS[-1][0]


async def migrate(conn: Any) -> list[int]:
    """Bring the database to SCHEMA_VERSION on an asyncpg connection; returns the versions
    applied (empty when it was current). Raises JournalUnavailable for a newer database."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS gts_schema_version (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )"""
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM gts_schema_version")
        if current > SCHEMA_VERSION:
            raise JournalUnavailable(
                f"the database's journal schema is version {current}, newer than this "
                f"coordinator supports ({SCHEMA_VERSION}): upgrade the coordinator"
            )
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                await conn.execute(statement)
            await conn.execute("INSERT INTO gts_schema_version (version) VALUES ($1)", version)
            applied.append(version)
    return applied
