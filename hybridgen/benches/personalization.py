"""`hybridgen bench personalization`: what a user's n-gram cache does to the edge model.

Measured through the edge's own int4 onnxruntime-genai model (`--edge-dir`, else the CURRENT
model set's, else a tiny set built in a temporary folder), with `edge.personal.adapt` exactly as
the runtime uses it:

- Users (`personalization_data`): real-text users, each from one local source, with feedback
  and held-out samples from different documents; chat-persona users from templates, reported
  separately; and generic held-out text from sources no user has.
- Perplexity without and with personalization, teacher-forced over every position of each
  held-out sample. The model's log-probability of every position comes from one forward pass
  per sample (the logits of all positions after `append_tokens`). With personalization, as
  the edge does it:
  - the user's own samples in context, picked for the request so far, offered only where
    the user's cache foresees the tokens before the position (the similarity bound) and
    gated on their evidence (`personalization_samples`);
  - the user's n-gram cache on top: it holds only the user's feedback samples; at each
    position it predicts from the held-out sample's own preceding tokens and is mixed in as
    the runtime mixes it: p = (1 - w) p + w p_cache, where `w` is the cache's gate
    (`NgramCache.predict`) scaled by the request's fit (`NgramCache.bounded` of the tokens
    before the position, as the edge bounds a request by its own text); this is the
    distribution `edge.personal.adapt.mix_logits` produces, read at the scored token.
  `reduction` = 1 - ppl_with / ppl_without; `generic_change` = generic ppl with the user's
  state / without - 1. Each row also gives the cache alone (`reduction_cache`,
  `generic_change_cache`, from `ppl_cache` and `generic_ppl_cache`) and the samples alone
  (`reduction_samples`, from `ppl_samples`). `generic_change_unbounded` is the generic change
  under the rule before the bound (the samples gated on evidence alone, the cache's gate
  alone), beside it in the same run; `fit_held_out` and `fit_generic` the mean fit of the
  user's cache on each, and `fit_ms_p50` what the fit of a held-out sample costs.
- Users far from the generic text: chat personas on a narrow topic (`personalization_personas`);
  `generic_change_max` is the largest over every user, personas included.
- `update_ms_p50`: `NgramCache.update` per feedback sample (median over every user's samples).
- `mix_us_per_step`: `predict` + the sparse part of `mix_logits` + `mixed_logsumexp` on a real
  (V,) logits row, per held-out position. The logsumexp over V (`logsumexp_us`, reported
  apart) replaces the log-softmax the runtime computes for every token's log-probability
  anyway; `decode_overhead` includes it.
- `decode_overhead`: greedy decoding through `edge.runtime.EdgeRuntime` (one thread, one slot)
  of the same prompts with the user's cache against without, runs alternating; each run's rate
  is 1 / its median time between tokens (robust to another process's stalls), and the figure
  is the median of the per-pair ratios (tok/s without / tok/s with) minus 1.
- `samples_prefill_ms_p50`: one held-out sample (64 tokens) prefilled behind a kept samples
  prefix (rewound), what each extra prefill of the samples gate costs a request;
  `samples_prefix_ms_p50`: the samples prefix itself prefilled (once per new picks).

Deterministic inputs (sorted files, fixed seeds); timings vary with the machine, so the JSON
records the CPU and load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge.personal.adapt import NgramCache, mix_logits, mixed_logsumexp
from hybridgen.benches.machine import cpu_info, load_average
from hybridgen.benches.personalization_data import User, build_users, generic_samples
from models.logits import logsumexp
from models.ort_edge import EdgeModel, new_generator

logger = logging.getLogger(__name__)

GOALS: dict[str, tuple[str, float]] = {
    "reduction_median": (">=", 0.25),
    "reduction_prose_min": (">=", 0.20),
    "reduction_persona_median": (">=", 0.80),
    "generic_change_mean": ("<=", 0.03),
    "generic_change_max": ("<=", 0.05),
    "update_ms_p50": ("<=", 1.0),
    "mix_us_per_step": ("<=", 50.0),
    "decode_overhead": ("<=", 0.05),
}

#: (feedback, held-out, tokens per sample, generic samples per source, decode prompts, decode
#: rounds, new tokens per decode run)
FULL = (50, 20, 64, 5, 4, 3, 64)
QUICK = (12, 4, 32, 2, 2, 1, 16)
PROMPT_TOKENS = 32


@contextlib.contextmanager
def edge_folder(edge_dir: Path | None, threads: int) -> Iterator[tuple[Path, str]]:
    """The int4 edge build to measure and its label: `edge_dir`, else the CURRENT model set's,
    else a tiny model set built in a temporary folder."""
    from broker.errors import NotFound
    from models import registry

    if edge_dir is not None:
        yield edge_dir, f"dir:{edge_dir}"
        return
    try:
        model_set = registry.resolve()
    except NotFound:
        from models.lab.build import BuildOptions, build_model_set

        print("no model set installed and no --edge-dir: building a tiny one for the bench",
              file=sys.stderr)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="hg-bench-") as tmp:
            model_set = build_model_set(
                BuildOptions(profile="tiny", home=Path(tmp), version="bench", threads=threads,
                             progress=False, set_current=False, precisions=("int4",))
            )  # fmt: skip
            yield model_set.edge_dir("int4"), f"bundled:{model_set.version}"
        return
    yield model_set.edge_dir("int4"), f"bundled:{model_set.version}"


# ---------------------------------------------------------------------- perplexity


def model_logprobs(model: EdgeModel, ids: list[int]) -> np.ndarray:
    """log p_model(ids[i] | ids[:i]) for i = 1..n-1: one forward pass over the sample."""
    from hybridgen.benches.personalization_samples import logprobs_after

    return logprobs_after(model, [], ids)


def mixed_logprobs(
    cache: NgramCache, ids: list[int], base: np.ndarray, *, bounded: bool = True
) -> np.ndarray:
    """log of (1 - w) p_model + w p_cache at each scored position of `ids`.

    `base` is `model_logprobs(ids)`. The cache predicts from the sample's own preceding tokens;
    where its gate is closed (w = 0) the model's log-probability stays. `bounded`: as the edge
    serves a request whose own text is the tokens before the position
    (`NgramCache.bounded`); else the cache's gate alone (the rule before the request's fit).
    """
    out = base.copy()
    for i in range(1, len(ids)):
        view = cache.bounded(ids[:i]) if bounded else cache
        token_ids, probs, weight = view.predict(ids[max(0, i - cache.order + 1) : i])
        if weight <= 0.0:
            continue
        hit = np.flatnonzero(token_ids == ids[i])
        p_cache = float(probs[hit[0]]) if len(hit) else 0.0
        out[i - 1] = math.log((1.0 - weight) * math.exp(base[i - 1]) + weight * p_cache)
    return out


def perplexity(logprobs: list[np.ndarray]) -> float:
    """exp(-mean log-probability) over every scored token of the samples."""
    return float(np.exp(-np.concatenate(logprobs).mean()))


# ---------------------------------------------------------------------- timings


def time_updates(users: list[User]) -> list[float]:
    """Milliseconds of `NgramCache.update` for each feedback sample, users' caches built fresh."""
    times = []
    for user in users:
        cache = NgramCache()
        for sample in user.feedback:
            started = time.perf_counter()
            cache.update(sample)
            times.append((time.perf_counter() - started) * 1e3)
    return times


def time_fit(caches: dict[str, NgramCache], users: list[User]) -> list[float]:
    """Milliseconds of `NgramCache.bounded` on each held-out sample (a request's own text),
    what the request's fit costs `Personalizer.prepare`."""
    out = []
    for user in users:
        for sample in user.held_out:
            started = time.perf_counter()
            caches[user.name].bounded(sample)
            out.append((time.perf_counter() - started) * 1e3)
    return out


def time_mixing(
    model: EdgeModel, caches: dict[str, NgramCache], users: list[User]
) -> tuple[float, float]:
    """Median microseconds per step of predict + sparse mix, and of the logsumexp over V.

    One real logits row (V entries, float32 as onnxruntime-genai returns it) is mixed for
    every held-out position of every user; entries changed are restored between steps.
    """
    ids = users[0].held_out[0]
    generator = new_generator(model.model, len(ids) + 1)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    row = np.array(generator.get_logits(), dtype=np.float32).reshape(-1)
    pristine = row.copy()
    lse = logsumexp(row)
    mix_us, lse_us = [], []
    for user in users:
        cache = caches[user.name]
        for sample in user.held_out:
            for i in range(1, len(sample)):
                context = sample[max(0, i - cache.order + 1) : i]
                started = time.perf_counter()
                token_ids, probs, weight = cache.predict(context)
                mix_logits(row, token_ids, probs, weight, lse=lse)
                mixed_logsumexp(lse, probs, weight)
                mix_us.append((time.perf_counter() - started) * 1e6)
                row[token_ids] = pristine[token_ids]
        started = time.perf_counter()
        logsumexp(row)
        lse_us.append((time.perf_counter() - started) * 1e6)
    return statistics.median(mix_us), statistics.median(lse_us)


