"""Model-set manifests on disk: reading, writing, file hashes and verification.

Torch-free (the edge verifies what it pulled). `manifest.json` is read and written here only,
as the typed `Manifest` of `models.manifest_schema`. Its `files` table maps every file of the
set (relative POSIX path, manifest.json itself excluded) to its size and sha256; `verify`
re-reads every file and refuses a missing, truncated, altered or unexpected one by name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.errors import Internal
from models.manifest_schema import (
    MANIFEST_FORMAT,
    FileEntry,
    Manifest,
    ManifestError,
    parse_manifest,
)

if TYPE_CHECKING:
    from models.registry import ModelSet

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
RUNTIME_PACKAGES = (
    "hybridgen",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "onnx",
    "onnx-ir",
    "onnxruntime",
    "onnxruntime-genai",
)
_CHUNK = 1 << 20


class IntegrityError(Internal):
    """A model set's files do not match its manifest. `problems` lists each file at fault."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_table(root: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every regular file under `root` but the manifest, by relative path."""
    table: dict[str, FileEntry] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or (path.name == MANIFEST_NAME and path.parent == root):
            continue
        rel = path.relative_to(root).as_posix()
        table[rel] = FileEntry(size=path.stat().st_size, sha256=sha256_file(path))
    return table


def runtime_versions() -> dict[str, str]:
    """Versions of Python and of the packages a model set is built with (absent ones omitted)."""
    versions = {"python": platform.python_version()}
    for package in RUNTIME_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def now_iso() -> str:
    """The current UTC time, ISO-8601 with seconds."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def parse_manifest_json(raw: bytes | str, *, source: str) -> Manifest:
    """Parse and validate the text of a `manifest.json`.

    Args:
        raw: the file's bytes or text.
        source: where it came from, for error messages (a path, or the object-store name).

    Raises:
        ManifestError: not JSON, or not a valid manifest (the message names each field).
    """
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(source, [f"not valid JSON: {exc}"], []) from None
    return parse_manifest(data, source=source)


def read_manifest(path: Path) -> Manifest:
    """Read and validate the manifest file at `path` (older formats are upgraded).

    Raises:
        FileNotFoundError: no file there (other OSErrors pass through too).
        ManifestError: the file is not a valid manifest; the message names the file and field.
    """
    return parse_manifest_json(path.read_bytes(), source=str(path))


def write_manifest(root: Path, manifest: Manifest) -> Manifest:
    """Write `root/manifest.json` atomically, with the current format and the `files` table.

    The result is validated the way a reader will validate it before it is written.

    Returns:
        The manifest as written.
    """
    data = {**manifest.to_json(), "format": MANIFEST_FORMAT}
    data["files"] = {rel: entry.to_json() for rel, entry in file_table(root).items()}
    written = parse_manifest(data, source=str(root / MANIFEST_NAME))
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=root)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(written.to_json(), handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, root / MANIFEST_NAME)
    return written


def check_files(root: Path, files: Mapping[str, FileEntry], *, label: str) -> list[str]:
    """Compare the files under `root` with a manifest's `files` table.

    Returns:
        One line per problem, each naming the file (empty when everything matches).
    """
    problems = []
    for rel, expected in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{label}: file {rel} is missing")
            continue
        size = path.stat().st_size
        if size != expected.size:
            problems.append(
                f"{label}: file {rel} is {size} bytes, the manifest says {expected.size} "
                "(truncated or replaced)"
            )
            continue
        if sha256_file(path) != expected.sha256:
            problems.append(f"{label}: file {rel} has the wrong sha256 (altered or corrupted)")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST_NAME and rel not in files:
            problems.append(f"{label}: file {rel} is not in the manifest (unexpected file)")
    return problems


def verify(model_set: ModelSet) -> None:
    """Re-hash every file of `model_set` against its manifest.

    Raises:
        IntegrityError: a file is missing, truncated, altered or unexpected; the message names
            every such file.
    """
    files = model_set.manifest.files
    if not files:
        raise IntegrityError(
            f"model set {model_set.version}: manifest has no file table",
            [f"model set {model_set.version}: manifest.json has no 'files'"],
        )
    problems = check_files(model_set.root, files, label=f"model set {model_set.version}")
    if problems:
        raise IntegrityError("; ".join(problems), problems)


def routing_calibration(edge_dir: Path) -> dict[str, Any] | None:
    """The `routing` section (calibrated perplexity threshold) for an edge build folder.

    Found when `edge_dir` is one of the edge builds of a model set (its manifest.json one level
    up lists it under `edge_builds`); a folder outside a model set has none.

    Returns:
        The section as plain JSON data, as the file holds it (its `perplexity_threshold` a
        positive float, or None when the build skipped calibration), or None when there is no
        usable section (an invalid manifest is logged).
    """
    path = Path(edge_dir).parent / MANIFEST_NAME
    try:
        manifest = read_manifest(path)
    except OSError:
        return None
    except ManifestError as exc:
        logger.warning("no routing calibration for %s: %s", edge_dir, exc.message)
        return None
    if Path(edge_dir).name not in {build.dir for build in manifest.edge_builds.values()}:
        return None
    if manifest.routing is None:
        return None
    routing = manifest.routing.to_json()
    threshold = routing.get("perplexity_threshold")
    if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
        logger.warning("%s: ignoring invalid routing.perplexity_threshold %r", path, threshold)
        routing["perplexity_threshold"] = None
    return routing
