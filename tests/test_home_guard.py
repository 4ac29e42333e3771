"""The suite never writes into the user's own `HG_HOME` (tests/fixtures_home.py)."""

import os
from pathlib import Path

from tests.fixtures_home import _STATE, changes, snapshot


def test_the_session_runs_in_a_scratch_home_not_the_users() -> None:
    scratch = _STATE["scratch"]
    assert isinstance(scratch, Path)
    assert os.environ["HG_HOME"] == str(scratch)
    assert scratch != _STATE["real"]


def test_the_guard_sees_a_file_added_changed_or_removed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert snapshot(home) == {}
    home.mkdir()
    (home / "keep").write_text("a")
    before = snapshot(home)
    assert changes(before, snapshot(home)) == []
    (home / "edge").mkdir()
    (home / "edge" / "users.sqlite3").write_text("x")
    assert changes(before, snapshot(home)) == [".", "edge", "edge/users.sqlite3"]
    after = snapshot(home)
    (home / "edge" / "users.sqlite3").write_text("xy")
    assert changes(after, snapshot(home)) == ["edge/users.sqlite3"]
