"""Model-set manifests: file hashes, runtime versions, writing and verifying.

Torch-free (the edge verifies what it pulled). The manifest's `files` table maps every file of
the set (relative POSIX path, manifest.json itself excluded) to its size and sha256; `verify`
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
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from broker.errors import Internal
from models.registry import MANIFEST_FORMAT, MANIFEST_NAME, ModelSet

logger = logging.getLogger(__name__)

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


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """`{relative path: {"size", "sha256"}}` of every regular file under `root` but the manifest."""
    table: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or (path.name == MANIFEST_NAME and path.parent == root):
            continue
        rel = path.relative_to(root).as_posix()
        table[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
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


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the `files` table and format to `manifest` and write `root/manifest.json` atomically.

    Returns:
        The manifest as written.
    """
    manifest = {**manifest, "format": MANIFEST_FORMAT, "files": file_table(root)}
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=root)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, root / MANIFEST_NAME)
    return manifest


def check_files(root: Path, files: dict[str, dict[str, Any]], *, label: str) -> list[str]:
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
        if size != expected.get("size"):
            problems.append(
                f"{label}: file {rel} is {size} bytes, the manifest says {expected.get('size')} "
                "(truncated or replaced)"
            )
            continue
        if sha256_file(path) != expected.get("sha256"):
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
    files = model_set.manifest.get("files")
    if not isinstance(files, dict) or not files:
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
        The section (its `perplexity_threshold` a positive float, or None when the build
        skipped calibration), or None when there is no usable section.
    """
    path = Path(edge_dir).parent / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    builds = data.get("edge_builds")
    names = (
        {b.get("dir") for b in builds.values() if isinstance(b, dict)}
        if isinstance(builds, dict)
        else set()
    )
    if Path(edge_dir).name not in names:
        return None
    routing = data.get("routing")
    if not isinstance(routing, dict):
        return None
    threshold = routing.get("perplexity_threshold")
    if threshold is not None and not (
        isinstance(threshold, int | float) and math.isfinite(threshold) and threshold > 0
    ):
        logger.warning("%s: ignoring invalid routing.perplexity_threshold %r", path, threshold)
        routing = {**routing, "perplexity_threshold": None}
    return routing
