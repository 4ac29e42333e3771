"""Calibrate confidence routing for two *different* pretrained models, measured at both ends.

The lab pair (models.lab.calibration) has a domain split to learn from: in-domain text should
stay on the edge. Two pretrained models have none, so the label comes from the models
themselves: on each held-out passage, both ends score the same text (the edge its int4
build's prompt perplexity, through `EdgeModel` exactly as the router reads it; the cloud its
own tokenizer and checkpoint, teacher forced), and the cloud's *gain* is how much lower its
perplexity is, per character so the two tokenizers compare. Passages where the gain is above
the median are the ones worth sending; the threshold on the edge's perplexity that best
separates them (balanced accuracy, as for the lab) becomes the set's threshold, with its AUC.
When the edge's perplexity does not predict the gain (AUC under MIN_AUC), no threshold is
set and the manifest says why.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

from models.lab.calibration import MIN_PROMPTS, _fit, passages
from models.ort_edge import EdgeModel

#: Passages scored at both ends (the cloud scores on CPU, so keep it modest).
MAX_PASSAGES = 96
#: Below this AUC the edge's perplexity says too little about the cloud's gain to route on.
MIN_AUC = 0.6


def cloud_nll_per_char(model: Any, tokenizer: Any, text: str) -> float:
    """Total negative log-likelihood of `text` under a causal LM, per character."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] < 2:
        return math.nan
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()  # (n-1, V)
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return float(nll) / max(1, len(text))


def calibrate_pair(
    edge_dir: Path,
    cloud_dir: Path,
    texts: list[str],
    *,
    threads: int = 1,
    seed: int = 0,
    min_tokens: int = 8,
    max_tokens: int = 96,
) -> dict[str, Any]:
    """The `routing` section for a pair of different models (see the module docstring).

    Args:
        edge_dir: the edge's onnxruntime-genai build (int4).
        cloud_dir: the cloud's Hugging Face checkpoint.
        texts: held-out documents to cut passages from.
        threads: threads for both ends.
        seed: passage lengths are drawn from a generator seeded with it.

    Returns:
        `{"mode": "calibrated", "label": "cloud_gain", "perplexity_threshold", "auc", ...}`,
        or `perplexity_threshold` None with `skipped` saying why.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    torch.set_num_threads(threads)
    edge = EdgeModel(edge_dir, threads)
    top = max(min_tokens, min(max_tokens, edge.context_length - 16))
    cut = passages(
        texts,
        edge.encode,
        edge.decode,
        rng=random.Random(seed),
        limit=MAX_PASSAGES,
        min_tokens=min_tokens,
        max_tokens=top,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(cloud_dir))
    cloud = AutoModelForCausalLM.from_pretrained(str(cloud_dir), dtype=torch.float32).eval()
    scored: list[tuple[float, float]] = []  # (edge perplexity, cloud gain per character)
    for text in cut:
        ids = edge.encode(text)
        edge_ppl = edge.perplexity(ids)
        cloud_nll = cloud_nll_per_char(cloud, tokenizer, text)
        if edge_ppl is None or math.isnan(cloud_nll) or len(ids) < 2:
            continue
        edge_nll = math.log(edge_ppl) * (len(ids) - 1) / max(1, len(text))
        scored.append((edge_ppl, edge_nll - cloud_nll))
    result = fit_gain(scored, prompt_tokens=[min_tokens, top], seed=seed)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def fit_gain(
    scored: list[tuple[float, float]], *, prompt_tokens: list[int], seed: int
) -> dict[str, Any]:
    """The `routing` section from (edge perplexity, cloud gain per character) per passage.

    Passages with a gain at or above the median are the ones worth sending; the threshold
    on the edge's perplexity that best separates them is kept when its AUC reaches MIN_AUC.
    """
    result: dict[str, Any] = {
        "mode": "calibrated",
        "label": "cloud_gain",
        "perplexity_threshold": None,
        "prompt_tokens": prompt_tokens,
        "seed": seed,
    }
    if len(scored) < 2 * MIN_PROMPTS:
        result["skipped"] = f"too little held-out text ({len(scored)} passages scored)"
        result["mode"] = "uncalibrated"
        return result
    median_gain = sorted(gain for _, gain in scored)[len(scored) // 2]
    stay = [ppl for ppl, gain in scored if gain < median_gain]
    send = [ppl for ppl, gain in scored if gain >= median_gain]
    fit = _fit(stay, send)
    result.update({k: v for k, v in fit.items() if k != "threshold"})
    # The two sides are "the cloud gains little" / "the cloud gains more than the median".
    result["prompts"] = {"edge_as_good": len(stay), "cloud_better": len(send)}
    if "median_perplexity" in fit:
        median = fit["median_perplexity"]
        result["median_perplexity"] = {
            "edge_as_good": median["in_domain"],
            "cloud_better": median["out_of_domain"],
        }
    auc = fit.get("auc")
    if fit["threshold"] is None or auc is None or auc < MIN_AUC:
        result["mode"] = "uncalibrated"
        result["skipped"] = (
            f"the edge's prompt perplexity hardly predicts where the cloud does better (AUC "
            f"{auc}); set perplexity_threshold in the routing policy to route by confidence"
        )
        return result
    result["perplexity_threshold"] = fit["threshold"]
    return result
