"""Users' data at the edge: forgetting is complete, the files are owner-only, each user is
bounded. Real SQLite files, real uvicorn edges (tests/fixtures_edge.py), a real nats-server.

Each test is an attack (or a leak) of issue 20 that the code before the fix let through.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import sqlite3
import stat
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.server import NatsServer
from edge.personal.adapt import NgramCache
from edge.personal.personalizer import Personalizer, owns_prefix
from edge.personal.resident import largest_user_bytes
from edge.personal.store import ProfileUpdate, UserLimits, UserStore
from edge.runtime import EdgeRuntime, Prefill, SamplingParams
from edge.settings import EdgeSettings
from hybridgen.up import supervisor, tell
from hybridgen.up.spec import ChildSpec
from tests.fixtures_edge import ADMIN_HEADERS, ADMIN_KEY, LiveEdge
from tests.test_edge_prefix import chat as prefix_chat
from tests.waits import wait_until

PERSONA = "Answers as Captain Quillon of the airship Meridian, always in rhyme"
SECRET = "my bank pin is 4471 and my sister is called Odalys Vantrees"
PROMPT = "<|user|>\nTell me about the sky<|end|>\n<|assistant|>\n"
GREEDY = SamplingParams(max_tokens=4, temperature=0)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def byte_encode(text: str) -> list[int]:
    return list(text.encode())


def held_ids(personalizer: Personalizer) -> set[str]:
    """Every string key or member of the personalizer's own containers (what it holds ids in)."""
    found: set[str] = set()
    for value in vars(personalizer).values():
        if isinstance(value, dict | set):
            found |= {key for key in value if isinstance(key, str)}
    return found


async def complete(edge: LiveEdge, user: str) -> Any:
    async with edge.client(ADMIN_KEY) as client:
        return await client.completions.create(
            model="hg-edge", prompt=PROMPT, max_tokens=4, temperature=0, user=user
        )


def users_client(edge: LiveEdge) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"{edge.url}/v1/users", headers=ADMIN_HEADERS)


# ------------------------------------------------------------------------ forgetting


