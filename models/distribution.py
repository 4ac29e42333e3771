"""Publish model sets to the NATS object store `hg_models` and pull them back.

Torch-free (an edge pulls its model). Objects are named `<version>/<relative path>`; the
manifest is uploaded last as `<version>/manifest.json`, so a manifest in the store means every
file it lists is there. A pull downloads into a staging folder, checks each file's sha256
against the manifest (the store checks its own digest too), re-verifies the whole set and only
then renames it into place: a runtime never sees a half-written model set.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path, PurePosixPath

from nats.aio.client import Client

from broker.errors import BadRequest, Internal, NotFound
from broker.store import ArtifactStore
from models import registry
from models.manifest import MANIFEST_NAME, parse_manifest_json, verify
from models.manifest_schema import Manifest
from models.registry import ModelSet

logger = logging.getLogger(__name__)


def object_name(version: str, rel: str) -> str:
    """Object-store name of one file of a model set."""
    return f"{version}/{rel}"


def _safe_rel(rel: str) -> str:
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts or rel != path.as_posix():
        raise Internal(f"manifest lists an unsafe file path {rel!r}; refusing to install it")
    return rel


async def publish(nc: Client, model_set: ModelSet) -> int:
    """Upload every file of `model_set`, then its manifest. Returns the number of files.

    The set is verified first, so a corrupted local copy is never published.

    Raises:
        IntegrityError: the local files do not match the manifest.
        Internal: the store recorded a different sha256 than the manifest.
    """
    verify(model_set)
    store = await ArtifactStore.open(nc)
    files = model_set.manifest.files
    for rel, entry in sorted(files.items()):
        sha = await store.put_file(
            object_name(model_set.version, rel),
            model_set.root / rel,
            meta={"version": model_set.version, "path": rel},
        )
        if sha != entry.sha256:
            raise Internal(f"model set {model_set.version}: file {rel} changed while publishing")
    await store.put_file(
        object_name(model_set.version, MANIFEST_NAME),
        model_set.root / MANIFEST_NAME,
        meta={"version": model_set.version, "kind": "manifest"},
    )
    logger.info("published model set %s (%d files)", model_set.version, len(files))
    return len(files)


async def published_versions(nc: Client) -> list[str]:
    """Versions whose manifest is in the store (complete uploads only), sorted."""
    store = await ArtifactStore.open(nc)
    suffix = f"/{MANIFEST_NAME}"
    return sorted(
        o["name"][: -len(suffix)] for o in await store.list() if o["name"].endswith(suffix)
    )


async def pull(
    nc: Client, version: str, *, home: Path | None = None, force: bool = False
) -> ModelSet:
    """Download model set `version`, verify every file and install it atomically.

    Raises:
        NotFound: the store has no such version.
        BadRequest: the version is installed already (and `force` is False).
        ManifestError: the published manifest is not valid (the message names the field).
        Internal / IntegrityError: a file fails verification (the message names it); nothing
            is installed.
    """
    registry.check_version(version)
    final = registry.models_home(home) / version
    if final.exists() and not force:
        raise BadRequest(
            f"model set {version!r} is installed already at {final}; pass --force to replace it",
            param="version",
        )
    store = await ArtifactStore.open(nc)
    raw, manifest = await _published_manifest(nc, store, version)
    staging = registry.staging_dir(version, home)
    try:
        for rel, entry in sorted(manifest.files.items()):
            dest = staging / _safe_rel(rel)
            sha = await store.get_file(object_name(version, rel), dest)
            if sha != entry.sha256:
                raise Internal(
                    f"model set {version}: file {rel} has sha256 {sha}, the manifest says "
                    f"{entry.sha256}"
                )
        # The manifest exactly as published (an older format stays as it was written).
        (staging / MANIFEST_NAME).write_bytes(raw)
        verify(ModelSet(root=staging, version=version, manifest=manifest))
        for path in [staging, *staging.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        registry.install_dir(staging, version, home, replace=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("pulled model set %s (%d files)", version, len(manifest.files))
    return registry.resolve(version, home)


async def _published_manifest(
    nc: Client, store: ArtifactStore, version: str
) -> tuple[bytes, Manifest]:
    """The published manifest of `version`: its bytes and the validated manifest.

    Raises:
        NotFound: the store has no such version.
        ManifestError (an Internal): the manifest is not valid.
        Internal: it names another version.
    """
    name = object_name(version, MANIFEST_NAME)
    try:
        raw = await store.get_bytes(name)
    except NotFound:
        available = ", ".join(await published_versions(nc)) or "none"
        raise NotFound(
            f"model set {version!r} is not published in hg_models (published: {available})"
        ) from None
    manifest = parse_manifest_json(raw, source=f"hg_models object {name}")
    if manifest.version != version:
        raise Internal(f"published manifest of {version!r} names another version")
    return raw, manifest


async def _connect(nats_url: str | None, context: str | None) -> Client:
    from broker.bus import connect_settings
    from broker.settings import BusSettings

    settings = BusSettings.resolve(url=nats_url, context=context)
    return await connect_settings(settings, name="hybridgen-models")


async def publish_cli(
    model_set: ModelSet, *, nats_url: str | None = None, context: str | None = None
) -> int:
    """`hybridgen models publish`: connect (flags, HG_NATS_*, the context), publish, close."""
    nc = await _connect(nats_url, context)
    try:
        return await publish(nc, model_set)
    finally:
        await nc.close()


async def pull_cli(
    version: str,
    *,
    home: Path | None = None,
    nats_url: str | None = None,
    context: str | None = None,
    force: bool = False,
) -> ModelSet:
    """`hybridgen models pull`: connect (flags, HG_NATS_*, the context), pull, close."""
    nc = await _connect(nats_url, context)
    try:
        return await pull(nc, version, home=home, force=force)
    finally:
        await nc.close()
