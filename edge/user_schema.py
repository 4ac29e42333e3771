"""The user store's schema: its migrations, the transaction helper and fixed queries.

Split from `edge.users` (which re-exports `MIGRATIONS`, `SCHEMA_VERSION` and `migrate`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

logger = logging.getLogger(__name__)

#: Bytes of a user's stored text: persona and feedback, accepted and rejected (UTF-8).
USER_BYTES = (
    "SELECT coalesce((SELECT length(CAST(persona AS BLOB)) FROM users WHERE user_id = ?1), 0) "
    "+ coalesce((SELECT sum(length(CAST(accepted AS BLOB)) "
    "+ coalesce(length(CAST(rejected AS BLOB)), 0)) FROM feedback WHERE user_id = ?1), 0)"
)

#: Schema steps: MIGRATIONS[i] takes the file from user_version i to i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: profiles and feedback samples.
    (
        """CREATE TABLE users (
            user_id TEXT PRIMARY KEY,
            display_name TEXT,
            persona TEXT,
            temperature REAL,
            top_p REAL,
            max_tokens INTEGER,
            allow_cloud INTEGER NOT NULL DEFAULT 1,
            share_profile INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )""",
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
            accepted TEXT NOT NULL,
            rejected TEXT,
            created REAL NOT NULL
        )""",
        "CREATE INDEX feedback_by_user ON feedback(user_id, id)",
    ),
    # 2: the adaptation model's serialized per-user state.
    (
        """CREATE TABLE learned (
            user_id TEXT PRIMARY KEY REFERENCES users(user_id) ON DELETE CASCADE,
            state BLOB NOT NULL,
            updated REAL NOT NULL
        )""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

PROFILE_COLUMNS = (
    "user_id",
    "display_name",
    "persona",
    "temperature",
    "top_p",
    "max_tokens",
    "allow_cloud",
    "share_profile",
    "created",
    "updated",
)


def migrate(conn: sqlite3.Connection, steps: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Bring the file to `len(steps)`: apply the steps after its `user_version`, in order.

    Each step runs in its own transaction with its new version number, so an interrupted
    migration leaves the file at the last complete step.

    Returns:
        The schema version now.
    """
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    for number, statements in enumerate(steps[version:], start=version + 1):
        with transaction(conn):
            # Another connection may have migrated while this one waited for the lock.
            if int(conn.execute("PRAGMA user_version").fetchone()[0]) >= number:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        logger.info("user store migrated to schema %d", number)
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


@contextmanager
def transaction(db: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    """One transaction: `IMMEDIATE` takes the write lock at once (waiting `busy_timeout`),
    `DEFERRED` reads one snapshot."""
    db.execute(f"BEGIN {mode}")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
