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


async def test_kv_get_put_and_watch(nc: Client) -> None:
    config = await FleetConfig.open(nc)
    assert await config.get(subjects.POLICY_DEFAULT_KEY) is None
    await config.put(subjects.POLICY_DEFAULT_KEY, {"threshold": 1.0})
    assert await config.get(subjects.POLICY_DEFAULT_KEY) == {"threshold": 1.0}

    seen: list[tuple[str, dict | None]] = []
    got_first = asyncio.Event()
    got_three = asyncio.Event()

    async def watch() -> None:
        async for key, value in config.watch("policy.>"):
            seen.append((key, value))
            got_first.set()
            if len(seen) == 3:
                got_three.set()

    task = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(got_first.wait(), 3)  # the current value comes first
        node_key = subjects.policy_key("edge-1")
        await config.put(node_key, {"threshold": 2.5})
        await config.delete(node_key)
        await asyncio.wait_for(got_three.wait(), 3)
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
    with pytest.raises(errors.BadRequest):
        await config.put("bad key with spaces", {})


async def test_kv_non_json_value_is_a_coded_error(nc: Client) -> None:
    config = await FleetConfig.open(nc)
    await config.kv.put("raw", b"not json")
    with pytest.raises(errors.BadRequest, match="raw"):
        await config.get("raw")


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
    big_file, expected = big_file
    sha = await store.put_file("v1/edge-int4/model.bin", big_file, meta={"version": "v1"})
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
        assert await asyncio.wait_for(updates.get(), 3) == ("policy.default", {"n": 1})
        await first.shutdown()
        await second.start()
        writer = await connect(second.client_url, name="writer")
        try:
            await (await FleetConfig.open(writer)).put("policy.default", {"n": 2})
            assert await asyncio.wait_for(updates.get(), 10) == ("policy.default", {"n": 2})
        finally:
            await writer.close()
        assert updates.empty()  # the remade watch did not repeat {"n": 1}
    finally:
        if task is not None:
            task.cancel()
        await client.close()
        await second.shutdown()
        await first.shutdown()
