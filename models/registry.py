"""Installed model sets: where they live, which is current, and what their manifest says.

Torch-free on purpose: the edge imports this module (no torch, transformers or onnx here, not
even indirectly). Layout under `$HG_HOME/models`::

    <version>/manifest.json
             /NOTICE.md      where the weights come from and under which licence
             /cloud/         HF checkpoint of the cloud model, with its tokenizer and template
             /edge/          HF checkpoint of the edge model (source of the ONNX builds);
                             absent when both ends run the same weights (`cloud/` is it)
             /edge-int4/     onnxruntime-genai folder (also edge-int8/, edge-fp32/ when built),
                             with the edge model's own tokenizer and chat template
             /tokenizer/     lab profiles only: the tokenizer both trained models share
    CURRENT                  text file: the default version

A model set is only ever made visible by renaming a finished temporary folder into place
(see `install_dir`), so a runtime never sees a half-written one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from broker.errors import BadRequest, Internal, NotFound
from broker.settings import hg_home
from models.manifest import MANIFEST_NAME, read_manifest
from models.manifest_schema import CLOUD_MODEL as CLOUD_MODEL  # the model names, for callers
from models.manifest_schema import EDGE_MODEL as EDGE_MODEL
from models.manifest_schema import Manifest, ModelEntry

logger = logging.getLogger(__name__)

CURRENT_NAME = "CURRENT"
PRECISIONS = ("int4", "int8", "fp32")
#: A version is one path component of letters, digits, dot, dash and underscore.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: no "\n"
_BUILD_HINT = "run `hybridgen models build` (or `hybridgen models pull VERSION`)"


def check_version(version: str) -> str:
    """Return `version` when it is a valid model-set version, else raise BadRequest."""
    if not VERSION_PATTERN.fullmatch(version) or version in (".", ".."):
        raise BadRequest(
            f"model-set version {version!r} is invalid: use 1-64 letters, digits, '.', '-' or '_'",
            param="version",
        )
    return version


@dataclass(frozen=True)
class ModelSet:
    """One installed model set: a folder holding both models, the tokenizer and a manifest.

    Attributes:
        root: the model set's folder (`$HG_HOME/models/<version>`).
        version: the folder name, equal to `manifest.version`.
        manifest: the validated `manifest.json`.
    """

    root: Path
    version: str
    manifest: Manifest

    def __hash__(self) -> int:  # the manifest is not hashable; root + version identify
        return hash((self.root, self.version))

    @property
    def cloud_dir(self) -> Path:
        """HF checkpoint of the cloud model (`AutoModelForCausalLM.from_pretrained`)."""
        return self.root / "cloud"

    @property
    def tokenizer_dir(self) -> Path:
        """The shared transformers fast tokenizer (`tokenizer.json` loads with `tokenizers`)."""
        return self.root / "tokenizer"

    @property
    def edge_checkpoint_dir(self) -> Path:
        """HF checkpoint of the edge model (fp32), the source of the ONNX builds (`cloud/`
        when both ends run the same weights)."""
        return self.root / self.manifest.models.edge.checkpoint_dir

    def edge_dir(self, precision: str = "int4") -> Path:
        """The onnxruntime-genai folder of the edge model at `precision`.

        Raises:
            BadRequest: unknown precision.
            NotFound: this model set has no build at that precision.
        """
        if precision not in PRECISIONS:
            raise BadRequest(
                f"edge precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                param="precision",
            )
        path = self.root / f"edge-{precision}"
        if not (path / "genai_config.json").is_file():
            built = ", ".join(self.edge_precisions) or "none"
            raise NotFound(
                f"model set {self.version!r} has no {precision} edge build (built: {built}); "
                f"rebuild with `hybridgen models build --precision {precision}`"
            )
        return path

    @property
    def edge_precisions(self) -> list[str]:
        """Precisions of the edge builds present, in PRECISIONS order."""
        return [p for p in PRECISIONS if (self.root / f"edge-{p}" / "genai_config.json").is_file()]

    def model_info(self, name: str) -> ModelEntry:
        """The manifest's entry for model `name` (EDGE_MODEL or CLOUD_MODEL).

        Raises:
            Internal: another name.
        """
        try:
            return self.manifest.models.role(name)
        except KeyError:
            raise Internal(f"model set {self.version!r} has no model {name!r}") from None

    @property
    def edge_context_length(self) -> int:
        """Context window of the edge model in tokens (prompt + generated)."""
        return self.manifest.models.edge.context_length

    @property
    def cloud_context_length(self) -> int:
        """Context window of the cloud model in tokens (prompt + generated)."""
        return self.manifest.models.cloud.context_length

    @property
    def perplexity(self) -> dict[str, dict[str, float]]:
        """Held-out perplexity: `{model_name: {"overall", "in_domain", "out_of_domain"}}`."""
        return dict(self.manifest.metrics.perplexity)

    @property
    def created(self) -> str:
        """ISO-8601 creation time recorded in the manifest."""
        return self.manifest.created

    def is_current(self, home: Path | None = None) -> bool:
        """Whether CURRENT names this model set."""
        return current_version(home) == self.version


def models_home(home: Path | None = None) -> Path:
    """The folder holding model sets: `home / "models"`, `home` defaulting to `hg_home()`."""
    return (home if home is not None else hg_home()) / "models"


def load_manifest(root: Path) -> Manifest:
    """Read and validate `root/manifest.json` (older formats are upgraded).

    Raises:
        NotFound: no manifest there.
        ManifestError (an Internal): the manifest is not valid; the message names the file
            and each field at fault.
    """
    try:
        return read_manifest(root / MANIFEST_NAME)
    except FileNotFoundError:
        raise NotFound(f"no model set at {root} ({MANIFEST_NAME} missing); {_BUILD_HINT}") from None


def load_model_set(root: Path) -> ModelSet:
    """Open the model set in folder `root` (its manifest must exist)."""
    manifest = load_manifest(root)
    return ModelSet(root=root, version=root.name, manifest=manifest)


def current_version(home: Path | None = None) -> str | None:
    """The version CURRENT names, or None when there is no CURRENT file."""
    try:
        text = (models_home(home) / CURRENT_NAME).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def set_current(version: str, home: Path | None = None) -> None:
    """Make `version` (installed) the default, replacing CURRENT atomically."""
    check_version(version)
    base = models_home(home)
    if not (base / version / MANIFEST_NAME).is_file():
        raise NotFound(f"model set {version!r} is not installed under {base}; {_BUILD_HINT}")
    fd, tmp = tempfile.mkstemp(prefix=".CURRENT.", dir=base)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(version + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, base / CURRENT_NAME)


def list_model_sets(home: Path | None = None) -> list[ModelSet]:
    """Every installed model set (folders with a readable manifest), oldest first."""
    base = models_home(home)
    if not base.is_dir():
        return []
    sets = []
    for child in sorted(base.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        try:
            sets.append(load_model_set(child))
        except (NotFound, Internal) as exc:
            logger.warning("skipping %s: %s", child, exc)
    return sorted(sets, key=lambda s: (s.created, s.version))


def resolve(version: str | None = None, home: Path | None = None) -> ModelSet:
    """The model set `version`, or the CURRENT one when `version` is None.

    Raises:
        NotFound: nothing installed / no such version (the message says how to get one).
    """
    base = models_home(home)
    if version is None:
        version = current_version(home)
        if version is None:
            raise NotFound(f"no model set installed under {base}; {_BUILD_HINT}")
    check_version(version)
    root = base / version
    if not (root / MANIFEST_NAME).is_file():
        installed = ", ".join(s.version for s in list_model_sets(home)) or "none"
        raise NotFound(
            f"model set {version!r} is not installed under {base} (installed: {installed}); "
            f"{_BUILD_HINT}"
        )
    return load_model_set(root)


def staging_dir(version: str, home: Path | None = None) -> Path:
    """A fresh temporary folder next to the final place of `version` (same filesystem)."""
    check_version(version)
    base = models_home(home)
    base.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(base)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base))


#: Staging folders untouched this long belong to a build or pull that was killed.
STALE_STAGING_S = 24 * 3600


def _remove_stale_staging(base: Path) -> None:
    now = time.time()
    for child in base.iterdir():
        if not child.name.startswith((".tmp-", ".old-")) or not child.is_dir():
            continue
        try:
            if now - child.stat().st_mtime > STALE_STAGING_S:
                logger.info("removing stale staging folder %s", child)
                shutil.rmtree(child, ignore_errors=True)
        except OSError:
            continue


def install_dir(
    staged: Path, version: str, home: Path | None = None, *, replace: bool = False
) -> Path:
    """Move a finished staging folder into place as model set `version` with one rename.

    Args:
        staged: folder from `staging_dir`, holding a complete model set.
        version: the version to install it as.
        home: HG_HOME override.
        replace: replace an installed model set of the same version (the old one is moved
            aside first and removed after, so the path always names a complete set).

    Raises:
        BadRequest: `version` is installed already and `replace` is False.
    """
    check_version(version)
    final = models_home(home) / version
    if final.exists():
        if not replace:
            raise BadRequest(
                f"model set {version!r} is installed already at {final}; "
                "pass --force to replace it or choose another --version",
                param="version",
            )
        old = final.with_name(f".old-{version}-{os.getpid()}")
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    logger.info("installed model set %s at %s", version, final)
    return final