async def _decode(runtime: Any, prompt: list[int], new_tokens: int, adapter: Any) -> float:
    """Decode tokens/s (1 / median time between tokens) of one greedy request through the
    runtime."""
    from edge.runtime import SamplingParams, Token

    options = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    stamps = []
    async for event in runtime.submit(prompt, options, adapter=adapter):
        if isinstance(event, Token):
            stamps.append(time.perf_counter())
    if len(stamps) < 2:
        return 0.0
    # The median step, not the mean: a stall from another process hits one run, not the rate.
    return 1.0 / max(statistics.median(np.diff(stamps).tolist()), 1e-9)


def time_decode(
    folder: Path, threads: int, jobs: list[tuple[list[int], NgramCache]], rounds: int,
    new_tokens: int,
) -> dict[str, float]:  # fmt: skip
    """Decode rate with each prompt's user cache against without; runs alternate."""
    from edge.runtime import EdgeRuntime

    runtime = EdgeRuntime(folder, threads=threads, max_active=1)

    async def measure() -> list[tuple[float, float]]:
        pairs = []
        prompt, cache = jobs[0]
        await _decode(runtime, prompt, new_tokens, None)  # warm-up, both
        await _decode(runtime, prompt, new_tokens, NgramCache.from_bytes(cache.to_bytes()))
        for _ in range(rounds):
            for prompt, cache in jobs:
                plain = await _decode(runtime, prompt, new_tokens, None)
                adapted = await _decode(
                    runtime, prompt, new_tokens, NgramCache.from_bytes(cache.to_bytes())
                )
                pairs.append((plain, adapted))
        await runtime.close()
        return pairs

    pairs = asyncio.run(measure())
    return {
        "tok_s_without": statistics.median(p for p, _ in pairs),
        "tok_s_with": statistics.median(a for _, a in pairs),
        "overhead": statistics.median(p / a for p, a in pairs if a > 0) - 1.0,
    }


# ---------------------------------------------------------------------- the run


