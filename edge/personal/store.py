"""The edge's user store: profiles, feedback samples and learned state, in one SQLite file.

Everything about a user that personalization needs stays on the device, in
`EdgeSettings.users_db` (default `<HG_HOME>/edge/<node_id or 'default'>/users.sqlite3`):

- `users`: the profile (display name, persona, default sampling preferences, and the consent
  flags `allow_cloud`, default true, and `share_profile`, default false);
- `feedback`: samples of text the user accepted (and optionally rejected), with their time;
  the newest `max_feedback` per user are kept;
- `learned`: one opaque blob per user, the serialized state of the per-user adaptation model
  (written by whoever owns that model through `put_learned`), with the id of the newest
  feedback sample it holds.

`reset` forgets feedback and learned state and keeps the profile; `delete_profile` removes
every row about the user (foreign keys cascade). Deleted content is overwritten
(`secure_delete`) and the write-ahead log is checkpointed and truncated after each, so the
text is gone from the files on disk too; a checkpoint that a reader blocks is reported and
retried (`edge.personal.files.Scrubber`): both return whether the text is gone already.

The file and its `-wal`/`-shm` are 0600, in a folder created 0700 (`edge.personal.files`). Users
are bounded (`edge.personal.limits`): their number, each one's bytes (413) and feedback rate (429).

The file is opened lazily, on the first call: an edge that never sees a user never creates
it. A corrupt or locked file raises `Unavailable` (HTTP 503) naming the file, per call, and is
never overwritten or "repaired"; the next call tries again, so moving a corrupt file aside
brings the store back without a restart. Schema changes are the numbered steps of
`MIGRATIONS`, applied in order and recorded in `PRAGMA user_version`.

Changes are announced to `UserListener`s (`add_listener`): `on_feedback` after a sample is
stored, `on_forget` after `reset` or `delete_profile`. They run in the calling thread, after
the commit, under the store's lock (a listener that reads the store sees that change and no
later one), in the order of the changes; they must be quick and thread-safe, and an error in
one is logged (never with the user's text) and does not undo the change.

The store is thread-safe (one connection, one re-entrant lock); async callers run its
methods with `asyncio.to_thread`. Nothing here logs a user's text.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from broker.errors import BadRequest, NotFound, Unavailable
from edge.personal.files import Scrubber, checkpoint, failure, private_file
from edge.personal.limits import FeedbackRate, RateLimited, StoreFull, UserLimits
from edge.personal.models import (
    DEFAULT_MAX_FEEDBACK,
    MAX_DISPLAY_NAME,
    MAX_PERSONA,
    MAX_SAMPLE,
    USER_ID_PATTERN,
    Feedback,
    FeedbackBody,
    Profile,
    ProfileUpdate,
    UserListener,
    check_user_id,
)
from edge.personal.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    USER_BYTES,
    export_rows,
    migrate,
    prepare,
    read_feedback,
    read_learned,
    read_profile,
    transaction,
    write_learned,
)
from serving.bodies import validate_body

__all__ = [
    "DEFAULT_MAX_FEEDBACK",
    "MAX_DISPLAY_NAME",
    "MAX_PERSONA",
    "MAX_SAMPLE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "USER_ID_PATTERN",
    "Feedback",
    "FeedbackBody",
    "Profile",
    "ProfileUpdate",
    "RateLimited",
    "StoreFull",
    "UserLimits",
    "UserListener",
    "UserStore",
    "check_user_id",
    "migrate",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class UserStore:
    """Users' profiles, feedback and learned state in one SQLite file (module docstring).

    Args:
        path: the database file; its folder is created (0700) on first use.
        busy_timeout_s: how long a call waits for another writer's lock before `Unavailable`.
        max_feedback: feedback samples kept per user (the oldest go first).
        limits: users, bytes per user and feedback rate (None: unbounded; the edge service
            passes its settings' `personalize_*` caps).
        checkpoint_wait_s: how long a delete's checkpoint waits for readers before it is
            reported and retried in the background (`edge.personal.files.Scrubber`).
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_s: float = 5.0,
        max_feedback: int = DEFAULT_MAX_FEEDBACK,
        limits: UserLimits | None = None,
        checkpoint_wait_s: float = 0.2,
    ) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.max_feedback = max_feedback
        self.limits = limits
        self.checkpoint_wait_s = checkpoint_wait_s
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._listeners: list[UserListener] = []
        self._rate = FeedbackRate(limits) if limits is not None else None
        self.scrubber = Scrubber(self._try_checkpoint, self.path)

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
            with transaction(db):
                if self.limits is not None and not self._exists(db, user_id):
                    self.limits.check_users(db.execute("SELECT count(*) FROM users").fetchone()[0])
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
                    if "persona" in changes and self.limits is not None:
                        self.limits.check_bytes(self._user_bytes(db, user_id), "persona")
            return self._profile(db, user_id)

        profile = self._run(put)
        logger.debug("user profile stored (%d fields changed)", len(changes))
        return profile

    def delete_profile(self, user_id: str) -> bool:
        """Remove the user and everything about them, from the files on disk too.

        Returns:
            Whether the text is gone from the files already (False: a reader blocked the
            checkpoint; it was logged and is retried, see `scrub_pending`).

        Raises:
            NotFound: no such user.
        """
        check_user_id(user_id)

        def delete(db: sqlite3.Connection) -> None:
            with transaction(db):
                gone = db.execute("DELETE FROM users WHERE user_id = ?", (user_id,)).rowcount
            if not gone:
                raise _not_found(user_id)

        with self._lock:
            self._run(delete)
            if self._rate is not None:
                self._rate.forget(user_id)
            self._notify("forget", lambda listener: listener.on_forget(user_id))
            scrubbed = self.scrubber.scrub()
        logger.debug("user deleted")
        return scrubbed

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
            with transaction(db):
                self._require_user(db, user_id)
                if self._rate is not None:
                    self._rate.take(user_id)
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
                if self.limits is not None:
                    self.limits.check_bytes(self._user_bytes(db, user_id), "accepted")
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
            with transaction(db, "DEFERRED"):
                self._require_user(db, user_id)
                return read_feedback(db, user_id, limit)

        return self._run(read)

    # -------------------------------------------------------------------------- learned

    def get_learned(self, user_id: str) -> bytes | None:
        """The user's serialized adaptation state (None when there is none)."""
        found = self.get_learned_state(user_id)
        return None if found is None else found[0]

    def get_learned_state(self, user_id: str) -> tuple[bytes, int | None] | None:
        """The user's state and the newest feedback id it holds (None: not recorded), or None."""
        check_user_id(user_id)
        return self._run(lambda db: read_learned(db, user_id))

    def put_learned(self, user_id: str, state: bytes, feedback_id: int | None = None) -> None:
        """Store the user's serialized adaptation state (replacing the previous one), and the
        id of the newest feedback sample it holds.

        Raises:
            NotFound: no such user.
        """
        check_user_id(user_id)

        def put(db: sqlite3.Connection) -> None:
            with transaction(db):
                self._require_user(db, user_id)
                write_learned(db, user_id, state, feedback_id)

        self._run(put)

    def reset(self, user_id: str) -> bool:
        """Forget what was learned about the user (feedback and learned state); keep the profile.

        Returns:
            Whether the text is gone from the files already (as `delete_profile`).

        Raises:
            NotFound: no such user.
        """
        check_user_id(user_id)

        def wipe(db: sqlite3.Connection) -> None:
            with transaction(db):
                self._require_user(db, user_id)
                db.execute("DELETE FROM feedback WHERE user_id = ?", (user_id,))
                db.execute("DELETE FROM learned WHERE user_id = ?", (user_id,))

        with self._lock:
            self._run(wipe)
            self._notify("forget", lambda listener: listener.on_forget(user_id))
            scrubbed = self.scrubber.scrub()
        logger.debug("user reset")
        return scrubbed

    # --------------------------------------------------------------------------- export

    def export(self, user_id: str) -> dict[str, Any]:
        """Everything held about the user, as JSON-able data.

        Returns:
            `{"object": "user.export", "user_id", "exported", "schema_version", "profile",
            "feedback": [...], "learned": null | {"bytes", "updated", "state_base64"}}`.
        """
        check_user_id(user_id)

        def read(db: sqlite3.Connection) -> dict[str, Any]:
            body = export_rows(db, user_id)
            if body is None:
                raise _not_found(user_id)
            return body

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
                "scrub_pending": self.scrubber.pending,
                "checkpoints_blocked": self.scrubber.blocked,
                "checkpoint_retries": self.scrubber.retries,
            }

        return self._run(read)

    # -------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Checkpoint and close the file (a later call opens it again)."""
        with self._lock:
            self.scrubber.close()
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    if not checkpoint(conn, self._busy_ms(), self._busy_ms()):
                        logger.error(
                            "user store %s: a reader blocked the checkpoint at close; deleted "
                            "text may remain in its write-ahead log",
                            self.path,
                        )
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
            private_file(self.path)  # 0600 before SQLite writes a byte (its -wal/-shm follow)
        except OSError as exc:
            raise Unavailable(
                f"user store {self.path}: cannot create it or its folder ({exc.strerror}); "
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
            prepare(conn, self.path, self._busy_ms())
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise self._unavailable(exc) from None
            raise
        self._conn = conn
        logger.info("user store open: %s (schema %d)", self.path, SCHEMA_VERSION)
        return conn

    def _unavailable(self, exc: sqlite3.Error) -> Unavailable:
        error, broken = failure(exc, self.path)
        if broken:
            self._forget_connection()
        return error

    def _forget_connection(self) -> None:
        """Drop the connection so that the next call opens (and checks) the file again."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _busy_ms(self) -> int:
        return int(self.busy_timeout_s * 1000)

    def _try_checkpoint(self) -> bool:
        """Copy the write-ahead log into the file and truncate it (deleted text leaves it);
        False when a reader blocked it for `checkpoint_wait_s`."""
        with self._lock:
            if self._conn is None:  # closed (close checkpoints) or dropped: nothing to do
                return True
            return self._run(
                lambda db: checkpoint(db, int(self.checkpoint_wait_s * 1000), self._busy_ms())
            )

    def _user_bytes(self, db: sqlite3.Connection, user_id: str) -> int:
        return int(db.execute(USER_BYTES, (user_id,)).fetchone()[0])

    def _profile(self, db: sqlite3.Connection, user_id: str) -> Profile:
        profile = read_profile(db, user_id)
        if profile is None:
            raise _not_found(user_id)
        return profile

    def _exists(self, db: sqlite3.Connection, user_id: str) -> bool:
        return (
            db.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is not None
        )

    def _require_user(self, db: sqlite3.Connection, user_id: str) -> None:
        if not self._exists(db, user_id):
            raise _not_found(user_id)


def _not_found(user_id: str) -> NotFound:
    return NotFound(f"no user {user_id!r}: create it with PUT /v1/users/{user_id}")
