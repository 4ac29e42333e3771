"""`hybridgen bench routing`: the share sent to the cloud against the quality recovered.

On held-out prompts with their true continuations (documentation passages and
question-shaped chat messages, `models.lab.calibration_set.eval_set`), each end's quality is the
mean teacher-forced log-likelihood of the continuation (the edge's int4 build through
onnxruntime-genai, as it serves; the cloud's checkpoint in torch). Each routing signal the
edge can read is swept over its threshold; the curve of share sent against gap recovered
gives `cpt50`/`cpt80` (the smallest share that recovers 50% / 80% of the edge-to-cloud gap)
and an AUC. The prompts are split in two: the `fit` half trains the learned combination and
the length normalisation and calibrates the threshold (as the build does); every figure
below is measured on the other, `eval` half.

Pairs: the `quick` lab pair by default (built first when missing), `--set VERSION` for any
installed model set (the default SmolLM2 set: int4 against full precision of the same
weights, "what quantization costs"), `--edge-from` / `--cloud-from` for a user's own pair
(built into a model set first). The plot goes to `$HG_HOME/bench/routing/` (`--out`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.lab import calibration_quality as cq

logger = logging.getLogger(__name__)

#: Signals swept (higher value: send to the cloud); see `signal_values`.
SIGNALS = (
    "prompt_perplexity",
    "perplexity_by_length",
    "prompt_length",
    "draft_mean_logprob",
    "draft_low_quantile",
    "entropy",
    "learned",
    "prefill_learned",
)
GOALS = {"cpt80_best": 0.40, "within_split_half": 0.05}
LAB_PROFILE = "quick"
#: Prompts of at most this many scored tokens count as short (`calibration.*.short`).
SHORT_TOKENS = 15


def features(data: dict[str, np.ndarray]) -> np.ndarray:
    """Inputs of the learned combination: every signal the edge reads, and chat or not."""
    return np.column_stack(
        [
            data["log_perplexity"],
            np.log(np.maximum(1.0, data["scored_tokens"])),
            data["draft_mean_logprob"],
            data["draft_low_quantile"],
            data["entropy"],
            data["question"].astype(np.float64),
        ]
    )


def signal_values(
    data: dict[str, np.ndarray],
    fit: tuple[float, float, float],
    learned: cq.Logistic,
    prefill: cq.Logistic | None,
) -> dict[str, np.ndarray]:
    """Each signal per prompt, oriented so that a higher value means "send to the cloud"."""
    from models.lab.calibration_eval import prefill_features

    values = {
        "prompt_perplexity": data["log_perplexity"],
        "perplexity_by_length": cq.normalised_perplexity(
            data["log_perplexity"], data["scored_tokens"], fit, data["question"]
        ),
        "prompt_length": -data["scored_tokens"],  # shorter prompts: less context
        "draft_mean_logprob": -data["draft_mean_logprob"],
        "draft_low_quantile": -data["draft_low_quantile"],
        "entropy": data["entropy"],
        "learned": learned.score(features(data)),
    }
    if prefill is not None:
        values["prefill_learned"] = prefill.score(prefill_features(data))
    return values


def policy_sends(routing: dict[str, Any] | None, data: dict[str, np.ndarray]) -> np.ndarray:
    """Which prompts a manifest `routing` section sends, read by the edge's own rule."""
    from edge.route.rules import length_threshold

    sends = []
    rows = zip(data["log_perplexity"], data["scored_tokens"], data["question"], strict=True)
    for log_ppl, n, chat in rows:
        threshold = length_threshold(routing, int(n), chat=bool(chat))
        sends.append(threshold is not None and math.exp(log_ppl) > threshold)
    return np.asarray(sends, dtype=bool)


def policy_report(routing: dict[str, Any] | None, data: dict[str, np.ndarray]) -> dict[str, Any]:
    """A routing section's outcome on the eval prompts: overall, on questions, on passages,
    and on short prompts (at most SHORT_TOKENS scored tokens), in and out of the domain."""
    sent = policy_sends(routing, data)
    gap = data["gap"]
    question, inside = data["question"], data["in_domain"]
    short = data["scored_tokens"] <= SHORT_TOKENS
    return {
        "all": cq.policy_outcome(gap, sent),
        "questions": cq.policy_outcome(gap, sent, mask=question),
        "questions_in_domain": cq.policy_outcome(gap, sent, mask=question & inside),
        "free_form_questions_in_domain": cq.policy_outcome(
            gap, sent, mask=data["free_form"] & inside
        ),
        "free_form_questions_out_of_domain": cq.policy_outcome(
            gap, sent, mask=data["free_form"] & ~inside
        ),
        "passages": cq.policy_outcome(gap, sent, mask=~question),
        "short": cq.policy_outcome(gap, sent, mask=short),
        "short_in_domain": cq.policy_outcome(gap, sent, mask=short & inside),
        "short_out_of_domain": cq.policy_outcome(gap, sent, mask=short & ~inside),
    }