def run(*, quick: bool, threads: int, edge_dir: Path | None) -> dict[str, Any]:
    """Build the users, measure everything; the result dict of the bench's JSON."""
    from hybridgen.benches import personalization_samples

    feedback, held_out, sample_tokens, generic_per_source, prompts, rounds, new_tokens = (
        QUICK if quick else FULL
    )
    load_start = load_average()
    with edge_folder(edge_dir, threads) as (folder, label):
        model = EdgeModel(folder, threads)
        users, notes = build_users(
            model.encode, feedback=feedback, held_out=held_out, sample_tokens=sample_tokens
        )
        generic, generic_sources = generic_samples(
            model.encode, per_source=generic_per_source, sample_tokens=sample_tokens
        )
        update_ms = time_updates(users)
        caches = {u.name: NgramCache.from_samples(u.feedback) for u in users}
        generic_base = [model_logprobs(model, s) for s in generic]
        generic_ppl = perplexity(generic_base)
        per_user: list[dict[str, Any]] = []
        prefill_ms: list[float] = []
        prefix_ms: list[float] = []
        for user in users:
            cache = caches[user.name]
            base = [model_logprobs(model, s) for s in user.held_out]
            samples = personalization_samples.measure(
                model, user, cache, base, generic, generic_base
            )
            prefill_ms += samples["prefill_ms"]
            prefix_ms.append(samples["prefix_ms"])

            def mixed(
                texts: list[list[int]], logprobs: list[np.ndarray], bounded: bool = True
            ) -> float:
                return perplexity(
                    [
                        mixed_logprobs(cache, s, lp, bounded=bounded)  # noqa: B023
                        for s, lp in zip(texts, logprobs, strict=True)
                    ]
                )

            without = perplexity(base)
            with_ = mixed(user.held_out, samples["held_out"])
            cache_only = mixed(user.held_out, base)
            samples_only = perplexity(samples["held_out"])
            generic_with = mixed(generic, samples["generic"])
            generic_cache = mixed(generic, generic_base)
            unbounded = mixed(generic, samples["generic_unbounded"], bounded=False)
            per_user.append(
                {
                    "user": user.name,
                    "kind": user.kind,
                    "source": user.source,
                    "feedback_documents": user.feedback_documents,
                    "held_out_documents": user.held_out_documents,
                    "feedback_samples": len(user.feedback),
                    "held_out_samples": len(user.held_out),
                    "cache_contexts": len(cache),
                    "ppl_without": round(without, 3),
                    "ppl_with": round(with_, 3),
                    "ppl_cache": round(cache_only, 3),
                    "ppl_samples": round(samples_only, 3),
                    "reduction": round(1.0 - with_ / without, 4),
                    "reduction_cache": round(1.0 - cache_only / without, 4),
                    "reduction_samples": round(1.0 - samples_only / without, 4),
                    "samples_gate_open": round(samples["gate_open"], 3),
                    "samples_prefix_tokens": samples["prefix_tokens"],
                    "generic_ppl_with": round(generic_with, 3),
                    "generic_change": round(generic_with / generic_ppl - 1.0, 4),
                    "generic_ppl_cache": round(generic_cache, 3),
                    "generic_change_cache": round(generic_cache / generic_ppl - 1.0, 4),
                    "generic_gate_open": round(samples["generic_gate_open"], 3),
                    "generic_change_unbounded": round(unbounded / generic_ppl - 1.0, 4),
                    "fit_held_out": round(samples["fit_held_out"], 3),
                    "fit_generic": round(samples["fit_generic"], 3),
                }
            )
        mix_us, lse_us = time_mixing(model, caches, users)
        real = [u for u in users if u.kind != "persona"]
        jobs = [(u.held_out[0][:PROMPT_TOKENS], caches[u.name]) for u in real[:prompts]]
        decode = time_decode(folder, threads, jobs, rounds, new_tokens)
        vocab = model.vocab_size
        del model
    real_rows = [r for r in per_user if r["kind"] != "persona"]
    prose_rows = [r for r in real_rows if r["kind"] == "prose"]
    persona_rows = [r for r in per_user if r["kind"] == "persona"]
    changes = [r["generic_change"] for r in per_user]

    def median(rows: list[dict[str, Any]]) -> float | None:
        return round(statistics.median(r["reduction"] for r in rows), 4) if rows else None

    def minimum(rows: list[dict[str, Any]], key: str = "reduction") -> float | None:
        return round(min(r[key] for r in rows), 4) if rows else None

    result: dict[str, Any] = {
        "users": len(per_user),
        "real_text_users": len(real_rows),
        "prose_users": len(prose_rows),
        "persona_users": len(persona_rows),
        "per_user": per_user,
        "reduction_median": median(real_rows),
        "reduction_min": minimum(real_rows),
        "reduction_prose_min": minimum(prose_rows),
        "reduction_persona_median": median(persona_rows),
        "generic_change_mean": round(statistics.fmean(changes), 4),
        "generic_change_max": round(max(changes), 4),
        "reduction_cache_median": round(
            statistics.median(r["reduction_cache"] for r in real_rows), 4
        )
        if real_rows
        else None,
        "reduction_cache_prose_min": minimum(prose_rows, "reduction_cache"),
        "generic_change_cache_max": round(max(r["generic_change_cache"] for r in per_user), 4),
        "generic_change_unbounded_max": round(
            max(r["generic_change_unbounded"] for r in per_user), 4
        ),
        "fit_ms_p50": round(statistics.median(time_fit(caches, users)), 3),
        "samples_prefill_ms_p50": round(statistics.median(prefill_ms), 2),
        "samples_prefix_ms_p50": round(statistics.median(prefix_ms), 2),
        "samples_k": personalization_samples.SAMPLES_K,
        "samples_tokens": personalization_samples.SAMPLES_TOKENS,
        "samples_min_gain": personalization_samples.MIN_GAIN,
        "generic_ppl_without": round(generic_ppl, 3),
        "generic_sources": generic_sources,
        "generic_samples": len(generic),
        "update_ms_p50": round(statistics.median(update_ms), 4),
        "mix_us_per_step": round(mix_us, 2),
        "logsumexp_us": round(lse_us, 2),
        "decode_overhead": round(decode["overhead"], 4),
        "decode_tok_s_without": round(decode["tok_s_without"], 1),
        "decode_tok_s_with": round(decode["tok_s_with"], 1),
        "model": label,
        "edge_dir": str(folder),
        "vocab_size": vocab,
        "threads": threads,
        "quick": quick,
        "sample_tokens": sample_tokens,
        "feedback_per_user": feedback,
        "held_out_per_user": held_out,
        "notes": notes,
        "cpu": cpu_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
    }
    result["goals"] = {
        key: {"goal": f"{op} {bound}", "met": _met(result[key], op, bound)}
        for key, (op, bound) in GOALS.items()
    }
    return result


