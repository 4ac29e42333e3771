"""The user store's schema: its migrations, the transaction helper and its row readers.

Split from `edge.personal.store` (which re-exports `MIGRATIONS`, `SCHEMA_VERSION` and `migrate`).
"""

from __future__ import annotations

import base64
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from broker.errors import Unavailable
from edge.personal.models import Feedback, Profile

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
    # 3: the id of the newest feedback sample a learned state holds (the newer ones are
    # learned again when it is loaded); NULL for a state written before it was kept.
    ("ALTER TABLE learned ADD COLUMN feedback_id INTEGER",),
    # 4: the user's default penalties (`serving.penalties`), like their temperature.
    (
        "ALTER TABLE users ADD COLUMN presence_penalty REAL",
        "ALTER TABLE users ADD COLUMN frequency_penalty REAL",
        "ALTER TABLE users ADD COLUMN repetition_penalty REAL",
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
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
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


def prepare(conn: sqlite3.Connection, path: Path, busy_ms: int) -> None:
    """Check the file, then set it up and migrate it (nothing is written to a bad file).

    Raises:
        Unavailable: a newer schema. sqlite3.DatabaseError: not a database, or damaged.
    """
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    version = conn.execute("PRAGMA user_version").fetchone()[0]  # fails on a non-database
    if version > SCHEMA_VERSION:
        raise Unavailable(
            f"user store {path} has schema version {version}, newer than this "
            f"hybridgen's {SCHEMA_VERSION}: upgrade hybridgen or point HG_EDGE_USERS_DB "
            "elsewhere"
        )
    check = conn.execute("PRAGMA quick_check").fetchone()[0]
    if check != "ok":
        raise sqlite3.DatabaseError(f"integrity check failed: {check}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")  # deleted text is zeroed, not just unlinked
    conn.execute("PRAGMA synchronous = NORMAL")
    migrate(conn)


def read_profile(db: sqlite3.Connection, user_id: str) -> Profile | None:
    """The user's profile row (None: no such user)."""
    row = db.execute(
        f"SELECT {', '.join(PROFILE_COLUMNS)} FROM users WHERE user_id = ?", (user_id,)
    ).fetchone()
    return None if row is None else Profile(**dict(zip(PROFILE_COLUMNS, row, strict=True)))


def read_feedback(db: sqlite3.Connection, user_id: str, limit: int | None) -> list[Feedback]:
    """The user's newest `limit` samples (all when None), oldest first."""
    rows = db.execute(
        "SELECT id, accepted, rejected, created FROM feedback WHERE user_id = ? "
        "ORDER BY id DESC LIMIT ?",
        (user_id, -1 if limit is None else limit),
    ).fetchall()
    return [
        Feedback(id=row[0], accepted=row[1], rejected=row[2], created=row[3])
        for row in reversed(rows)
    ]


def read_learned(db: sqlite3.Connection, user_id: str) -> tuple[bytes, int | None] | None:
    """The user's learned state and the id of the newest feedback sample it holds (None: not
    recorded), read together; None when there is no state."""
    row = db.execute(
        "SELECT state, feedback_id FROM learned WHERE user_id = ?", (user_id,)
    ).fetchone()
    return None if row is None else (bytes(row[0]), row[1])


def write_learned(
    db: sqlite3.Connection, user_id: str, state: bytes, feedback_id: int | None
) -> None:
    """Store (or replace) the user's learned state and the newest feedback id it holds."""
    db.execute(
        "INSERT INTO learned (user_id, state, updated, feedback_id) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(user_id) DO UPDATE SET state = excluded.state, "
        "updated = excluded.updated, feedback_id = excluded.feedback_id",
        (user_id, sqlite3.Binary(bytes(state)), time.time(), feedback_id),
    )


def export_rows(db: sqlite3.Connection, user_id: str) -> dict[str, Any] | None:
    """Everything held about the user, read in one snapshot (`UserStore.export`; None: no
    such user)."""
    with transaction(db, "DEFERRED"):
        profile = read_profile(db, user_id)
        if profile is None:
            return None
        feedback = read_feedback(db, user_id, None)
        learned = db.execute(
            "SELECT state, updated FROM learned WHERE user_id = ?", (user_id,)
        ).fetchone()
    return {
        "object": "user.export",
        "user_id": user_id,
        "exported": time.time(),
        "schema_version": SCHEMA_VERSION,
        "profile": profile.model_dump(),
        "feedback": [sample.model_dump() for sample in feedback],
        "learned": None
        if learned is None
        else {
            "bytes": len(learned[0]),
            "updated": learned[1],
            "state_base64": base64.b64encode(bytes(learned[0])).decode("ascii"),
        },
    }