def evaluate(
    fit_data: dict[str, np.ndarray],
    eval_data: dict[str, np.ndarray],
    *,
    manifest_routing: dict[str, Any] | None = None,
    target: float = cq.DEFAULT_TARGET,
) -> tuple[dict[str, Any], dict[str, cq.Curve]]:
    """The bench's figures (the JSON, less run facts) and each signal's curve on `eval_data`.

    Args:
        fit_data: per-prompt arrays of the fit split (`Records.arrays("fit")`).
        eval_data: per-prompt arrays of the eval split.
        manifest_routing: the model set's routing section as built; its domain-labelled
            thresholds (without a `signal`) are the "before" policy.
        target: the calibration's share of the gap to recover.
    """
    from models.lab.calibration_eval import calibrate_signal, prefill_rules

    fit = cq.length_fit(fit_data["log_perplexity"], fit_data["scored_tokens"], fit_data["question"])
    label = fit_data["gap"] > np.median(fit_data["gap"])
    learned = cq.fit_logistic(features(fit_data), label)
    prefill = next((r.learned for r in prefill_rules(fit_data) if r.learned is not None), None)
    values = signal_values(eval_data, fit, learned, prefill)
    gap = eval_data["gap"]
    curves = {name: cq.curve(gap, v) for name, v in values.items()}
    signals = {name: cq.summary(gap, v) for name, v in values.items()}
    ranked = sorted(
        (name for name in signals if signals[name]["cpt80"] is not None),
        key=lambda name: (signals[name]["cpt80"], -(signals[name]["auc"] or 0.0)),
    )
    best = ranked[0] if ranked else None
    curves["oracle"] = cq.curve(gap, gap)
    curves["split_half_oracle"] = cq.curve(eval_data["gap_second"], eval_data["gap_first"])
    gain = {
        f"{share:.1f}": (round(cq.gain_at(curves[best], share), 4) if best else None)
        for share in cq.GAIN_SHARES
    }
    before_routing = {
        k: v for k, v in (manifest_routing or {}).items() if k not in ("signal", "signal_threshold")
    }
    after_routing = calibrate_signal(fit_data, target=target)
    result: dict[str, Any] = {
        "prompts": int(gap.size),
        "q_edge": round(float(eval_data["q_edge"].mean()), 4),
        "q_cloud": round(float(eval_data["q_cloud"].mean()), 4),
        "signals": signals,
        "best_signal": best,
        "cpt80_best": signals[best]["cpt80"] if best else None,
        "random_cpt80": 0.8,
        "oracle_cpt80": cq.oracle_cpt(gap),
        "split_half_cpt80": cq.split_half_cpt(eval_data["gap_first"], eval_data["gap_second"]),
        "gain_at": gain,
        "prompts_fit": int(fit_data["gap"].size),
        "questions": int(eval_data["question"].sum()),
        "curves": {
            name: [round(float(np.interp(s, c.shares, c.recovered)), 4) for s in _GRID]
            for name, c in curves.items()
            if not np.isnan(c.recovered).any()
        },
        "curve_shares": list(_GRID),
        "curve_areas": {
            name: None if (a := cq.area(c)) is None else round(a, 4) for name, c in curves.items()
        },
        "calibration": {
            "before": {
                "policy": "domain-labelled perplexity thresholds by length "
                "(models.lab.calibration)",
                **policy_report(before_routing or None, eval_data),
            },
            "after": {
                "policy": f"{after_routing.get('signal')} recovering {target:.0%} of the gap",
                "signal": after_routing.get("signal"),
                "signal_threshold": after_routing.get("signal_threshold"),
                **policy_report(after_routing, eval_data),
            },
        },
    }
    result["goals"] = goals(result)
    return result, curves


_GRID = tuple(round(0.05 * i, 2) for i in range(21))


