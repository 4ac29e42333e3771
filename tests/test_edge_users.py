"""The edge's user store (real SQLite files) and the `/v1/users` routes (a live edge).

The live edge is `start_edge` from tests/fixtures_edge.py (a conftest plugin).
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.errors import BadRequest, NotFound, Unavailable
from edge.personal.store import MIGRATIONS, SCHEMA_VERSION, ProfileUpdate, UserStore, migrate
from edge.settings import EdgeSettings
from tests.fixtures_edge import ADMIN_HEADERS

PERSONA = "Answers like a terse Unix greybeard who loves awk"
ACCEPTED = "pipe it through awk and sort -k2 numerically, quokka style"
REJECTED = "I would be delighted to help you with your wombat question"


class Recorder:
    """A `UserListener` that records what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def on_feedback(self, user_id: str, accepted: str, rejected: str | None) -> None:
        self.events.append(("feedback", user_id, accepted, str(rejected)))

    def on_forget(self, user_id: str) -> None:
        self.events.append(("forget", user_id))


@pytest.fixture
def store(tmp_path: Path) -> Any:
    users = UserStore(tmp_path / "users.sqlite3")
    yield users
    users.close()


def _files(path: Path) -> list[Path]:
    return [p for p in path.parent.iterdir() if p.name.startswith(path.name)]


# ------------------------------------------------------------------------------- the store


def test_profile_crud_and_consent_defaults(store: UserStore) -> None:
    with pytest.raises(NotFound):
        store.get_profile("alice")
    created = store.put_profile("alice")
    assert created.allow_cloud is True
    assert created.share_profile is False
    assert created.persona is None and created.temperature is None

    store.put_profile("alice", ProfileUpdate(persona=PERSONA, temperature=0.3, allow_cloud=False))
    # Fields left out are kept: a later change of the name does not undo the opt-out.
    changed = store.put_profile("alice", ProfileUpdate(display_name="Alice"))
    assert changed.display_name == "Alice"
    assert changed.persona == PERSONA
    assert changed.temperature == 0.3
    assert changed.allow_cloud is False
    assert changed.created == created.created
    # null clears a field.
    cleared = store.put_profile("alice", ProfileUpdate.model_validate({"persona": None}))
    assert cleared.persona is None and cleared.display_name == "Alice"
    assert store.get_profile("alice") == cleared

    store.delete_profile("alice")
    with pytest.raises(NotFound):
        store.get_profile("alice")
    with pytest.raises(NotFound):
        store.delete_profile("alice")


@pytest.mark.parametrize("user_id", ["", "a" * 129, "a/b", "../etc", "al ice", ".hidden", "é"])
def test_bad_user_ids_are_refused(store: UserStore, user_id: str) -> None:
    with pytest.raises(BadRequest) as caught:
        store.put_profile(user_id)
    assert caught.value.param == "user_id"
    assert not store.path.exists()  # refused before the file is even opened


def test_good_user_ids(store: UserStore) -> None:
    for user_id in ("a", "a" * 128, "user@example.com", "team:ops-7", "u_1.2"):
        assert store.put_profile(user_id).user_id == user_id


def test_feedback_is_kept_newest_last_and_capped(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "u.sqlite3", max_feedback=3)
    recorder = Recorder()
    store.add_listener(recorder)
    with pytest.raises(NotFound):
        store.add_feedback("bob", "text")
    store.put_profile("bob")
    with pytest.raises(BadRequest) as caught:
        store.add_feedback("bob", "")
    assert caught.value.param == "accepted"
    for i in range(5):
        store.add_feedback("bob", f"sample {i}", REJECTED if i == 4 else None)
    samples = store.list_feedback("bob")
    assert [s.accepted for s in samples] == ["sample 2", "sample 3", "sample 4"]
    assert samples[-1].rejected == REJECTED and samples[0].rejected is None
    assert [s.accepted for s in store.list_feedback("bob", limit=2)] == ["sample 3", "sample 4"]
    assert recorder.events[-1] == ("feedback", "bob", "sample 4", REJECTED)
    assert len(recorder.events) == 5
    store.close()


