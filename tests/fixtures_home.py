"""Keep the suite out of the user's own data folder.

The whole session runs with `HG_HOME` pointed at a temporary folder (set before any test
or child process starts), and the session fails when the folder the user would have had
(`$HG_HOME` as given, else `~/.hybridgen`) changed while it ran.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_STATE: dict[str, object] = {}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time (empty when absent)."""
    if not root.exists():
        return {}
    seen = {".": (0, root.stat().st_mtime_ns)}
    for path in root.rglob("*"):
        stat = path.lstat()
        seen[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return seen


def changes(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """The paths added, removed or modified between two snapshots, sorted."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def pytest_configure(config: pytest.Config) -> None:
    real = Path(os.environ.get("HG_HOME") or Path.home() / ".hybridgen").expanduser()
    scratch = Path(tempfile.mkdtemp(prefix="hg-test-home-"))
    _STATE.update(real=real, scratch=scratch, before=snapshot(real))
    os.environ["HG_HOME"] = str(scratch)


def pytest_unconfigure(config: pytest.Config) -> None:
    scratch = _STATE.get("scratch")
    if isinstance(scratch, Path):
        shutil.rmtree(scratch, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    real = _STATE.get("real")
    before = _STATE.get("before")
    if not isinstance(real, Path) or not isinstance(before, dict):
        return
    touched = changes(before, snapshot(real))
    if touched:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"the tests changed the user's HG_HOME ({real}): " + ", ".join(touched[:10])
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("!", message, red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
