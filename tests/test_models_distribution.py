"""Publish a model set to a real nats-server's object store and pull it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client

from broker.errors import BadRequest, Internal, NotFound
from broker.store import ArtifactStore
from models import distribution, registry
from models.manifest import verify
from models.manifest_schema import ManifestError
from models.registry import ModelSet
from tests.fixtures_models import copy_model_set


async def test_publish_pull_round_trip(tiny_models: ModelSet, nc: Client, tmp_path: Path):
    count = await distribution.publish(nc, tiny_models)
    assert count == len(tiny_models.manifest.files)
    assert await distribution.published_versions(nc) == [tiny_models.version]

    home = tmp_path / "edge-home"
    pulled = await distribution.pull(nc, tiny_models.version, home=home)
    assert pulled.version == tiny_models.version
    assert pulled.manifest == tiny_models.manifest
    verify(pulled)
    assert registry.list_model_sets(home) == [pulled]
    assert not [p for p in registry.models_home(home).iterdir() if p.name.startswith(".")]
    with pytest.raises(BadRequest, match="installed already"):
        await distribution.pull(nc, tiny_models.version, home=home)
    with pytest.raises(NotFound, match="published: tiny-test"):
        await distribution.pull(nc, "nope", home=home)


async def test_pull_refuses_tampered_artifact(tiny_models: ModelSet, nc: Client, tmp_path: Path):
    await distribution.publish(nc, tiny_models)
    store = await ArtifactStore.open(nc)
    await store.put_bytes(f"{tiny_models.version}/edge-int4/model.onnx.data", b"not the model")
    home = tmp_path / "edge-home"
    with pytest.raises(Internal, match=r"edge-int4/model\.onnx\.data"):
        await distribution.pull(nc, tiny_models.version, home=home)
    # Nothing half-written is visible: no model set, no staging folder left behind.
    assert registry.list_model_sets(home) == []
    assert list(registry.models_home(home).iterdir()) == []


async def test_publish_refuses_corrupted_local_set(
    tiny_models: ModelSet, nc: Client, tmp_path: Path
) -> None:
    copy = copy_model_set(tiny_models, tmp_path)
    (copy.cloud_dir / "config.json").write_text("{}")
    with pytest.raises(Internal, match=r"cloud/config\.json"):
        await distribution.publish(nc, copy)
    assert await distribution.published_versions(nc) == []


def _as_format_1(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest` as builds before format 2 wrote it (no routing mode, no checkpoint_dir)."""
    old = json.loads(json.dumps(manifest))
    old["format"] = 1
    del old["routing"]["mode"]
    for entry in old["models"].values():
        del entry["checkpoint_dir"]
    return old


async def test_format_1_set_publishes_and_pulls(
    tiny_models: ModelSet, nc: Client, tmp_path: Path
) -> None:
    copy = copy_model_set(tiny_models, tmp_path / "old-home")
    old_text = json.dumps(_as_format_1(tiny_models.manifest.to_json()), indent=2)
    (copy.root / "manifest.json").write_text(old_text)
    copy = registry.resolve(copy.version, tmp_path / "old-home")
    assert copy.manifest.format == 1
    assert await distribution.publish(nc, copy) == len(tiny_models.manifest.files)
    pulled = await distribution.pull(nc, copy.version, home=tmp_path / "edge-home")
    # Installed exactly as published, and read as the same set.
    assert (pulled.root / "manifest.json").read_text() == old_text
    assert pulled.manifest.routing == tiny_models.manifest.routing
    assert pulled.edge_checkpoint_dir == pulled.root / "edge"
    verify(pulled)


async def test_pull_refuses_mistyped_published_manifest(
    tiny_models: ModelSet, nc: Client, tmp_path: Path
) -> None:
    await distribution.publish(nc, tiny_models)
    bad = tiny_models.manifest.to_json()
    bad["files"]["cloud/config.json"]["size"] = "big"
    store = await ArtifactStore.open(nc)
    await store.put_bytes(f"{tiny_models.version}/manifest.json", json.dumps(bad).encode())
    home = tmp_path / "edge-home"
    with pytest.raises(ManifestError, match=r"files\.cloud/config\.json\.size") as info:
        await distribution.pull(nc, tiny_models.version, home=home)
    assert "hg_models" in info.value.message
    assert not registry.models_home(home).exists() or not list(registry.models_home(home).iterdir())