def test_reset_forgets_learning_and_keeps_the_profile(store: UserStore) -> None:
    recorder = Recorder()
    store.add_listener(recorder)
    store.put_profile("carol", ProfileUpdate(persona=PERSONA, share_profile=True))
    store.add_feedback("carol", ACCEPTED)
    store.put_learned("carol", b"\x00state\xff")
    assert store.get_learned("carol") == b"\x00state\xff"

    store.reset("carol")
    assert store.list_feedback("carol") == []
    assert store.get_learned("carol") is None
    profile = store.get_profile("carol")
    assert profile.persona == PERSONA and profile.share_profile is True
    assert recorder.events[-1] == ("forget", "carol")
    with pytest.raises(NotFound):
        store.reset("nobody")


def _everything(path: Path) -> str:
    """Every row of every table of the file, read through a fresh connection, as text."""
    db = sqlite3.connect(path)
    try:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master")]
        rows = []
        for table in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            rows += [repr(row) for row in db.execute(f'SELECT * FROM "{table[0]}"')]
        return "\n".join(tables + rows)
    finally:
        db.close()


def test_delete_leaves_nothing(store: UserStore) -> None:
    recorder = Recorder()
    store.add_listener(recorder)
    store.put_profile("other", ProfileUpdate(persona="someone else entirely"))
    store.add_feedback("other", "the other user's own words")
    secret_id = "dave-7f3a9c"
    store.put_profile(secret_id, ProfileUpdate(persona=PERSONA, display_name="Dave Quux"))
    for i in range(40):  # enough to spread over several pages
        store.add_feedback(secret_id, f"{ACCEPTED} {i}", REJECTED)
    store.put_learned(secret_id, b"LEARNED-NGRAM-STATE" * 200)
    secrets = [secret_id, PERSONA, "Dave Quux", ACCEPTED, REJECTED, "LEARNED-NGRAM-STATE"]
    assert all(s in _everything(store.path) for s in secrets[:5])

    store.delete_profile(secret_id)

    assert recorder.events[-1] == ("forget", secret_id)
    dump = _everything(store.path)
    assert "the other user's own words" in dump  # the other user is intact
    for secret in secrets:
        assert secret not in dump
    # Nor in the bytes on disk: the file, its write-ahead log (checkpointed) and shm.
    for file in _files(store.path):
        data = file.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} left in {file.name}"
    store.close()
    with pytest.raises(NotFound):
        UserStore(store.path).export(secret_id)


def test_export_holds_everything(store: UserStore) -> None:
    store.put_profile("erin", ProfileUpdate(persona=PERSONA, max_tokens=99, top_p=0.9))
    store.add_feedback("erin", ACCEPTED, REJECTED)
    store.put_learned("erin", b"\x01\x02")
    exported = json.loads(json.dumps(store.export("erin")))
    assert exported["user_id"] == "erin"
    assert exported["schema_version"] == SCHEMA_VERSION
    assert exported["profile"]["persona"] == PERSONA
    assert exported["profile"]["max_tokens"] == 99
    assert exported["profile"]["allow_cloud"] is True
    assert [(f["accepted"], f["rejected"]) for f in exported["feedback"]] == [(ACCEPTED, REJECTED)]
    assert exported["learned"]["state_base64"] == "AQI="
    assert exported["learned"]["bytes"] == 2
    stats = store.stats()
    assert (stats["users"], stats["feedback"], stats["learned"]) == (1, 1, 1)


