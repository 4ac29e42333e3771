"""The edge's user store: profiles, feedback samples and learned state, in one SQLite file.

Everything about a user that personalization needs stays on the device, in
`EdgeSettings.users_db` (default `<HG_HOME>/edge/<node_id or 'default'>/users.sqlite3`):

- `users`: the profile (display name, persona, default sampling preferences, and the consent
  flags `allow_cloud`, default true, and `share_profile`, default false);
- `feedback`: samples of text the user accepted (and optionally rejected), with their time;
  the newest `max_feedback` per user are kept;
- `learned`: one opaque blob per user, the serialized state of the per-user adaptation model
  (written by whoever owns that model through `put_learned`).

`reset` forgets feedback and learned state and keeps the profile; `delete_profile` removes
every row about the user (foreign keys cascade). Deleted content is overwritten
(`secure_delete`) and the write-ahead log is checkpointed and truncated after each, so the
text is gone from the files on disk too.

The file is opened lazily, on the first call: an edge that never sees a user never creates
it. A corrupt or locked file raises `Unavailable` (HTTP 503) naming the file, per call, and is
never overwritten or "repaired"; the next call tries again, so moving a corrupt file aside
brings the store back without a restart. Schema changes are the numbered steps of
`MIGRATIONS`, applied in order and recorded in `PRAGMA user_version`.

Changes are announced to `UserListener`s (`add_listener`): `on_feedback` after a sample is
stored, `on_forget` after `reset` or `delete_profile`. They run in the calling thread, after
the commit, in the order of the changes; they must be quick and thread-safe, and an error in
one is logged (never with the user's text) and does not undo the change.

The store is thread-safe (one connection, one re-entrant lock); async callers run its
methods with `asyncio.to_thread`. Nothing here logs a user's text.
"""

from __future__ import annotations

import base64
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from broker.errors import BadRequest, NotFound, Unavailable
from serving.bodies import validate_body

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: A user id: 1 to 128 characters, letters, digits and `._@:-`, starting with a letter or digit.
USER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")
MAX_DISPLAY_NAME = 200
MAX_PERSONA = 8000
MAX_SAMPLE = 20000
DEFAULT_MAX_FEEDBACK = 1000

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