def goals(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals for the lab pair, each with whether it is met."""
    best, half = result["cpt80_best"], result["split_half_cpt80"]
    gain = result["gain_at"]
    hybrid = max((gain["0.2"] or -math.inf), (gain["0.3"] or -math.inf))
    return {
        "cpt80_best_le_0.40": best is not None and best <= GOALS["cpt80_best"],
        "within_0.05_of_split_half": best is not None
        and half is not None
        and best - half <= GOALS["within_split_half"],
        "hybrid_at_30pct_ge_cloud_only": gain["1.0"] is not None and hybrid >= gain["1.0"],
    }


# --------------------------------------------------------------------------- plot


def write_plot(curves: dict[str, cq.Curve], path: Path, title: str) -> str:
    """Draw the curves to `path` (PNG): with matplotlib when installed (the `bench` extra),
    else as bare lines (no labels) with a small PNG writer. Returns which was used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _bare_png(curves, path)
        return "bare"
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    for name, c in curves.items():
        style = "--" if "oracle" in name else "-"
        ax.plot(c.shares, c.recovered, style, label=name, linewidth=1.4)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="random")
    ax.axhline(0.8, color="grey", linewidth=0.6)
    ax.set_xlabel("share of prompts sent to the cloud")
    ax.set_ylabel("edge-to-cloud quality gap recovered")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def _bare_png(curves: dict[str, cq.Curve], path: Path, size: int = 400) -> None:
    """Curves as coloured lines on white (x: share, y: recovered 0..1.2), stdlib zlib PNG."""
    import struct
    import zlib

    image = np.full((size, size, 3), 255, dtype=np.uint8)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for index, c in enumerate(curves.values()):
        xs = np.linspace(0, 1, 4 * size)
        ys = np.interp(xs, c.shares, np.nan_to_num(c.recovered))
        cols = np.clip((xs * (size - 1)).astype(int), 0, size - 1)
        rows = np.clip(((1 - ys / 1.2) * (size - 1)).astype(int), 0, size - 1)
        image[rows, cols] = palette[index % len(palette)]
    raw = b"".join(b"\x00" + image[r].tobytes() for r in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
    path.write_bytes(png + chunk(b"IEND", b""))


# --------------------------------------------------------------------------- pairs


def _model_set(args: argparse.Namespace) -> Any:
    """The set to measure: `--set`, a pair built from `--edge-from/--cloud-from`, or the
    newest installed `quick` lab set (built first when there is none)."""
    from models.lab.build import BuildOptions, build_model_set
    from models.registry import list_model_sets, resolve

    if args.set:
        return resolve(args.set, args.home)
    if args.edge_from or args.cloud_from:
        name = f"pair-{abs(hash((str(args.edge_from), str(args.cloud_from)))) % 10**8:08d}"
        try:
            return resolve(args.version or name, args.home)
        except Exception:  # not built yet
            pass
        return build_model_set(
            BuildOptions(
                edge_from=args.edge_from,
                cloud_from=args.cloud_from,
                version=args.version or name,
                home=args.home,
                threads=args.threads,
                set_current=False,
                progress=False,
            )
        )
    labs = [s for s in list_model_sets(args.home) if s.manifest.profile == LAB_PROFILE]
    if labs:
        return max(labs, key=lambda s: s.created)
    print(f"no {LAB_PROFILE!r} lab set installed: building it first", file=sys.stderr)
    return build_model_set(
        BuildOptions(profile=LAB_PROFILE, home=args.home, threads=args.threads, set_current=False)
    )


def run(model_set: Any, *, limit: int, threads: int, out_dir: Path) -> dict[str, Any]:
    """Measure one model set (see the module docstring); returns the JSON object."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybridgen.benches.machine import cpu_info
    from models.lab import corpus as corpus_mod
    from models.lab.calibration_scores import measure
    from models.lab.calibration_set import MAX_PROMPT_TOKENS, eval_set
    from models.lab.profiles import PROFILES
    from models.ort_edge import EdgeModel

    started = time.perf_counter()
    manifest = model_set.manifest
    profile = PROFILES.get(manifest.profile, PROFILES[LAB_PROFILE])
    domain = tuple((manifest.corpus or {}).get("domain") or corpus_mod.DEFAULT_DOMAIN)
    corpus = corpus_mod.build_corpus(profile.budgets, domain)
    torch.set_num_threads(threads)
    edge = EdgeModel(model_set.edge_dir("int4"), threads)
    prompts = eval_set(
        corpus,
        edge.encode,
        edge.decode,
        limit=limit,
        max_prompt_tokens=min(MAX_PROMPT_TOKENS, edge.context_length - 48),
        seed=manifest.seed,
    )
    cloud_dir = model_set.cloud_dir
    source = cloud_dir if (cloud_dir / "tokenizer_config.json").is_file() else None
    tokenizer = AutoTokenizer.from_pretrained(str(source or model_set.tokenizer_dir))
    cloud = AutoModelForCausalLM.from_pretrained(str(cloud_dir), dtype=torch.float32).eval()
    records = measure(edge, cloud, tokenizer, prompts, cloud_context=model_set.cloud_context_length)
    routing = manifest.routing.to_json() if manifest.routing is not None else None
    result, curves = evaluate(
        records.arrays("fit"), records.arrays("eval"), manifest_routing=routing
    )
    same = manifest.routing is not None and manifest.routing.mode == "same_weights"
    result["pair"] = {
        "set": model_set.version,
        "profile": manifest.profile,
        "edge": f"{manifest.models.edge.architecture} int4 ({manifest.models.edge.parameters})",
        "cloud": f"{manifest.models.cloud.architecture} ({manifest.models.cloud.parameters})",
        "same_weights": same,
        "reading": "what quantization alone costs (int4 against full precision)"
        if same
        else "specialist edge against generalist cloud"
        if manifest.models.edge.source == "trained"
        else "two different models",
        "manifest_signal": (routing or {}).get("signal"),
    }
    plot = out_dir / f"routing-{model_set.version}.png"
    drawn = {k: v for k, v in curves.items() if not np.isnan(v.recovered).any()}
    result["plot"] = str(plot) if drawn else None
    if drawn:
        result["plot_kind"] = write_plot(
            drawn, plot, f"{model_set.version}: share to cloud vs gap recovered"
        )
    result["seconds"] = {**records.seconds, "total_s": round(time.perf_counter() - started, 2)}
    result["cpu"] = cpu_info()
    result["threads"] = threads
    return result


def _print_table(result: dict[str, Any]) -> None:
    pair = result["pair"]
    print(f"routing quality: {pair['set']} ({pair['reading']})")
    print(
        f"  {result['prompts']} eval prompts ({result['questions']} questions); "
        f"q_edge {result['q_edge']:+.4f}, q_cloud {result['q_cloud']:+.4f} nats/token"
    )
    print(f"  {'signal':22} {'cpt50':>6} {'cpt80':>6} {'auc':>6}")
    for name, s in result["signals"].items():
        cells = [
            f"{s[k]:6.3f}" if s[k] is not None else "     -" for k in ("cpt50", "cpt80", "auc")
        ]
        print(f"  {name:22} {' '.join(cells)}")
    print(
        f"  best {result['best_signal']} cpt80 {result['cpt80_best']}; random 0.8, oracle "
        f"{result['oracle_cpt80']}, split-half oracle {result['split_half_cpt80']}"
    )
    print(f"  gain over edge-only (nats/token) at share: {result['gain_at']}")
    for when in ("before", "after"):
        c = result["calibration"][when]
        print(
            f"  calibration {when}: {c['policy']}: cloud share {c['all']['cloud_share']}, "
            f"recovered {c['all']['recovered']}; short prompts sent in / out of the domain "
            f"{c['short_in_domain']['cloud_share']} / {c['short_out_of_domain']['cloud_share']}"
        )
    print(f"  goals: {result['goals']}")
    print(f"  plot: {result['plot']}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hybridgen bench routing`."""
    from broker.settings import hg_home

    parser = argparse.ArgumentParser(
        prog="hybridgen bench routing",
        description="Share of prompts sent to the cloud against the quality gap recovered, "
        "per routing signal, on held-out prompts with their true continuations.",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--set", help="model-set version (default: the newest quick lab set)")
    parser.add_argument("--edge-from", type=Path, help="edge model: local HF folder or .gguf")
    parser.add_argument("--cloud-from", type=Path, help="cloud model: local HF folder or .gguf")
    parser.add_argument("--version", help="with --edge-from/--cloud-from: the set's version")
    parser.add_argument("--limit", type=int, default=400, help="prompts in all (default 400)")
    parser.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    parser.add_argument("--home", type=Path, help="data directory (default $HG_HOME)")
    parser.add_argument("--out", type=Path, help="plot folder (default $HG_HOME/bench/routing)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    out_dir = args.out or ((args.home or hg_home()) / "bench" / "routing")
    result = run(_model_set(args), limit=args.limit, threads=args.threads, out_dir=out_dir)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0