def test_concurrent_writers_from_threads(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite3"
    shared = UserStore(path)
    second = UserStore(path)  # another connection to the same file (another process alike)
    errors: list[BaseException] = []

    def writer(store: UserStore, n: int) -> None:
        try:
            user = f"user-{n}"
            store.put_profile(user, ProfileUpdate(display_name=f"U{n}"))
            for i in range(15):
                store.add_feedback(user, f"sample {n}.{i}")
                store.put_profile(user, ProfileUpdate(temperature=i / 10))
                store.add_feedback("common", f"from {n}.{i}")
        except BaseException as exc:
            errors.append(exc)

    shared.put_profile("common")
    threads = [
        threading.Thread(target=writer, args=(shared if n % 2 else second, n)) for n in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(shared.list_feedback("common")) == 8 * 15
    for n in range(8):
        assert len(second.list_feedback(f"user-{n}")) == 15
        assert shared.get_profile(f"user-{n}").temperature == 1.4
    shared.close()
    second.close()


def test_corrupt_file_is_unavailable_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite3"
    garbage = b"this is not a database, but it is somebody's file\n" * 200
    path.write_bytes(garbage)
    store = UserStore(path)
    for call in (
        lambda: store.get_profile("alice"),
        lambda: store.put_profile("alice"),
        lambda: store.add_feedback("alice", ACCEPTED),
        lambda: store.delete_profile("alice"),
        store.stats,
    ):
        with pytest.raises(Unavailable) as caught:
            call()
        assert str(path) in caught.value.message
        assert "corrupt" in caught.value.message
    assert path.read_bytes() == garbage
    assert _files(path) == [path]

    # Moved aside, a new file is made at the next call (no restart).
    shutil.move(path, tmp_path / "aside.sqlite3")
    assert store.put_profile("alice").user_id == "alice"
    assert (tmp_path / "aside.sqlite3").read_bytes() == garbage
    store.close()


def test_damaged_file_is_refused_whole_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite3"
    store = UserStore(path)
    store.put_profile("alice")
    store.put_profile("bob")
    for i in range(200):
        store.add_feedback("alice", f"marker-{i:03d} " + ACCEPTED * 8)
    store.close()
    data = bytearray(path.read_bytes())
    page = 4096
    damaged_page = data.index(b"marker-100 ") // page
    data[damaged_page * page : (damaged_page + 1) * page] = b"\xa5" * page  # one feedback page
    path.write_bytes(bytes(data))
    # Even calls that would not read the damaged page are refused: nothing is written into
    # (or served from) a damaged file.
    damaged = UserStore(path)
    for call in (lambda: damaged.get_profile("bob"), lambda: damaged.put_profile("carol")):
        with pytest.raises(Unavailable) as caught:
            call()
        assert str(path) in caught.value.message and "corrupt" in caught.value.message
    assert path.read_bytes() == bytes(data)


def test_locked_file_is_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite3"
    store = UserStore(path, busy_timeout_s=0.2)
    store.put_profile("alice")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the lock
    try:
        with pytest.raises(Unavailable) as caught:
            store.add_feedback("alice", ACCEPTED)
        assert "locked" in caught.value.message and str(path) in caught.value.message
        assert caught.value.retry_after is not None
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.add_feedback("alice", ACCEPTED)
    assert [s.accepted for s in store.list_feedback("alice")] == [ACCEPTED]
    store.close()


@pytest.mark.parametrize("start", [0, 1, 3])
def test_old_schema_is_migrated(tmp_path: Path, start: int) -> None:
    path = tmp_path / "users.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate(db, MIGRATIONS[:start]) == start
    if start >= 1:
        db.execute(
            "INSERT INTO users (user_id, persona, created, updated) VALUES ('old', 'kept', 1, 1)"
        )
    db.close()

    store = UserStore(path)
    assert store.stats()["schema_version"] == SCHEMA_VERSION == len(MIGRATIONS) >= 2
    if start >= 1:
        assert store.get_profile("old").persona == "kept"
        assert store.get_profile("old").allow_cloud is True
    store.put_profile("old")
    store.put_learned("old", b"new in schema 2")  # the table the migration added
    assert store.get_learned("old") == b"new in schema 2"
    # The penalties' columns (schema 4): none set before, stored after.
    assert store.get_profile("old").repetition_penalty is None
    store.put_profile("old", ProfileUpdate(frequency_penalty=1.5, repetition_penalty=1.2))
    kept = store.get_profile("old")
    assert (kept.frequency_penalty, kept.repetition_penalty) == (1.5, 1.2)
    store.close()
    assert UserStore(path).stats()["schema_version"] == SCHEMA_VERSION  # idempotent


def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "users.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(Unavailable, match="newer"):
        UserStore(path).get_profile("x")
    assert path.read_bytes() == before


def test_no_user_text_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = UserStore(tmp_path / "users.sqlite3")
    store.put_profile("frank", ProfileUpdate(persona=PERSONA, display_name="Frank Zed"))
    store.add_feedback("frank", ACCEPTED, REJECTED)
    store.reset("frank")
    store.delete_profile("frank")
    store.close()
    assert caplog.records  # something was logged
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for text in (PERSONA, ACCEPTED, REJECTED, "Frank Zed"):
        assert text not in logged


def test_default_path_is_under_the_home_and_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HG_HOME", str(tmp_path))
    assert EdgeSettings(node_id="edge-a").users_db == tmp_path / "edge/edge-a/users.sqlite3"
    assert EdgeSettings().users_db == tmp_path / "edge/default/users.sqlite3"
    assert EdgeSettings(users_db=tmp_path / "x.db").users_db == tmp_path / "x.db"


# ------------------------------------------------------------------------ the live edge


@pytest.mark.slow
async def test_users_lifecycle_through_the_edge(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    db = tmp_path / "users.sqlite3"
    edge = await start_edge(no_cloud=True, users_db=db)
    async with httpx.AsyncClient(base_url=f"{edge.url}/v1/users", headers=ADMIN_HEADERS) as client:
        put = await client.put("/gina", json={"persona": PERSONA, "temperature": 0.2})
        assert put.status_code == 200, put.text
        assert put.json()["object"] == "user"
        assert put.json()["allow_cloud"] is True and put.json()["share_profile"] is False
        await client.put("/gina", json={"allow_cloud": False})
        got = (await client.get("/gina")).json()
        assert (got["persona"], got["temperature"], got["allow_cloud"]) == (PERSONA, 0.2, False)

        sample = await client.post("/gina/feedback", json={"accepted": ACCEPTED})
        assert sample.status_code == 200, sample.text
        await client.post("/gina/feedback", json={"accepted": "second", "rejected": REJECTED})
        exported = await client.get("/gina/export")
        assert exported.status_code == 200
        body = exported.json()
        assert body["object"] == "user.export" and body["user_id"] == "gina"
        assert body["profile"]["persona"] == PERSONA
        assert [(f["accepted"], f["rejected"]) for f in body["feedback"]] == [
            (ACCEPTED, None),
            ("second", REJECTED),
        ]
        assert body["learned"] is None

        reset = await client.post("/gina/reset", json={})
        assert (reset.json()["reset"], reset.json()["scrubbed"]) == (True, True)
        after = (await client.get("/gina/export")).json()
        assert after["feedback"] == [] and after["profile"]["persona"] == PERSONA

        deleted = await client.delete("/gina")
        assert deleted.json() == {
            "object": "user.deleted",
            "id": "gina",
            "deleted": True,
            "scrubbed": True,
        }
        assert (await client.get("/gina")).status_code == 404
    assert "gina" not in _everything(db)


def _envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    return error


@pytest.mark.slow
async def test_users_error_envelopes(start_edge: Callable[..., Any], tmp_path: Path) -> None:
    edge = await start_edge(no_cloud=True, users_db=tmp_path / "users.sqlite3", api_keys=["k@*"])
    async with httpx.AsyncClient(base_url=f"{edge.url}/v1/users") as anonymous:
        _envelope(await anonymous.get("/hank"), 401, "unauthorized")
    headers = {"Authorization": "Bearer k"}
    async with httpx.AsyncClient(base_url=f"{edge.url}/v1/users", headers=headers) as client:
        for response in (
            await client.get("/hank"),
            await client.get("/hank/export"),
            await client.post("/hank/reset", json={}),
            await client.delete("/hank"),
            await client.post("/hank/feedback", json={"accepted": "x"}),
        ):
            error = _envelope(response, 404, "not_found")
            assert "hank" in error["message"]
        assert (await client.put("/hank", json={})).status_code == 200
        for body, param in (
            ({"temperature": 9}, "temperature"),
            ({"allow_cloud": "maybe"}, "allow_cloud"),
            ({"persona": "x" * 9000}, "persona"),
            ({"favourite_colour": "red"}, "favourite_colour"),
        ):
            error = _envelope(await client.put("/hank", json=body), 400, "bad_request")
            assert error["param"] == param
        for body, param in (({}, "accepted"), ({"accepted": ""}, "accepted")):
            error = _envelope(await client.post("/hank/feedback", json=body), 400, "bad_request")
            assert error["param"] == param
        error = _envelope(await client.put("/bad%20id", json={}), 400, "bad_request")
        assert error["param"] == "user_id"
        assert (await client.get("/hank")).json()["temperature"] is None  # nothing half-applied


@pytest.mark.slow
async def test_corrupt_store_gives_503_and_the_edge_keeps_serving(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    db = tmp_path / "users.sqlite3"
    garbage = b"\x00not sqlite\xff" * 512
    db.write_bytes(garbage)
    edge = await start_edge(no_cloud=True, users_db=db)
    async with httpx.AsyncClient(base_url=edge.url, headers=ADMIN_HEADERS) as client:
        error = _envelope(await client.put("/v1/users/ivy", json={}), 503, "unavailable")
        assert str(db) in error["message"]
        answer = await client.post(
            "/v1/completions", json={"model": "hg-edge", "prompt": "Hello", "max_tokens": 2}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["served_by"] == "edge"
        _envelope(await client.get("/v1/users/ivy"), 503, "unavailable")
    assert db.read_bytes() == garbage
