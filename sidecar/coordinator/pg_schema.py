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
def _write_function(global_cols: str, trace: bool) -> str:
    g_trace = ", g_trace text[]" if trace else ""
    g_trace_arg = ", g_trace" if trace else ""
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
        ON CONFLICT (branch_id) DO UPDATE SET {_sets(BRANCH_COLS, "branch_id")};
    RETURN moved;
END
$$"""


WRITE_FUNCTION: Final = _write_function(_GLOBAL_COLS_V2, trace=False)
#: version 3: the same with the transactions' traceparent
WRITE_FUNCTION_V3: Final = _write_function(GLOBAL_COLS, trace=True)
_V2_SIGNATURE: Final = (
    "bigint, text[], text[], text[], text[], bigint[], bigint[], bigint[], text[], text[], "
    "bigint[], text[], integer[], text[], text[], text[], bytea[], text[], integer[], "
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