async def test_delete_and_reset_drop_the_users_kept_prefixes(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    edge = await start_edge(no_cloud=True, users_db=tmp_path / "users.sqlite3")
    runtime = edge.node.runtime
    async with users_client(edge) as users:
        for user in ("ana", "ana:x"):  # ids may hold ':': only ana's own keys go
            assert (await users.put(f"/{user}", json={"persona": PERSONA})).status_code == 200
            await complete(edge, user)
        await complete(edge, "ana")
        assert runtime.prefix_hits == 1  # ana's persona prefix was kept and reused
        owners = sorted(str(key).rpartition(":")[0] for key in runtime.prefix_cache_keys)
        assert owners == ["user:ana", "user:ana:x"]

        deleted = await users.delete("/ana")
        assert deleted.status_code == 200
        owners = [str(key).rpartition(":")[0] for key in runtime.prefix_cache_keys]
        assert owners == ["user:ana:x"]
        assert deleted.json()["scrubbed"] is True
        assert "ana" not in held_ids(edge.app.state.service.personalizer)

        # The same id and persona again: a new user, whose request prefills (no reuse).
        assert (await users.put("/ana", json={"persona": PERSONA})).status_code == 200
        misses = runtime.prefix_misses
        await complete(edge, "ana")
        assert (runtime.prefix_hits, runtime.prefix_misses) == (1, misses + 1)

        reset = await users.post("/ana/reset", json={})
        assert reset.status_code == 200 and reset.json()["scrubbed"] is True
        owners = [str(key).rpartition(":")[0] for key in runtime.prefix_cache_keys]
        assert owners == ["user:ana:x"]


async def test_requests_in_flight_at_a_forget_keep_no_prefix(runtime: EdgeRuntime) -> None:
    ids, span, prefix_len = prefix_chat(runtime, "Where is the lighthouse?")
    key = "user:zed:0123456789abcdef"
    forget = owns_prefix("zed")

    # In flight when the user is forgotten: held after its prefill, released after.
    held = runtime.submit(
        ids, GREEDY, score_span=span, prefix_key=key, prefix_len=prefix_len, hold_after_prefill=True
    )
    assert isinstance(await held.next_event(), Prefill)
    assert runtime.forget_prefixes(forget) == 0
    held.resume()
    _ = [event async for event in held]
    # Prepared before the forget, submitted after it.
    _ = [
        event async for event in runtime.submit(ids, GREEDY, prefix_key=key, prefix_len=prefix_len)
    ]
    assert runtime.prefix_cache_keys == []
    # Another user's request is kept as before.
    other = "user:zoe:0123456789abcdef"
    _ = [
        event
        async for event in runtime.submit(ids, GREEDY, prefix_key=other, prefix_len=prefix_len)
    ]
    assert runtime.prefix_cache_keys == [other]


def test_a_forgotten_user_leaves_no_id_in_the_personalizer(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "users.sqlite3")
    personalizer = Personalizer(store, byte_encode, persist_s=3600)
    try:
        for user in ("bea", "cid"):
            store.put_profile(user, ProfileUpdate(persona=PERSONA))
            store.add_feedback(user, SECRET)
            assert personalizer.prepare(user, SECRET) is not None
            store.add_feedback(user, SECRET + " again")  # queued, not learned yet
        store.reset("bea")
        store.delete_profile("cid")
        assert {"bea", "cid"}.isdisjoint(held_ids(personalizer))
        assert not personalizer.resident("bea") and not personalizer.resident("cid")
    finally:
        personalizer.close()
        store.close()


def test_learning_runs_outside_the_store_lock(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "users.sqlite3")
    under_lock: list[bool] = []

    def encode(text: str) -> list[int]:
        under_lock.append(store._lock._is_owned())  # type: ignore[attr-defined]
        return byte_encode(text)

    personalizer = Personalizer(store, encode, persist_s=3600)
    try:
        store.put_profile("dan")
        store.add_feedback("dan", SECRET)
        assert personalizer.prepare("dan", "") is not None  # loads dan: one sample
        store.add_feedback("dan", SECRET + " more")
        got = personalizer.prepare("dan", "")
        assert got is not None and got.adapter is not None and got.adapter.samples == 2
        assert under_lock and not any(under_lock)
    finally:
        personalizer.close()
        store.close()


@pytest.mark.parametrize("forget", ["delete", "reset"])
def test_deleted_text_leaves_the_wal_once_a_blocking_reader_ends(
    tmp_path: Path, forget: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    db = tmp_path / "users.sqlite3"
    store = UserStore(db)
    store.put_profile("eli", ProfileUpdate(persona=PERSONA))
    store.add_feedback("eli", SECRET)
    files = [db, db.with_name(db.name + "-wal")]

    def holds_secret() -> bool:
        return any(SECRET.encode() in path.read_bytes() for path in files if path.exists())

    assert holds_secret()
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM feedback").fetchone() == (1,)
        scrubbed = store.delete_profile("eli") if forget == "delete" else store.reset("eli")
        assert scrubbed is False  # reported, not ignored
        stats = store.stats()
        assert (stats["scrub_pending"], stats["checkpoints_blocked"]) == (True, 1)
        assert holds_secret()  # the reader's snapshot still pins it
        assert "a reader blocks the checkpoint" in caplog.text
    finally:
        reader.close()
    try:
        wait_until(lambda: not store.stats()["scrub_pending"], "the scrub done")
        assert store.stats()["checkpoint_retries"] >= 1
        assert not holds_secret()
        assert db.with_name(db.name + "-wal").stat().st_size == 0
    finally:
        store.close()


# ------------------------------------------------------------------------ owner-only files


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask_022")
def test_the_store_files_and_folder_are_owner_only(tmp_path: Path) -> None:
    db = tmp_path / "edge" / "node-1" / "users.sqlite3"
    store = UserStore(db)
    try:
        store.put_profile("fay", ProfileUpdate(persona=PERSONA))
        store.add_feedback("fay", SECRET)
        for suffix in ("", "-wal", "-shm"):
            assert mode(db.with_name(db.name + suffix)) == 0o600, suffix
        assert mode(db.parent) == 0o700 and mode(db.parent.parent) == 0o700
    finally:
        store.close()
    # A file from before (0644) is tightened when it is opened again.
    os.chmod(db, 0o644)
    again = UserStore(db)
    try:
        assert again.get_profile("fay").persona == PERSONA
        assert mode(db) == 0o600
    finally:
        again.close()


@pytest.mark.usefixtures("umask_022")
async def test_launcher_and_nats_server_logs_are_owner_only(tmp_path: Path) -> None:
    # The launcher's own log.
    own = tmp_path / "home" / "logs" / "launcher.log"
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        tell._log_to_file(own, only=False)
        logging.getLogger("hybridgen.up").info("a line")
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()
        for handler in list(tell._where_log.handlers):
            tell._where_log.removeHandler(handler)
            handler.close()
    assert own.read_bytes()
    assert (mode(own), mode(own.parent)) == (0o600, 0o700)

    # A child's log (a real process, as `up` starts them).
    net = supervisor.Launcher(home=tmp_path / "home", secure=False)
    spec = ChildSpec(name="probe", argv=[sys.executable, "-c", "print('hello')"])
    process = await net._spawn(spec)
    assert await asyncio.wait_for(process.wait(), 30) == 0
    net._logs.pop("probe").close()
    assert (mode(net.log_path("probe")), mode(net.logs_dir)) == (0o600, 0o700)

    # The nats-server's log and its store.
    server = NatsServer(store_dir=tmp_path / "nats")
    await server.start()
    try:
        assert (mode(server.log_path), mode(server.store_dir)) == (0o600, 0o700)
    finally:
        await server.shutdown()


# ------------------------------------------------------------------------ bounded per user


async def test_feedback_flood_is_refused_with_429_and_413(
    start_edge: Callable[..., Any], tmp_path: Path
) -> None:
    edge = await start_edge(
        no_cloud=True,
        users_db=tmp_path / "users.sqlite3",
        personalize_max_users=2,
        personalize_max_user_bytes=4096,
        personalize_feedback_burst=3,
        personalize_feedback_per_minute=1.0,
    )
    async with users_client(edge) as users:
        for user in ("gil", "hal"):
            assert (await users.put(f"/{user}", json={})).status_code == 200
        # The rate: a burst of 3, then 429 with Retry-After.
        for i in range(3):
            ok = await users.post("/gil/feedback", json={"accepted": f"sample {i}"})
            assert ok.status_code == 200, ok.text
        flood = await users.post("/gil/feedback", json={"accepted": "one too many"})
        assert flood.status_code == 429
        assert flood.json()["error"]["code"] == "overloaded"
        assert int(flood.headers["Retry-After"]) >= 1
        # The bytes per user: 413 naming the field; nothing is stored.
        ok = await users.post("/hal/feedback", json={"accepted": "x" * 3000})
        assert ok.status_code == 200, ok.text
        big = await users.post("/hal/feedback", json={"accepted": "y" * 2000})
        assert big.status_code == 413
        assert (big.json()["error"]["code"], big.json()["error"]["param"]) == (
            "bad_request",
            "accepted",
        )
        persona = await users.put("/hal", json={"persona": "z" * 2000})
        assert persona.status_code == 413 and persona.json()["error"]["param"] == "persona"
        exported = (await users.get("/hal/export")).json()
        assert [len(f["accepted"]) for f in exported["feedback"]] == [3000]
        assert exported["profile"]["persona"] is None
        # The number of users.
        third = await users.put("/ivy", json={})
        assert third.status_code == 413 and third.json()["error"]["code"] == "bad_request"
        assert (await users.get("/ivy")).status_code == 404


def test_pruning_examines_only_what_it_drops() -> None:
    rng = random.Random(7)
    cap = 1000
    cache = NgramCache(max_contexts=cap)
    for _ in range(50):  # a large round: each sample alone makes ~12x the cap
        created, examined = cache.created, cache.examined
        cache.update([rng.randrange(5000) for _ in range(2000)])
        assert len(cache) <= cap
        # Per update: no more than what it created plus one batch (a tenth of the cap).
        assert cache.examined - examined <= cache.created - created + cap // 10 + 1
    assert cache.examined == cache.created - len(cache)  # each examined context was dropped


def test_pruning_keeps_suffixes_of_kept_contexts_and_survives_a_reload() -> None:
    rng = random.Random(8)
    cache = NgramCache(max_contexts=500)
    for _ in range(20):
        cache.update([rng.randrange(50) for _ in range(300)])
    kept = set(cache.contexts())
    assert all(context[1:] in kept for context in kept if len(context) > 1)
    again = NgramCache.from_bytes(cache.to_bytes())
    assert list(again.contexts()) == list(cache.contexts())  # the recency order too


@pytest.mark.slow
def test_the_largest_allowed_user_fits_the_memory_budget(tmp_path: Path) -> None:
    settings = EdgeSettings(users_db=tmp_path / "users.sqlite3")
    budget = int(settings.personalize_memory_mb * (1 << 20))
    limits = UserLimits(max_user_bytes=settings.personalize_max_user_bytes, feedback_burst=1000)
    store = UserStore(tmp_path / "users.sqlite3", limits=limits)
    store.put_profile("max")
    rng = random.Random(9)
    used = 0
    while True:  # the largest user: text of many distinct tokens, up to the byte cap
        text = "".join(chr(rng.randrange(0x100, 0x800)) for _ in range(8000))  # 2 bytes each
        if used + len(text.encode()) > settings.personalize_max_user_bytes:
            break
        store.add_feedback("max", text)
        used += len(text.encode())

    def encode(text: str) -> list[int]:
        return [ord(char) for char in text]  # a token per character: many distinct grams

    estimate = largest_user_bytes(
        settings.personalize_max_user_bytes, settings.personalize_max_contexts
    )
    assert estimate <= budget
    personalizer = Personalizer(
        store,
        encode,
        memory_bytes=budget,
        persist_s=3600,
        max_contexts=settings.personalize_max_contexts,
        max_user_bytes=settings.personalize_max_user_bytes,
    )
    try:
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        assert personalizer.prepare("max", "") is not None
        personalizer.flush()  # the snapshot too
        got = personalizer.prepare("max", "")  # the gram frequencies too
        assert got is not None and got.adapter is not None
        gc.collect()
        real = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        cap = settings.personalize_max_contexts
        assert int(cap * 0.9) <= len(got.adapter) <= cap  # at its cap (pruned to 90%)
        assert real <= personalizer.memory_used() <= estimate <= budget
    finally:
        personalizer.close()
        store.close()
    with pytest.raises(ValueError, match="HG_EDGE_PERSONALIZE_MAX_CONTEXTS"):
        Personalizer(store, encode, memory_bytes=budget, max_contexts=10**6, max_user_bytes=1024)


def test_a_flood_of_feedback_from_many_threads_is_bounded(tmp_path: Path) -> None:
    limits = UserLimits(feedback_burst=5, feedback_per_minute=1.0)
    store = UserStore(tmp_path / "users.sqlite3", limits=limits)
    store.put_profile("jon")
    outcomes: list[str] = []

    def send() -> None:
        try:
            store.add_feedback("jon", SECRET)
            outcomes.append("ok")
        except Exception as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=send) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert sorted(outcomes) == ["RateLimited"] * 7 + ["ok"] * 5
