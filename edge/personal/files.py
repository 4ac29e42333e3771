"""The user store's files on disk: owner-only, deleted text scrubbed from the WAL, and what
a SQLite failure tells the caller (`failure`: a 503 naming the file).

- `private_file` creates the database file 0600 before SQLite opens it (SQLite then makes
  its `-wal` and `-shm` files with the same mode) in folders it creates 0700; files already
  there are tightened to 0600, and a folder others can enter is logged (it is not changed:
  it may be shared, e.g. a `/tmp` given as HG_EDGE_USERS_DB's folder).
- `Scrubber`: after a delete, a `wal_checkpoint(TRUNCATE)` copies the zeroed pages
  (`secure_delete`) into the file and empties the write-ahead log. A reader with an older
  snapshot blocks it, and the deleted text then stays in the WAL (and in the file). So a
  blocked checkpoint is reported (a warning, and the store's `scrub_pending`) and retried
  every `retry_s` until it succeeds or `give_up_s` passed (an error names the file).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from broker.errors import Unavailable

logger = logging.getLogger(__name__)

#: Mode of the database file (and so of its -wal and -shm files), and of created folders.
FILE_MODE = 0o600
FOLDER_MODE = 0o700
#: The companions SQLite creates next to the database file.
SUFFIXES = ("", "-wal", "-shm", "-journal")


def private_file(path: Path) -> None:
    """Create `path` (and missing folders) owner-only, or tighten its files to 0600.

    Raises:
        OSError: a folder or the file cannot be created.
    """
    missing: list[Path] = []
    folder = path.parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(mode=FOLDER_MODE, exist_ok=True)
        os.chmod(created, FOLDER_MODE)  # the umask may have cleared bits, never added them
    if not missing and path.parent.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "the user store's folder %s is open to other users; the store's files are 0600",
            path.parent,
        )
    fd = os.open(path, os.O_CREAT | os.O_RDWR, FILE_MODE)
    os.close(fd)
    for suffix in SUFFIXES:
        companion = path.with_name(path.name + suffix)
        if companion.exists() and stat.S_IMODE(companion.stat().st_mode) != FILE_MODE:
            os.chmod(companion, FILE_MODE)


def checkpoint(db: sqlite3.Connection, wait_ms: int, busy_timeout_ms: int) -> bool:
    """One `wal_checkpoint(TRUNCATE)`, waiting at most `wait_ms` for readers.

    Returns:
        Whether the log was copied into the file and emptied.
    """
    db.execute(f"PRAGMA busy_timeout = {wait_ms}")
    try:
        busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    finally:
        db.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
    return int(busy) == 0


def failure(exc: sqlite3.Error, path: Path) -> tuple[Unavailable, bool]:
    """The `Unavailable` (503) for a SQLite error on `path`, logged, and whether the
    connection must be dropped (the next call then opens and checks the file again)."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        logger.warning("user store %s is locked", path)
        message = f"user store {path} is locked by another process or connection; retry shortly"
        return Unavailable(message, retry_after=1.0), False
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        logger.error("user store %s is unusable: %s", path, text)
        return Unavailable(
            f"user store {path} is corrupt or not a hybridgen user database ({text}); it was "
            "left untouched: move it aside (a new one is then created) or restore it from a "
            "backup"
        ), True
    logger.error("user store %s failed: %s", path, text)
    return Unavailable(f"user store {path} is unavailable ({text})"), True


class Scrubber:
    """Retries a blocked checkpoint until the deleted text is out of the WAL (module doc).

    Args:
        attempt: runs one checkpoint (under the store's lock); True when it succeeded.
        name: the database file, for the log lines.
        retry_s: seconds between retries.
        give_up_s: seconds after the first blocked checkpoint before an error is logged
            and retries stop (the next delete, reset or close tries again).
    """

    def __init__(
        self,
        attempt: Callable[[], bool],
        name: Path,
        *,
        retry_s: float = 0.5,
        give_up_s: float = 300.0,
    ) -> None:
        self.attempt = attempt
        self.name = name
        self.retry_s = retry_s
        self.give_up_s = give_up_s
        self.pending = False  # deleted text may still be in the WAL
        self.blocked = 0  # checkpoints a reader blocked, in all
        self.retries = 0  # retries after a blocked checkpoint, in all
        self._since = 0.0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def scrub(self) -> bool:
        """Checkpoint now (after a delete); on a block, report it and retry in the background.

        Returns:
            Whether the deleted text is gone from the files now.
        """
        if self.attempt():
            self._done()
            return True
        with self._lock:
            self.blocked += 1
            if not self.pending:
                self.pending, self._since = True, time.monotonic()
                logger.warning(
                    "user store %s: a reader blocks the checkpoint, so deleted text stays in "
                    "its write-ahead log for now; retrying every %g s",
                    self.name,
                    self.retry_s,
                )
            self._arm()
        return False

    def _retry(self) -> None:
        with self._lock:
            self._timer = None
            if not self.pending:
                return
            self.retries += 1
        try:
            ok = self.attempt()
        except Exception as exc:  # an unusable file: its own error is raised per call
            logger.warning("user store %s: checkpoint retry failed (%s)", self.name, exc)
            ok = False
        if ok:
            logger.info("user store %s: deleted text scrubbed from the write-ahead log", self.name)
            self._done()
            return
        with self._lock:
            if time.monotonic() - self._since < self.give_up_s:
                self._arm()
                return
        logger.error(
            "user store %s: a reader blocked the checkpoint for over %g s; deleted text may "
            "remain in %s-wal until the next delete, reset or close",
            self.name,
            self.give_up_s,
            self.name,
        )

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self.retry_s, self._retry)
            self._timer.daemon = True
            self._timer.start()

    def _done(self) -> None:
        with self._lock:
            self.pending = False
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        """Stop retrying (the store's close makes a last attempt itself; a later delete
        starts again)."""
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
