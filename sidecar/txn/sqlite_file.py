"""One small SQLite file beside the journal (the fence, the locks): opened durable.

WAL with `synchronous=FULL` (a commit that returned is on disk, WAL included), a busy
timeout for the moment two processes meet, the schema created if missing. Blocking: call it
in a worker thread.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence


def open_sqlite(path: str, schema: Sequence[str]) -> sqlite3.Connection:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        for statement in schema:
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn
