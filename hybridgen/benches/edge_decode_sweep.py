"""`hybridgen bench edge-decode --sweep`: int4 builder options of the edge model, side by side.

Each variant is built from the same checkpoint into a temporary folder with
`models.lab.edge_build.build_edge(..., options=...)`, then all are loaded at once and measured in
alternation (each round runs every variant once, so drift on a shared machine hits them
alike): folder size, bytes of weights read per decoded token, bare-loop decode tokens/s
(32-token prompt, 128 new tokens, after the first), prefill tokens/s and time to first token
of a 256-token prompt, and top-1 agreement with the fp32 torch model under teacher forcing on
512 tokens of real text (CPython's help topics). Ratios are to the first variant, the
current `build_edge` default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hybridgen.benches import edge_decode as bench
from hybridgen.benches import edge_decode_measure as bench_measure

logger = logging.getLogger(__name__)

#: 512 rather than ~200: the standard error of a ~70% agreement is then ~2 points.
AGREEMENT_TOKENS = 512

UNTIED_INT4 = {"shared_embeddings": "false", "op_types_to_quantize": "MatMul/Gather"}

#: name -> builder `--extra_options` over `edge_build.INT4_OPTIONS` (the first is the default;
#: a "precision" entry builds that precision instead of int4). Untied variants export the
#: tied matrix twice (embedding GatherBlockQuantized + LM head MatMulNBits): the builder cannot
#: share an asymmetric or an int8 table between the two.
VARIANTS: dict[str, dict[str, str]] = {
    "b32-a4 (default)": {},
    "b16-a4": {"block_size": "16"},
    "b64-a4": {"block_size": "64"},
    "b128-a4": {"block_size": "128"},
    "b32-a1 (fp32 act)": {"accuracy_level": "1"},
    "b32-a2 (fp16 act)": {"accuracy_level": "2"},
    "b32-a4 untied": UNTIED_INT4,
    "b32-a4 untied fp32 emb": {"shared_embeddings": "false", "op_types_to_quantize": "MatMul"},
    "b32-a4 untied asym": {**UNTIED_INT4, "is_symmetric": "false"},
    "b32-a4 untied kquant": {**UNTIED_INT4, "algo_config": "k_quant"},
    "b32-a4 untied lm_head8": {**UNTIED_INT4, "matmul_mixed_precision": "last_matmul:int8"},
    "b16-a4 untied lm_head8": {
        **UNTIED_INT4,
        "block_size": "16",
        "matmul_mixed_precision": "last_matmul:int8",
    },
    "b32-a4 untied mixed8": {
        **UNTIED_INT4,
        "matmul_mixed_precision": "last_matmul:int8,mixed_layers:int8",
    },
    "int8 (reference)": {"precision": "int8"},
}


def reference_argmax(checkpoint: Path, tokens: list[int]) -> list[int]:
    """Top-1 next-token predictions of the fp32 torch model after each prefix of `tokens`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
    return [int(t) for t in logits.argmax(-1).tolist()]


