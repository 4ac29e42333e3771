"""Fleet configuration (JetStream KV `hg_config`) and model artifacts (object store `hg_models`).

Config values are JSON objects, so operators can read them with `nats kv get hg_config KEY`.

Artifacts are written with nats-py's object store (`put`), whose digest is SHA-256. They
are read back through a pull consumer on the object's chunk subject rather than
`ObjectStore.get()`, whose push consumer stalls at every flow-control point; the pull path
also checks the chunk count and the SHA-256 itself and writes to a temporary file that is
renamed into place only when both match.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from broker import subjects
from broker.errors import BadRequest, Internal, NotFound, Unavailable
from broker.settings import BusSettings

BucketT = TypeVar("BucketT", KeyValue, ObjectStore)

log = logging.getLogger(__name__)

_KV_DELETES = ("DEL", "PURGE")
_META_HEADER = "Hg-Meta"
_FETCH_BATCH = 64


def jetstream(nc: Client, domain: str | None = None) -> JetStreamContext:
    """A JetStream context; `domain` defaults to the bus settings' `js_domain`
    (`HG_NATS_JS_DOMAIN`; unset: the local one).

    Clients of a leaf node reach the hub's JetStream through the hub's domain
    (`hybridgen broker config --role hub` gives the hub the domain `hub`).
    """
    if domain is None:
        domain = BusSettings().js_domain
    return nc.jetstream(domain=domain) if domain else nc.jetstream()


def _loads(key: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"config key {key!r} does not hold JSON: {exc}", param=key) from None
    if not isinstance(value, dict):
        raise BadRequest(f"config key {key!r} holds a {type(value).__name__}, not an object")
    return value


async def _bind(
    existing: Callable[[], Awaitable[BucketT]], create: Callable[[], Awaitable[BucketT]]
) -> BucketT:
    """Bind a JetStream bucket, creating it when missing; JetStream trouble is `Unavailable`."""
    try:
        try:
            return await existing()
        except nats.js.errors.BucketNotFoundError:
            return await create()
    except (
        nats.js.errors.ServiceUnavailableError,
        nats.errors.NoRespondersError,
        nats.js.errors.NoStreamResponseError,
    ) as exc:
        raise Unavailable(f"JetStream is not available: {exc!r}") from None
    except TimeoutError:
        # A denied JetStream API request is dropped by the server and times out.
        raise Unavailable(
            "JetStream did not answer: is the bucket missing and this user not allowed "
            "to create it? (start the broker with `hybridgen up`, or open it once as an "
            "operator)"
        ) from None


class FleetConfig:
    """The fleet's configuration in the KV bucket `hg_config` (routing policy, ...).

    Open it with `await FleetConfig.open(nc)`; the bucket is created when missing.
    """

    def __init__(self, nc: Client, kv: KeyValue) -> None:
        self.nc = nc
        self.kv = kv

    @classmethod
    async def open(cls, nc: Client, *, history: int = 5, domain: str | None = None) -> FleetConfig:
        """Bind to `hg_config`, creating it (with `history` revisions per key) if needed.

        Args:
            nc: a connected client.
            history: revisions kept per key when the bucket is created.
            domain: JetStream domain (see `jetstream()`).

        Raises:
            Unavailable: JetStream is not enabled or not reachable.
        """
        js = jetstream(nc, domain)
        kv = await _bind(
            lambda: js.key_value(subjects.CONFIG_BUCKET),
            lambda: js.create_key_value(bucket=subjects.CONFIG_BUCKET, history=history),
        )
        return cls(nc, kv)

    async def get(self, key: str) -> dict[str, Any] | None:
        """The value of `key`, or `None` when it is absent or deleted."""
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.js.errors.InvalidKeyError:
            raise BadRequest(f"invalid config key {key!r}", param="key") from None
        if entry.value is None:
            return None
        return _loads(key, entry.value)

    async def put(self, key: str, value: dict[str, Any]) -> int:
        """Store `value` (a JSON object) under `key`; the new revision."""
        try:
            raw = json.dumps(value, sort_keys=True).encode()
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"config value for {key!r} is not JSON: {exc}") from None
        try:
            return await self.kv.put(key, raw)
        except nats.js.errors.InvalidKeyError:
            raise BadRequest(f"invalid config key {key!r}", param="key") from None

    async def delete(self, key: str) -> None:
        """Delete `key` (watchers see `None`)."""
        await self.kv.delete(key)

    async def watch(
        self, key_or_pattern: str = ">", *, check_interval: float = 1.0
    ) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
        """Yield `(key, value)` for the current values, then for every change.

        `value` is `None` when the key was deleted. A value that is not a JSON object is
        logged and skipped. Stop by leaving the `async for` (or closing the generator).

        The watch survives a broker restart: nats-py's watcher goes silent when its
        consumer disappears with the server, so after every reconnect (checked each
        `check_interval` seconds) the watch is made again; values already yielded are not
        repeated.
        """
        last: dict[str, tuple[int, bytes | None]] = {}
        while True:
            reconnects = self.nc.stats["reconnects"]
            try:
                watcher = await self.kv.watch(key_or_pattern)
            except (nats.errors.Error, TimeoutError) as exc:
                log.info("config watch on %r not (re)made yet: %s", key_or_pattern, exc)
                await asyncio.sleep(check_interval)
                continue
            try:
                while True:
                    try:
                        entry = await watcher.updates(timeout=check_interval)
                    except nats.errors.TimeoutError:
                        if self.nc.stats["reconnects"] != reconnects:
                            log.info("reconnected: remaking the config watch on %r", key_or_pattern)
                            break
                        continue
                    if entry is None:  # end of the initial values
                        continue
                    if not isinstance(entry, KeyValue.Entry):  # the watcher was stopped
                        return
                    raw = None if entry.operation in _KV_DELETES else entry.value
                    seen = (entry.revision or 0, raw)
                    if last.get(entry.key) == seen:
                        continue
                    last[entry.key] = seen
                    if raw is None:
                        yield entry.key, None
                        continue
                    try:
                        value = _loads(entry.key, raw)
                    except BadRequest as exc:
                        log.warning("ignoring config update: %s", exc.message)
                        continue
                    yield entry.key, value
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()


def _info_sha256(info: api.ObjectInfo) -> str:
    """Hex SHA-256 the store recorded for an object (its digest is `SHA-256=<b64url>`)."""
    digest = (info.digest or "").split("=", 1)[-1]
    try:
        return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    except ValueError:
        return ""


def _header(info: api.ObjectInfo, name: str) -> str | None:
    value = (info.headers or {}).get(name)
    if isinstance(value, list):
        return str(value[0]) if value else None
    return None if value is None else str(value)


def describe(info: api.ObjectInfo) -> dict[str, Any]:
    """A plain dict of an object's info: name, size, chunks, sha256, mtime, meta."""
    meta_raw = _header(info, _META_HEADER)
    meta: dict[str, Any] = {}
    if meta_raw:
        with contextlib.suppress(ValueError):
            meta = json.loads(meta_raw)
    return {
        "name": info.name,
        "size": info.size or 0,
        "chunks": info.chunks or 0,
        "sha256": _info_sha256(info),
        "mtime": info.mtime,
        "meta": meta,
    }


