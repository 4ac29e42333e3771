"""Steps every model-set build shares: the version check, staging, edge builds, installing.

A build (models.lab.build for the lab profiles, models.lab.build_pretrained for pretrained models)
writes everything into a staging folder next to the final one (`staging_folder`, removed on any
failure), writes the manifest last and renames the folder into place (`install`), so a runtime
never sees a half-built model set.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from broker.errors import BadRequest
from models import manifest, registry
from models.lab import edge_build, edge_repack
from models.manifest_schema import EdgeBuild, Manifest, Timings
from models.registry import ModelSet

logger = logging.getLogger(__name__)


class Stopwatch:
    """Seconds each build step took, for the manifest's `timings`."""

    def __init__(self) -> None:
        self.started = self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Record the time since the previous lap (or reset) as step `name`."""
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 1)
        self._last = now

    def reset(self) -> None:
        """Start the next lap now, leaving the time since the previous one unrecorded."""
        self._last = time.perf_counter()

    def timings(self) -> Timings:
        """Every lap, and `total_s` since the stopwatch was made."""
        total = round(time.perf_counter() - self.started, 1)
        return Timings.model_validate({**self.laps, "total_s": total})


def refuse_installed(version: str, home: Path | None, force: bool) -> None:
    """Refuse to build a version that is installed already, unless `force` replaces it.

    Raises:
        BadRequest: it is installed and `force` is False.
    """
    final = registry.models_home(home) / version
    if final.exists() and not force:
        raise BadRequest(
            f"model set {version!r} is installed already at {final}; pass --force to replace it",
            param="version",
        )


def prepare_torch(threads: int, progress: bool) -> None:
    """Set torch's thread count; silence transformers' progress bars when `progress` is off."""
    torch.set_num_threads(threads)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@contextmanager
def staging_folder(version: str, home: Path | None) -> Iterator[Path]:
    """A fresh staging folder for `version`, removed when the block fails (Ctrl-C included).

    The block ends with `install`, which renames the folder into place.
    """
    staging = registry.staging_dir(version, home)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def install(staging: Path, model_manifest: Manifest, *, home: Path | None, force: bool) -> None:
    """Make the staged files world-readable, write the manifest last, rename into place.

    Raises:
        BadRequest: the version is installed already and `force` is False.
    """
    make_readable(staging)
    manifest.write_manifest(staging, model_manifest)
    registry.install_dir(staging, model_manifest.version, home, replace=force)


def activate(version: str, home: Path | None, *, set_current: bool) -> ModelSet:
    """The installed set `version`, made CURRENT when `set_current`."""
    if set_current:
        registry.set_current(version, home)
    return registry.resolve(version, home)


def agreement(edge_model: torch.nn.Module, folder: Path, tokens: list[int], threads: int) -> float:
    """Top-1 agreement of an ONNX build with torch under teacher forcing on `tokens`."""
    from models import ort_edge

    with torch.no_grad():
        logits = edge_model(input_ids=torch.tensor([tokens])).logits[0]  # (T, V)
    reference = logits.argmax(-1).tolist()
    predicted = ort_edge.teacher_forced_argmax(ort_edge.load_model(folder, threads), tokens)
    same = sum(int(a == b) for a, b in zip(reference, predicted, strict=True))
    return round(same / len(tokens), 4)


def build_edges(
    checkpoint: Path,
    staging: Path,
    precisions: tuple[str, ...],
    *,
    reference: torch.nn.Module,
    probe: list[int],
    threads: int,
    clock: Stopwatch,
    gguf: Path | None = None,
) -> dict[str, EdgeBuild]:
    """Build `staging/edge-<precision>` from the edge checkpoint for each precision.

    Args:
        checkpoint: the edge model's HF checkpoint folder.
        staging: the set's staging folder.
        precisions: "int4", "int8" and/or "fp32".
        reference: the edge model in torch fp32, the agreement reference.
        probe: token ids the top-1 agreement is measured on.
        threads: intra-op threads of the ONNX runtime.
        clock: records `edge_<precision>_s` for each build.
        gguf: the GGUF file `checkpoint` was imported from, if any: the int4 build then
            holds its blocks as they are (`models.lab.edge_repack`).

    Returns:
        The manifest's `edge_builds`, by precision.
    """
    builds: dict[str, EdgeBuild] = {}
    for precision in precisions:
        out = staging / f"edge-{precision}"
        edge_build.build_edge(checkpoint, out, precision)
        repacked: dict[str, Any] = {}
        if gguf is not None and precision == "int4":
            report = edge_repack.repack_edge(out, gguf, checkpoint)
            if report.exact:
                repacked = {"weights": "gguf_blocks", "gguf_types": report.types,
                            "requantized_nodes": report.kept}  # fmt: skip
        builds[precision] = EdgeBuild(
            dir=out.name,
            top1_agreement_teacher_forced=agreement(reference, out, probe, threads),
            bytes=sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            **repacked,
        )
        clock.lap(f"edge_{precision}_s")
    return builds


def make_readable(root: Path) -> None:
    """Folders 0755, files 0644 (temp folders and some writers default to owner-only)."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