_PROFILE_COLUMNS = (
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


def check_user_id(user_id: str) -> str:
    """`user_id` if it is valid.

    Raises:
        BadRequest: (param `user_id`) not 1-128 characters of letters, digits and `._@:-`
            starting with a letter or digit.
    """
    if not isinstance(user_id, str) or not USER_ID_PATTERN.fullmatch(user_id):
        raise BadRequest(
            "invalid user id: use 1 to 128 characters of letters, digits and `._@:-`, "
            "starting with a letter or digit",
            param="user_id",
        )
    return user_id


class ProfileUpdate(BaseModel):
    """A profile change (the body of `PUT /v1/users/{id}`).

    Fields left out keep their current value (their default for a new user); `null` clears
    display_name, persona and the sampling preferences (the request's or the node's then
    apply). The consent flags cannot be null.
    """

    model_config = ConfigDict(extra="forbid")

    display_name: str | None = Field(default=None, max_length=MAX_DISPLAY_NAME)
    persona: str | None = Field(
        default=None,
        max_length=MAX_PERSONA,
        description="Style or background text put before the user's requests (system message).",
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    allow_cloud: StrictBool = Field(
        default=True, description="May this user's requests go to the cloud at all."
    )
    share_profile: StrictBool = Field(
        default=False, description="May the persona and learned data go with them."
    )


class Profile(BaseModel):
    """A stored profile."""

    user_id: str
    display_name: str | None = None
    persona: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    allow_cloud: bool = True
    share_profile: bool = False
    created: float
    updated: float


class Feedback(BaseModel):
    """One stored feedback sample."""

    id: int
    accepted: str
    rejected: str | None = None
    created: float


class FeedbackBody(BaseModel):
    """The body of `POST /v1/users/{id}/feedback`."""

    model_config = ConfigDict(extra="forbid")

    accepted: str = Field(
        min_length=1, max_length=MAX_SAMPLE, description="Text the user accepted or wrote."
    )
    rejected: str | None = Field(
        default=None, max_length=MAX_SAMPLE, description="Text the user rejected, if any."
    )


class UserListener(Protocol):
    """Told about changes to users' data (the adaptation model plugs in here)."""

    def on_feedback(self, user_id: str, accepted: str, rejected: str | None) -> None:
        """A feedback sample was stored for `user_id`."""

    def on_forget(self, user_id: str) -> None:
        """`user_id`'s learned data was wiped (reset) or the user was deleted."""


class UserStore:
    """Users' profiles, feedback and learned state in one SQLite file (module docstring).

    Args:
        path: the database file; its folder is created on first use.
        busy_timeout_s: how long a call waits for another writer's lock before `Unavailable`.
        max_feedback: feedback samples kept per user (the oldest go first).
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 5.0,
        max_feedback: int = DEFAULT_MAX_FEEDBACK,
    ) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.max_feedback = max_feedback
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._listeners: list[UserListener] = []
        self._closed = False

    # ------------------------------------------------------------------------ listeners

    def add_listener(self, listener: UserListener) -> None:
        """Tell `listener` about every later feedback sample, reset and deletion."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: UserListener) -> None:
        """Stop telling `listener` (no error when it was not added)."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def _notify(self, event: str, call: Callable[[UserListener], None]) -> None:
        for listener in list(self._listeners):
            try:
                call(listener)
            except Exception as exc:  # a listener's failure does not undo the change
                logger.warning(
                    "user listener %s failed on %s: %s", listener, event, type(exc).__name__
                )

    # ------------------------------------------------------------------------- profiles

    def get_profile(self, user_id: str) -> Profile:
        """The user's profile.

        Raises:
            NotFound: no such user. BadRequest: invalid id. Unavailable: the file is
                corrupt, locked or unreadable.
        """
        check_user_id(user_id)
        return self._run(lambda db: self._profile(db, user_id))

    def put_profile(self, user_id: str, update: ProfileUpdate | None = None) -> Profile:
        """Create the user or change the fields `update` sets (the others are kept).

        Returns:
            The stored profile.
        """
        check_user_id(user_id)
        update = update or ProfileUpdate()
        changes = {name: getattr(update, name) for name in update.model_fields_set}

        def put(db: sqlite3.Connection) -> Profile:
            now = time.time()
            with _transaction(db):
                db.execute(
                    "INSERT INTO users (user_id, created, updated) VALUES (?, ?, ?) "
                    "ON CONFLICT(user_id) DO NOTHING",
                    (user_id, now, now),
                )
                if changes:
                    assignments = ", ".join(f"{name} = ?" for name in changes)
                    db.execute(
                        f"UPDATE users SET {assignments}, updated = ? WHERE user_id = ?",
                        (*changes.values(), now, user_id),
                    )
            return self._profile(db, user_id)

        profile = self._run(put)
        logger.debug("user profile stored (%d fields changed)", len(changes))
        return profile

    def delete_profile(self, user_id: str) -> None:
        """Remove the user and everything about them, from the files on disk too.

        Raises:
            NotFound: no such user.
        """
        check_user_id(user_id)

        def delete(db: sqlite3.Connection) -> None:
            with _transaction(db):
                gone = db.execute("DELETE FROM users WHERE user_id = ?", (user_id,)).rowcount
            if not gone:
                raise _not_found(user_id)
            self._checkpoint(db)

        with self._lock:
            self._run(delete)
            self._notify("forget", lambda listener: listener.on_forget(user_id))
        logger.debug("user deleted")

    # ------------------------------------------------------------------------- feedback

    def add_feedback(self, user_id: str, accepted: str, rejected: str | None = None) -> Feedback:
        """Store one feedback sample and tell the listeners.

        Raises:
            NotFound: no such user (create the profile first). BadRequest: an empty or
                too long text.
        """
        check_user_id(user_id)
        sample = validate_body(FeedbackBody, {"accepted": accepted, "rejected": rejected})

        def add(db: sqlite3.Connection) -> Feedback:
            now = time.time()
            with _transaction(db):
                self._require_user(db, user_id)
                cursor = db.execute(
                    "INSERT INTO feedback (user_id, accepted, rejected, created) "
                    "VALUES (?, ?, ?, ?)",
                    (user_id, sample.accepted, sample.rejected, now),
                )
                db.execute(
                    "DELETE FROM feedback WHERE user_id = ? AND id NOT IN "
                    "(SELECT id FROM feedback WHERE user_id = ? ORDER BY id DESC LIMIT ?)",
                    (user_id, user_id, self.max_feedback),
                )
            assert cursor.lastrowid is not None
            return Feedback(
                id=cursor.lastrowid, accepted=sample.accepted, rejected=sample.rejected, created=now
            )

        with self._lock:
            stored = self._run(add)
            self._notify(
                "feedback",
                lambda listener: listener.on_feedback(user_id, sample.accepted, sample.rejected),
            )
        logger.debug("user feedback stored (%d characters)", len(sample.accepted))
        return stored

    def list_feedback(self, user_id: str, limit: int | None = None) -> list[Feedback]:
        """The user's newest `limit` samples (all when None), oldest first.

        Raises:
            NotFound: no such user.
        """
        check_user_id(user_id)
        if limit is not None and limit < 0:
            raise BadRequest("limit must be 0 or more", param="limit")

        def read(db: sqlite3.Connection) -> list[Feedback]:
            with _transaction(db, "DEFERRED"):
                self._require_user(db, user_id)
                return self._feedback(db, user_id, limit)

        return self._run(read)

    # -------------------------------------------------------------------------- learned

    def get_learned(self, user_id: str) -> bytes | None:
        """The user's serialized adaptation state (None when there is none)."""
        check_user_id(user_id)

        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT state FROM learned WHERE user_id = ?", (user_id,)).fetchone()
            return None if row is None else bytes(row[0])

        return self._run(read)

    def put_learned(self, user_id: str, state: bytes) -> None:
        """Store the user's serialized adaptation state (replacing the previous one).

        Raises:
            NotFound: no such user.
        """
        check_user_id(user_id)

        def put(db: sqlite3.Connection) -> None:
            with _transaction(db):
                self._require_user(db, user_id)
                db.execute(
                    "INSERT INTO learned (user_id, state, updated) VALUES (?, ?, ?) "
                    "ON CONFLICT(user_id) DO UPDATE SET state = excluded.state, "
                    "updated = excluded.updated",
                    (user_id, sqlite3.Binary(bytes(state)), time.time()),
                )

        self._run(put)

    def reset(self, user_id: str) -> None:
        """Forget what was learned about the user (feedback and learned state); keep the profile.

        Raises:
            NotFound: no such user.
        """
        check_user_id(user_id)

        def wipe(db: sqlite3.Connection) -> None:
            with _transaction(db):
                self._require_user(db, user_id)
                db.execute("DELETE FROM feedback WHERE user_id = ?", (user_id,))
                db.execute("DELETE FROM learned WHERE user_id = ?", (user_id,))
            self._checkpoint(db)

        with self._lock:
            self._run(wipe)
            self._notify("forget", lambda listener: listener.on_forget(user_id))
        logger.debug("user reset")

    # --------------------------------------------------------------------------- export

    def export(self, user_id: str) -> dict[str, Any]:
        """Everything held about the user, as JSON-able data.

        Returns:
            `{"object": "user.export", "user_id", "exported", "schema_version", "profile",
            "feedback": [...], "learned": null | {"bytes", "updated", "state_base64"}}`.
        """
        check_user_id(user_id)

        def read(db: sqlite3.Connection) -> dict[str, Any]:
            with _transaction(db, "DEFERRED"):  # one snapshot of all three tables
                profile = self._profile(db, user_id)
                feedback = self._feedback(db, user_id, None)
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

        return self._run(read)

    def stats(self) -> dict[str, Any]:
        """Counts and size: `{"path", "schema_version", "users", "feedback", "learned",
        "bytes"}` (`bytes`: the database file and its write-ahead log)."""

        def read(db: sqlite3.Connection) -> dict[str, Any]:
            counts = {
                table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                for table in ("users", "feedback", "learned")
            }
            size = sum(
                p.stat().st_size
                for p in (self.path, self.path.with_name(self.path.name + "-wal"))
                if p.exists()
            )
            return {
                "path": str(self.path),
                "schema_version": db.execute("PRAGMA user_version").fetchone()[0],
                **counts,
                "bytes": size,
            }

        return self._run(read)

    # -------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Checkpoint and close the file (a later call opens it again)."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    self._checkpoint(conn)
                except sqlite3.Error as exc:
                    logger.warning("user store %s: no checkpoint at close (%s)", self.path, exc)
                finally:
                    conn.close()

    # ------------------------------------------------------------------------- plumbing

    def _run(self, action: Callable[[sqlite3.Connection], T]) -> T:
        """Run `action` on the open connection, SQLite errors turned into `Unavailable`."""
        with self._lock:
            db = self._connection()
            try:
                return action(db)
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise self._unavailable(exc) from None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Unavailable(
                f"user store {self.path}: cannot create its folder ({exc.strerror}); "
                "set HG_EDGE_USERS_DB to a writable path"
            ) from None
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from None
        try:
            self._prepare(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._unavailable(exc) from None
            raise
        self._conn = conn
        logger.info("user store open: %s (schema %d)", self.path, SCHEMA_VERSION)
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Check the file, then set it up and migrate it (nothing is written to a bad file)."""
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]  # fails on a non-database
        if version > SCHEMA_VERSION:
            raise Unavailable(
                f"user store {self.path} has schema version {version}, newer than this "
                f"hybridgen's {SCHEMA_VERSION}: upgrade hybridgen or point HG_EDGE_USERS_DB "
                "elsewhere"
            )
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("PRAGMA synchronous = NORMAL")
        migrate(conn)

    def _unavailable(self, exc: sqlite3.Error) -> Unavailable:
        text = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
            logger.warning("user store %s is locked", self.path)
            return Unavailable(
                f"user store {self.path} is locked by another process or connection; retry shortly",
                retry_after=1.0,
            )
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            self._forget_connection()
            logger.error("user store %s is unusable: %s", self.path, text)
            return Unavailable(
                f"user store {self.path} is corrupt or not a hybridgen user database ({text}); "
                "it was left untouched: move it aside (a new one is then created) or restore "
                "it from a backup"
            )
        self._forget_connection()
        logger.error("user store %s failed: %s", self.path, text)
        return Unavailable(f"user store {self.path} is unavailable ({text})")

    def _forget_connection(self) -> None:
        """Drop the connection so that the next call opens (and checks) the file again."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _checkpoint(self, db: sqlite3.Connection) -> None:
        """Copy the write-ahead log into the file and truncate it (deleted text leaves it)."""
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _profile(self, db: sqlite3.Connection, user_id: str) -> Profile:
        row = db.execute(
            f"SELECT {', '.join(_PROFILE_COLUMNS)} FROM users WHERE user_id = ?", (user_id,)
        ).fetchone()
        if row is None:
            raise _not_found(user_id)
        return Profile(**dict(zip(_PROFILE_COLUMNS, row, strict=True)))

    def _feedback(self, db: sqlite3.Connection, user_id: str, limit: int | None) -> list[Feedback]:
        rows = db.execute(
            "SELECT id, accepted, rejected, created FROM feedback WHERE user_id = ? "
            "ORDER BY id DESC LIMIT ?",
            (user_id, -1 if limit is None else limit),
        ).fetchall()
        return [
            Feedback(id=row[0], accepted=row[1], rejected=row[2], created=row[3])
            for row in reversed(rows)
        ]

    def _require_user(self, db: sqlite3.Connection, user_id: str) -> None:
        if db.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is None:
            raise _not_found(user_id)


def migrate(conn: sqlite3.Connection, steps: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Bring the file to `len(steps)`: apply the steps after its `user_version`, in order.

    Each step runs in its own transaction with its new version number, so an interrupted
    migration leaves the file at the last complete step.

    Returns:
        The schema version now.
    """
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    for number, statements in enumerate(steps[version:], start=version + 1):
        with _transaction(conn):
            # Another connection may have migrated while this one waited for the lock.
            if int(conn.execute("PRAGMA user_version").fetchone()[0]) >= number:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        logger.info("user store migrated to schema %d", number)
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _not_found(user_id: str) -> NotFound:
    return NotFound(f"no user {user_id!r}: create it with PUT /v1/users/{user_id}")


@contextmanager
def _transaction(db: sqlite3.Connection, mode: str = "IMMEDIATE") -> Iterator[None]:
    """One transaction: `IMMEDIATE` takes the write lock at once (waiting `busy_timeout`),
    `DEFERRED` reads one snapshot."""
    db.execute(f"BEGIN {mode}")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