class ArtifactStore:
    """Model artifacts in the object store `hg_models`.

    Open it with `await ArtifactStore.open(nc)`; the bucket is created when missing.
    """

    def __init__(self, js: JetStreamContext, obs: ObjectStore) -> None:
        self.js = js
        self.obs = obs
        self.bucket = subjects.MODELS_BUCKET
        self.stream = f"OBJ_{self.bucket}"

    @classmethod
    async def open(cls, nc: Client, *, domain: str | None = None) -> ArtifactStore:
        """Bind to `hg_models`, creating it if needed.

        Args:
            nc: a connected client.
            domain: JetStream domain (see `jetstream()`).

        Raises:
            Unavailable: JetStream is not enabled or not reachable.
        """
        js = jetstream(nc, domain)
        obs = await _bind(
            lambda: js.object_store(subjects.MODELS_BUCKET),
            lambda: js.create_object_store(subjects.MODELS_BUCKET),
        )
        return cls(js, obs)

    async def _put(self, name: str, data: Any, meta: dict[str, Any] | None) -> str:
        headers = {_META_HEADER: [json.dumps(meta or {}, sort_keys=True)]}
        info = await self.obs.put(name, data, meta=api.ObjectMeta(name=name, headers=headers))
        sha = _info_sha256(info)
        log.info("stored artifact %s (%s bytes, sha256 %s)", name, info.size, sha[:12])
        return sha

    async def put_file(self, name: str, path: Path, *, meta: dict[str, Any] | None = None) -> str:
        """Store a file under `name`; its SHA-256 (hex)."""
        with open(path, "rb") as fh:  # noqa: ASYNC230 - nats-py reads it in an executor
            return await self._put(name, fh, meta)

    async def put_bytes(self, name: str, data: bytes, *, meta: dict[str, Any] | None = None) -> str:
        """Store bytes under `name`; their SHA-256 (hex)."""
        return await self._put(name, data, meta)

    async def info(self, name: str) -> dict[str, Any]:
        """`describe()` of one object.

        Raises:
            NotFound: no such object.
        """
        return describe(await self._info(name))

    async def _info(self, name: str) -> api.ObjectInfo:
        try:
            return await self.obs.get_info(name)
        except nats.js.errors.ObjectNotFoundError:
            raise NotFound(f"artifact {name!r} not found in {self.bucket}") from None

    async def _pull(self, name: str, write: Callable[[bytes], object]) -> str:
        """Stream an object's chunks to `write` through a pull consumer; its verified SHA-256."""
        info = await self._info(name)
        expected = _info_sha256(info)
        if not info.size:
            if expected and expected != hashlib.sha256(b"").hexdigest():
                raise Internal(f"artifact {name!r}: empty but its digest is not")
            return hashlib.sha256(b"").hexdigest()
        chunk_subject = f"$O.{self.bucket}.C.{info.nuid}"
        psub = await self.js.pull_subscribe(
            chunk_subject,
            stream=self.stream,
            config=api.ConsumerConfig(
                ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.ALL,
                inactive_threshold=30.0,
            ),
        )
        digest = hashlib.sha256()
        received = size = 0
        try:
            pending = (await psub.consumer_info()).num_pending or 0
            if pending != info.chunks:
                raise Internal(
                    f"artifact {name!r} is truncated or tampered: the store holds {pending} "
                    f"chunks, its metadata says {info.chunks}"
                )
            while received < pending:
                try:
                    batch = await psub.fetch(min(_FETCH_BATCH, pending - received), timeout=10)
                except nats.errors.TimeoutError:
                    raise Internal(
                        f"artifact {name!r}: chunks stopped arriving after {received} of {pending}"
                    ) from None
                for msg in batch:
                    digest.update(msg.data)
                    write(msg.data)
                    size += len(msg.data)
                received += len(batch)
        finally:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
        sha = digest.hexdigest()
        if size != info.size or sha != expected:
            raise Internal(
                f"artifact {name!r} failed verification: got {size} bytes with sha256 {sha}, "
                f"expected {info.size} bytes with sha256 {expected}"
            )
        return sha

    async def get_file(self, name: str, dest: Path) -> str:
        """Download `name` to `dest` (atomically, only once verified); its SHA-256 (hex).

        Raises:
            NotFound: no such object.
            Internal: the content does not match its recorded size or SHA-256 (names the
                object); `dest` is left untouched.
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                sha = await self._pull(name, fh.write)
            os.replace(tmp_name, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        return sha

    async def get_bytes(self, name: str) -> bytes:
        """The content of `name`, verified."""
        parts: list[bytes] = []
        await self._pull(name, parts.append)
        return b"".join(parts)

    async def list(self) -> list[dict[str, Any]]:
        """`describe()` of every object (deleted ones left out)."""
        try:
            infos = await self.obs.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return []
        return [describe(info) for info in infos if not info.deleted]

    async def delete(self, name: str) -> None:
        """Delete `name`.

        Raises:
            NotFound: no such object.
        """
        try:
            await self.obs.delete(name)
        except nats.js.errors.ObjectNotFoundError:
            raise NotFound(f"artifact {name!r} not found in {self.bucket}") from None