def agreement(folder: Path, tokens: list[int], reference: list[int], threads: int) -> float:
    """Share of positions where the ONNX build's teacher-forced argmax equals `reference`."""
    from models import ort_edge

    predicted = ort_edge.teacher_forced_argmax(ort_edge.load_model(folder, threads), tokens)
    return sum(int(a == b) for a, b in zip(reference, predicted, strict=True)) / len(tokens)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_sweep(
    checkpoint: Path,
    *,
    threads: list[int],
    runs: int,
    variants: dict[str, dict[str, str]] | None = None,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Build and measure every variant; the sweep's JSON (one row per variant)."""
    from models.lab import edge_build
    from models.ort_edge import load_model

    variants = variants or VARIANTS
    load_start = bench_measure.load_average()
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hg-sweep-")))
        rows: list[dict[str, Any]] = []
        folders: dict[str, Path] = {}
        for index, (name, options) in enumerate(variants.items()):
            started = time.perf_counter()
            folder = work_dir / f"v{index}"
            builder = {k: v for k, v in options.items() if k != "precision"}
            precision = options.get("precision", "int4")
            try:
                edge_build.build_edge(checkpoint, folder, precision, options=builder)
            except Exception as exc:  # a combination this builder refuses: report, go on
                logger.warning("variant %s failed to build: %s", name, exc)
                rows.append({"variant": name, "options": options, "error": str(exc)})
                continue
            folders[name] = folder
            rows.append(
                {
                    "variant": name,
                    "precision": precision,
                    "options": edge_build.builder_options(precision, builder),
                    "bytes": _folder_bytes(folder),
                    "weight_bytes_per_token": bench.weight_bytes_per_token(folder),
                    "build_s": round(time.perf_counter() - started, 1),
                }
            )
        if not folders:
            raise RuntimeError("no variant could be built")
        first = next(iter(folders.values()))
        config = json.loads((first / "genai_config.json").read_text())["model"]
        vocab, context = int(config["vocab_size"]), int(config["context_length"])
        new_tokens = min(bench.NEW_TOKENS, context - bench.PROMPT_TOKENS)
        text = bench_measure.prompt_ids(first, min(AGREEMENT_TOKENS, context), vocab)
        reference = reference_argmax(checkpoint, text)
        prompt = bench_measure.prompt_ids(first, bench.PROMPT_TOKENS, vocab)
        long_prompt = bench_measure.prompt_ids(first, min(bench.PREFILL_TOKENS, context - 2), vocab)
        by_name = {row["variant"]: row for row in rows}
        for name, folder in folders.items():
            by_name[name]["top1_agreement"] = round(
                agreement(folder, text, reference, threads[0]), 4
            )
        for count in threads:
            models = {name: load_model(folder, count) for name, folder in folders.items()}
            samples: dict[str, list[tuple[float, float, float]]] = {n: [] for n in models}
            for model in models.values():  # warm-up
                bench_measure.raw_generate(model, prompt, 8)
                bench_measure.raw_prefill(model, long_prompt)
            for _ in range(runs):
                for name, model in models.items():
                    decode = bench_measure.raw_generate(model, prompt, new_tokens)["decode_tok_s"]
                    prefill = bench_measure.raw_prefill(model, long_prompt)
                    samples[name].append((decode, prefill["prefill_tok_s"], prefill["ttft_s"]))
            base = samples[next(iter(models))]
            for name, values in samples.items():
                row = by_name[name]
                suffix = f"_{count}t"
                row["decode_tok_s" + suffix] = round(statistics.median(v[0] for v in values), 1)
                row["prefill_tok_s" + suffix] = round(statistics.median(v[1] for v in values), 1)
                row["ttft_ms" + suffix] = round(statistics.median(v[2] for v in values) * 1e3, 1)
                row["decode_vs_default" + suffix] = round(
                    statistics.median(v[0] / b[0] for v, b in zip(values, base, strict=True)), 3
                )
                row["prefill_vs_default" + suffix] = round(
                    statistics.median(v[1] / b[1] for v, b in zip(values, base, strict=True)), 3
                )
            del models
    return {
        "checkpoint": str(checkpoint),
        "threads": threads,
        "runs": runs,
        "agreement_tokens": len(text),
        "prompt_tokens": bench.PROMPT_TOKENS,
        "new_tokens": new_tokens,
        "prefill_tokens": len(long_prompt),
        "cpu": bench_measure.cpu_info(),
        "load_average_start": load_start,
        "load_average_end": bench_measure.load_average(),
        "variants": rows,
    }


def print_sweep(result: dict[str, Any]) -> None:
    """The sweep as a table, one line per variant."""
    cpu = result["cpu"]
    print(f"edge-decode --sweep  checkpoint={result['checkpoint']}  runs={result['runs']}  "
          f"agreement over {result['agreement_tokens']} tokens  cpu {cpu['model']}  load "
          f"{result['load_average_start']} -> {result['load_average_end']}")  # fmt: skip
    header = f"  {'variant':<24} {'MB':>6} {'agree':>6}"
    for count in result["threads"]:
        header += f" | {count}t: {'dec':>6} {'x':>5} {'pre':>6} {'x':>5} {'ttft':>6}"
    print(header)
    for row in result["variants"]:
        if "error" in row:
            print(f"  {row['variant']:<24} build failed: {row['error'][:80]}")
            continue
        line = f"  {row['variant']:<24} {row['bytes'] / 1e6:>6.1f} {row['top1_agreement']:>6.3f}"
        for count in result["threads"]:
            s = f"_{count}t"
            line += (f" |     {row['decode_tok_s' + s]:>6.1f} {row['decode_vs_default' + s]:>5.2f}"
                     f" {row['prefill_tok_s' + s]:>6.1f} {row['prefill_vs_default' + s]:>5.2f}"
                     f" {row['ttft_ms' + s]:>6.1f}")  # fmt: skip
        print(line)


def main_sweep(args: argparse.Namespace, *, threads: list[int], runs: int) -> int:
    """`--sweep` of `hybridgen bench edge-decode` (its parsed arguments)."""
    variants = VARIANTS
    if getattr(args, "variants", None):
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in wanted if not any(name.startswith(v) for name in VARIANTS)]
        if unknown:
            print(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}", file=sys.stderr)
            return 2
        default = next(iter(VARIANTS))  # always measured: the ratios are to it
        variants = {
            n: o
            for n, o in VARIANTS.items()
            if n == default or any(n.startswith(v) for v in wanted)
        }
    with bench.bundled_model(threads[0], args.edge_dir, args.checkpoint, ()) as source:
        result = run_sweep(source[0], threads=threads, runs=runs, variants=variants)
    if args.json:
        print(json.dumps(result))
    else:
        print_sweep(result)
    return 0
