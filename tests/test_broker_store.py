"""Fleet config (KV) and artifacts (object store) against a real JetStream server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import api

from broker import errors, subjects
from broker.bus import connect
from broker.server import NatsServer
from broker.store import ArtifactStore, FleetConfig
from tests.waits import BOUND_S, eventually


async def test_kv_get_put_and_watch(nc: Client) -> None:
    config = await FleetConfig.open(nc)
    assert await config.get(subjects.POLICY_DEFAULT_KEY) is None
    await config.put(subjects.POLICY_DEFAULT_KEY, {"threshold": 1.0})
    assert await config.get(subjects.POLICY_DEFAULT_KEY) == {"threshold": 1.0}

    seen: list[tuple[str, dict | None]] = []

    async def watch() -> None:
        async for key, value in config.watch("policy.>"):
            seen.append((key, value))

    task = asyncio.create_task(watch())
    try:
        await eventually(lambda: seen, "the current value")  # it comes first
        node_key = subjects.policy_key("edge-1")
        await config.put(node_key, {"threshold": 2.5})
        await config.delete(node_key)
        await eventually(lambda: len(seen) >= 3, "the put and the delete")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert seen == [
        ("policy.default", {"threshold": 1.0}),
        ("policy.node.edge-1", {"threshold": 2.5}),
        ("policy.node.edge-1", None),
    ]
    # A second open binds the same bucket.
    again = await FleetConfig.open(nc)
    assert await again.get("policy.default") == {"threshold": 1.0}
    with pytest.raises(errors.BadRequest) as info:
        await config.put("bad key with spaces", {})
    assert (info.value.message, info.value.param) == (
        "invalid config key 'bad key with spaces'",
        "key",
    )


async def test_kv_non_json_value_is_a_coded_error(nc: Client) -> None:
    config = await FleetConfig.open(nc)
    await config.kv.put("raw", b"not json")
    await config.kv.put("listed", b"[1, 2]")
    with pytest.raises(errors.BadRequest) as info:
        await config.get("raw")
    assert (info.value.message, info.value.param) == (
        "config key 'raw' does not hold JSON: Expecting value: line 1 column 1 (char 0)",
        "raw",
    )
    with pytest.raises(errors.BadRequest) as info:
        await config.get("listed")
    assert info.value.message == "config key 'listed' holds a list, not an object"


SIZE = 20 * 1024 * 1024 + 12345


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "model.bin"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_20mib_artifact_round_trip(
    nc: Client, big_file: tuple[Path, str], tmp_path: Path
) -> None:
    store = await ArtifactStore.open(nc)
    path, expected = big_file
    sha = await store.put_file("v1/edge-int4/model.bin", path, meta={"version": "v1"})
    assert sha == expected
    dest = tmp_path / "out" / "model.bin"
    assert await store.get_file("v1/edge-int4/model.bin", dest) == expected
    assert sha256_of(dest) == expected
    [listed] = await store.list()
    assert listed["name"] == "v1/edge-int4/model.bin"
    assert listed["sha256"] == expected and listed["meta"] == {"version": "v1"}
    assert listed["size"] == SIZE


async def test_small_and_empty_artifacts(nc: Client) -> None:
    store = await ArtifactStore.open(nc)
    await store.put_bytes("manifest.json", b'{"a": 1}')
    assert await store.get_bytes("manifest.json") == b'{"a": 1}'
    await store.put_bytes("empty", b"")
    assert await store.get_bytes("empty") == b""
    await store.delete("empty")
    with pytest.raises(errors.NotFound):
        await store.get_bytes("empty")
    with pytest.raises(errors.NotFound):
        await store.delete("never-there")
    assert [o["name"] for o in await store.list()] == ["manifest.json"]


async def _rewrite_meta(store: ArtifactStore, name: str, **changes: object) -> None:
    info = await store.obs.get_info(name)
    raw = info.as_dict()
    raw.update(changes)
    subject = f"$O.{store.bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
    await store.js.publish(subject, json.dumps(raw).encode(), headers={api.Header.ROLLUP: "sub"})


async def test_tampered_artifact_refused(nc: Client, tmp_path: Path) -> None:
    store = await ArtifactStore.open(nc)
    data = os.urandom(600_000)
    await store.put_bytes("weights", data)
    wrong = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(b"other").digest()).decode()
    await _rewrite_meta(store, "weights", digest=wrong)
    dest = tmp_path / "downloads" / "weights"
    with pytest.raises(errors.Internal, match="'weights' failed verification"):
        await store.get_file("weights", dest)
    assert os.listdir(tmp_path / "downloads") == []  # nothing, not even a temp file


async def test_truncated_artifact_refused(nc: Client, tmp_path: Path) -> None:
    store = await ArtifactStore.open(nc)
    await store.put_bytes("weights", os.urandom(600_000))  # 5 chunks of 128 KiB
    info = await store.obs.get_info("weights")
    await store.js.purge_stream(store.stream, subject=f"$O.{store.bucket}.C.{info.nuid}", keep=2)
    with pytest.raises(errors.Internal, match="'weights' is truncated"):
        await store.get_file("weights", tmp_path / "weights")
    assert not (tmp_path / "weights").exists()


async def test_kv_watch_survives_broker_restart(tmp_path: Path) -> None:
    first = NatsServer(store_dir=tmp_path / "nats")
    await first.start()
    port = int(first.client_url.rsplit(":", 1)[1])
    second = NatsServer(store_dir=tmp_path / "nats", port=port)
    client = await connect(first.client_url, name="watcher")
    updates: asyncio.Queue[tuple[str, dict | None]] = asyncio.Queue()

    async def watch(config: FleetConfig) -> None:
        async for item in config.watch("policy.>", check_interval=0.1):
            updates.put_nowait(item)

    task = None
    try:
        config = await FleetConfig.open(client)
        await config.put("policy.default", {"n": 1})
        task = asyncio.create_task(watch(config))
        assert await asyncio.wait_for(updates.get(), BOUND_S) == ("policy.default", {"n": 1})
        await first.shutdown()
        await second.start()
        # The restart took the watch's consumer with it: once the watcher has reconnected
        # and the stream has a consumer again, the watch was remade (it has yielded the
        # value it found, {"n": 1}, or suppressed it as seen).
        js = client.jetstream()

        async def watch_remade() -> bool:
            if client.stats["reconnects"] < 1:
                return False
            info = await js.stream_info(f"KV_{subjects.CONFIG_BUCKET}")
            return info.state.consumer_count == 1

        await eventually(watch_remade, "the watch remade after the restart")
        writer = await connect(second.client_url, name="writer")
        try:
            written = await FleetConfig.open(writer)
            await written.put("policy.default", {"n": 2})
            assert await asyncio.wait_for(updates.get(), BOUND_S) == ("policy.default", {"n": 2})
            # The next update is the next value: the remade watch repeated nothing.
            await written.put("policy.default", {"n": 3})
            assert await asyncio.wait_for(updates.get(), BOUND_S) == ("policy.default", {"n": 3})
        finally:
            await writer.close()
    finally:
        if task is not None:
            task.cancel()
        await client.close()
        await second.shutdown()
        await first.shutdown()