def _met(value: float | None, op: str, bound: float) -> bool | None:
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound


def _print_table(result: dict[str, Any]) -> None:
    print(f"personalization  model={result['model']}  threads={result['threads']}  "
          f"samples={result['feedback_per_user']}+{result['held_out_per_user']} x "
          f"{result['sample_tokens']} tokens  load {result['load_average_start']} -> "
          f"{result['load_average_end']}")  # fmt: skip
    print(f"  {'user':<18} {'kind':<8} {'ppl w/o':>8} {'ppl with':>8} {'reduction':>9} "
          f"{'cache':>6} {'samples':>7} {'gate':>5} {'generic':>8} {'(gate)':>6} "
          f"{'(old)':>7} {'fit':>5} {'(gen)':>5}  source")  # fmt: skip
    for kinds in (("prose", "docs", "code"), ("persona",)):
        for row in (r for r in result["per_user"] if r["kind"] in kinds):
            print(f"  {row['user']:<18} {row['kind']:<8} {row['ppl_without']:>8.2f} "
                  f"{row['ppl_with']:>8.2f} {row['reduction']:>9.1%} "
                  f"{row['reduction_cache']:>6.1%} {row['reduction_samples']:>7.1%} "
                  f"{row['samples_gate_open']:>5.0%} {row['generic_change']:>+8.1%} "
                  f"{row['generic_gate_open']:>6.0%} {row['generic_change_unbounded']:>+7.1%} "
                  f"{row['fit_held_out']:>5.2f} {row['fit_generic']:>5.2f}  "
                  f"{row['source']}")  # fmt: skip
    print(
        f"  generic text ({result['generic_samples']} samples: "
        f"{', '.join(result['generic_sources'])}): ppl {result['generic_ppl_without']:.2f}"
    )
    print(f"  (cache: n-gram cache alone; samples: gated samples alone; gate: share of positions "
          f"with the samples in context; (old): generic change under the rule before the "
          f"request's fit; fit: the cache's fit on the user's and on generic text; "
          f"up to {result['samples_k']} samples, "
          f"{result['samples_tokens']} tokens, gain > {result['samples_min_gain']} "
          "nats)")  # fmt: skip
    for key, goal in result["goals"].items():
        mark = {True: "met", False: "NOT met", None: "n/a"}[goal["met"]]
        print(f"  {key:<26} {result[key]!s:>10}  goal {goal['goal']:<8} {mark}")
    print(
        f"  (logsumexp over V {result['logsumexp_us']} us/step, in place of the log-softmax; "
        f"decode {result['decode_tok_s_without']} -> {result['decode_tok_s_with']} tok/s)"
    )
    print(
        f"  cache alone: median {result['reduction_cache_median']}, prose min "
        f"{result['reduction_cache_prose_min']}, generic max {result['generic_change_cache_max']};"
        f" a sample behind a kept samples prefix prefills in {result['samples_prefill_ms_p50']} ms"
        f" (the prefix itself: {result['samples_prefix_ms_p50']} ms)"
    )
    for note in result["notes"]:
        print(f"  note: {note}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hybridgen bench personalization`."""
    parser = argparse.ArgumentParser(
        prog="hybridgen bench personalization",
        description="Personalization on the edge model (the user's gated samples in context "
        "and n-gram cache): held-out perplexity without and with it, generic text, update/mix "
        "cost and decode overhead.",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter samples (tests)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--edge-dir", type=Path, help="int4 onnxruntime-genai folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads < 1:
        parser.error("--threads must be positive")
    logging.basicConfig(level=logging.WARNING)
    result = run(quick=args.quick, threads=args.threads, edge_dir=args.edge_dir)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0
