"""`hybridgen bench edge-decode`: the edge model at batch 1, measured side by side in one run.

For each thread count (default 1 and 2), on one checkpoint and its onnxruntime-genai builds:

- torch fp32 `generate` vs the int4 and int8 builds (32-token prompt, 128 new tokens, greedy,
  EOS ignored): tokens/s and the ratios `ratio_int4` / `ratio_int8` (goal: int4 >= 8x);
- time to first token and prefill tokens/s of the int4 build for a 256-token prompt;
- `raw_tok_s`, the bare onnxruntime-genai loop (`Generator`, `append_tokens`,
  `generate_next_token`, `get_next_tokens`), next to `runtime_tok_s`, the project's
  `edge.runtime.EdgeRuntime` serving the same request through `submit(...)` and its async
  events (prompt perplexity, per-token logprob, detokenizing, scheduling); both are decode
  rates after the first token, runs alternate, and `runtime_vs_raw` is the median of the
  per-run ratios (goal >= 0.95);
- `roofline_fraction`: raw decode tokens/s x bytes read per token / measured read bandwidth
  (goal >= 0.6). Bytes per token: every weight initializer once (an embedding table only
  used by a Gather reads one row, left out; a tied table that is also the LM head's int4
  MatMul weight counts) plus the KV cache read at the mean decode context. Bandwidth: numpy
  sums of a buffer far larger than the caches, one per thread, run concurrently; the better
  of a measurement just before and just after the edge runs.

The JSON also records the CPU (model name, avx2/avx512/amx flags), load average and RSS:
figures from a busy machine are not comparable. Medians of several runs.

Models: `bundled` (explicit `--edge-dir`/`--checkpoint` first, else the CURRENT model set's
edge model, else a tiny set built in a temporary folder) or `gpt2-small` (a GPT-2-small-sized
Llama, random weights, built on the fly). `--sweep` runs the int4 builder-option sweep of
`models.bench_sweep` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hybridgen.benches.edge_decode_measure import (
    cpu_info,
    load_average,
    prompt_ids,
    rss_mb,
    time_edge,
    time_generate,
    time_torch,
)

logger = logging.getLogger(__name__)

PROMPT_TOKENS = 32
NEW_TOKENS = 128
PREFILL_TOKENS = 256
GOALS = {"ratio_int4": 8.0, "roofline_fraction": 0.6, "runtime_vs_raw": 0.95}

#: (checkpoint, {precision: onnx folder}, label, context length)
Source = tuple[Path, dict[str, Path], str, int]


def measure_read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Single-thread memory read bandwidth in GB/s (median of `repeats` full-buffer sums)."""
    buffer = np.ones(megabytes * (1 << 20) // 8, dtype=np.float64)
    buffer.sum()  # fault the pages in
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - started)
    return buffer.nbytes / statistics.median(times) / 1e9


def read_bandwidth(threads: int) -> float:
    """Read bandwidth in GB/s of `threads` threads at once: the sum of concurrent
    `measure_read_bandwidth` runs (numpy releases the GIL while it sums)."""
    if threads <= 1:
        return measure_read_bandwidth()
    results: list[float] = []
    barrier = threading.Barrier(threads)

    def one() -> None:
        barrier.wait()
        results.append(measure_read_bandwidth())

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(results)


def _initializer_bytes(init: Any) -> int:
    import onnx

    external = {e.key: e.value for e in init.external_data}
    if "length" in external:
        return int(external["length"])
    return len(init.raw_data) or int(onnx.numpy_helper.to_array(init).nbytes)


def weight_bytes_per_token(folder: Path) -> int:
    """Bytes of initializers read to decode one token with the ONNX model in `folder`.

    An initializer whose only readers are Gathers (a token embedding table, or its int4
    scales and zero points feeding a GatherBlockQuantized, possibly through a Reshape) reads
    one row per token and is left out. Everything else is read once: matmul weights, norms,
    and a tied embedding that is also the LM head's int4 MatMul weight (the builder's default
    for a tied model: one int4 table, reshaped for the GatherBlockQuantized, read whole by the
    `lm_head` MatMulNBits).
    """
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    graph = model.graph
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def gather_only(name: str, depth: int = 0) -> bool:
        users = consumers.get(name, [])
        if not users or depth > 4:
            return False
        for node in users:
            if node.op_type.startswith("Gather") and node.input[1] != name:
                continue  # table, scales or zero points of a lookup; input 1 is the indices
            passes_on = node.op_type in ("Reshape", "Cast", "Identity") and node.input[0] == name
            if passes_on and all(gather_only(out, depth + 1) for out in node.output):
                continue
            return False
        return True

    return sum(_initializer_bytes(i) for i in graph.initializer if not gather_only(i.name))


def kv_bytes_per_position(folder: Path) -> int:
    """Bytes of KV cache (keys and values of every layer) per context position.

    Shape from `genai_config.json` (layers, KV heads, head size), element type from the
    model's `past_key_values.*` inputs (float32 on CPU).
    """
    import onnx

    decoder = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"][
        "decoder"
    ]
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    kinds = [v.type.tensor_type.elem_type for v in model.graph.input]
    names = [v.name for v in model.graph.input]
    past = [k for n, k in zip(names, kinds, strict=True) if n.startswith("past_key_values")]
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(past[0]).itemsize if past else 4
    heads = int(decoder.get("num_key_value_heads") or decoder["num_attention_heads"])
    return 2 * int(decoder["num_hidden_layers"]) * heads * int(decoder["head_size"]) * itemsize


@contextlib.contextmanager
def bundled_model(
    threads: int, edge_dir: Path | None = None, checkpoint: Path | None = None,
    precisions: tuple[str, ...] = ("int4", "int8"),
) -> Iterator[Source]:  # fmt: skip
    """The edge model to measure: `edge_dir`/`checkpoint` when given, else the CURRENT model
    set's, else a tiny set built in a temporary folder. Missing builds are made there too."""
    from broker.errors import BadRequest, NotFound
    from models import registry
    from models.lab import edge_build

    with tempfile.TemporaryDirectory(prefix="hg-bench-") as tmp:
        folders: dict[str, Path] = {}
        if checkpoint is not None:
            if edge_dir is not None:
                folders["int4"] = edge_dir
            label = f"dir:{(edge_dir or checkpoint).name}"
            context = _context_of(checkpoint)
        elif edge_dir is not None:
            raise BadRequest("--edge-dir needs --checkpoint (the fp32 model torch runs)")
        else:
            try:
                model_set = registry.resolve()
            except NotFound:
                from models.lab.build import BuildOptions, build_model_set

                print("no model set installed and no --edge-dir/--checkpoint: building a tiny "
                      "one for the bench", file=sys.stderr)  # fmt: skip
                model_set = build_model_set(
                    BuildOptions(profile="tiny", home=Path(tmp), version="bench",
                                 threads=threads, progress=False, set_current=False)
                )  # fmt: skip
            checkpoint = model_set.edge_checkpoint_dir
            for precision in precisions:
                if precision in model_set.edge_precisions:
                    folders[precision] = model_set.edge_dir(precision)
            label = f"bundled:{model_set.version}"
            context = model_set.edge_context_length
        for precision in precisions:
            if precision not in folders:
                folders[precision] = edge_build.build_edge(
                    checkpoint, Path(tmp) / f"edge-{precision}", precision
                )
        yield checkpoint, folders, label, context


def _context_of(checkpoint: Path) -> int:
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or 2048)


@contextlib.contextmanager
def gpt2_small_model() -> Iterator[Source]:
    """A GPT-2-small-sized Llama (124M parameters, random weights) and its int4/int8 builds."""
    from models.lab import edge_build
    from models.lab.random_model import make_random_llama

    with tempfile.TemporaryDirectory(prefix="hg-bench-gpt2s-") as tmp:
        checkpoint = make_random_llama(
            Path(tmp) / "checkpoint", preset="gpt2-small", tokenizer_vocab=512, context_length=1024
        )
        folders: dict[str, Path] = {
            p: edge_build.build_edge(checkpoint, Path(tmp) / f"edge-{p}", p)
            for p in ("int4", "int8")
        }
        yield checkpoint, folders, "gpt2-small-llama-124M-random", 1024


def run(
    model: str, *, threads: int | list[int], runs: int, edge_dir: Path | None = None,
    checkpoint: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Measure one model at each thread count; the result dict of the bench's JSON.

    The top-level figures are those of the first thread count; `by_threads` has them all.
    """
    import torch
    from transformers import AutoModelForCausalLM

    counts = [threads] if isinstance(threads, int) else list(threads)
    load_start = load_average()
    source = (
        gpt2_small_model()
        if model == "gpt2-small"
        else bundled_model(counts[0], edge_dir, checkpoint)
    )
    with source as (checkpoint_dir, folders, label, context):
        int4 = folders["int4"]
        vocab = int(json.loads((int4 / "genai_config.json").read_text())["model"]["vocab_size"])
        new_tokens = min(NEW_TOKENS, context - PROMPT_TOKENS)
        prefill_tokens = min(PREFILL_TOKENS, context - 2)
        prompt = prompt_ids(int4, PROMPT_TOKENS, vocab)
        long_prompt = prompt_ids(int4, prefill_tokens, vocab)
        weight_bytes = weight_bytes_per_token(int4)
        kv_bytes = kv_bytes_per_position(int4) * (PROMPT_TOKENS + new_tokens // 2)
        bytes_per_token = weight_bytes + kv_bytes
        torch_model = AutoModelForCausalLM.from_pretrained(
            str(checkpoint_dir), dtype=torch.float32
        ).eval()
        by_threads = []
        for count in counts:
            torch.set_num_threads(count)
            torch_rate = time_torch(torch_model, prompt, new_tokens, runs)
            bandwidth_before = read_bandwidth(count)
            edge = time_edge(int4, count, prompt, long_prompt, new_tokens, runs)
            int8_rate = time_generate(folders["int8"], count, prompt, new_tokens, runs)
            # The machine's best, next to the decode runs (another job may be reading too).
            bandwidth = max(bandwidth_before, read_bandwidth(count))
            roofline_tok_s = bandwidth * 1e9 / bytes_per_token
            by_threads.append(
                {
                    "threads": count,
                    "torch_fp32_tok_s": round(torch_rate, 1),
                    "edge_int4_tok_s": round(edge["edge_int4_tok_s"], 1),
                    "edge_int8_tok_s": round(int8_rate, 1),
                    "ratio_int4": round(edge["edge_int4_tok_s"] / torch_rate, 2),
                    "ratio_int8": round(int8_rate / torch_rate, 2),
                    "raw_tok_s": round(edge["raw_tok_s"], 1),
                    "runtime_tok_s": round(edge["runtime_tok_s"], 1),
                    "runtime_vs_raw": round(edge["runtime_vs_raw"], 3),
                    "runtime_tokens": edge["runtime_tokens"],
                    "ttft_ms": round(edge["ttft_ms"], 2),
                    "runtime_ttft_ms": round(edge["runtime_ttft_ms"], 2),
                    "prefill_tok_s": round(edge["prefill_tok_s"], 1),
                    "bandwidth_gb_s": round(bandwidth, 2),
                    "roofline_tok_s": round(roofline_tok_s, 1),
                    "roofline_fraction": round(edge["raw_tok_s"] / roofline_tok_s, 3),
                    "edge_rss_mb": round(edge["edge_rss_mb"], 1),
                }
            )
        del torch_model
    return {
        **by_threads[0],
        "model": label,
        "edge_dir": str(int4) if model != "gpt2-small" else None,
        "cpu": cpu_info(),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "rss_mb": round(rss_mb(), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
        "runs": runs,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": new_tokens,
        "prefill_tokens": prefill_tokens,
        "weight_bytes_per_token": weight_bytes,
        "kv_bytes_per_token": kv_bytes,
        "bytes_per_token": bytes_per_token,
        "goals": GOALS,
        "by_threads": by_threads,
    }


def _print_table(result: dict[str, Any]) -> None:
    cpu = result["cpu"]
    flags = ",".join(f for f, on in cpu["flags"].items() if on) or "-"
    print(f"edge-decode  model={result['model']}  runs={result['runs']}  "
          f"prompt={result['prompt_tokens']}  new={result['new_tokens']}  "
          f"prefill={result['prefill_tokens']}")  # fmt: skip
    print(f"  cpu {cpu['model']} ({cpu['logical_cpus']} cpus; {flags}); load "
          f"{result['load_average_start']} -> {result['load_average_end']}; "
          f"rss {result['rss_mb']:.0f} MB")  # fmt: skip
    print(f"  bytes/token {result['bytes_per_token'] / 1e6:.2f} MB (weights "
          f"{result['weight_bytes_per_token'] / 1e6:.2f}, kv "
          f"{result['kv_bytes_per_token'] / 1e6:.2f})")  # fmt: skip
    columns = [("threads", "threads", "d"), ("torch_fp32_tok_s", "torch", ".1f"),
               ("edge_int4_tok_s", "int4", ".1f"), ("ratio_int4", "x torch", ".2f"),
               ("edge_int8_tok_s", "int8", ".1f"), ("raw_tok_s", "raw dec", ".1f"),
               ("runtime_tok_s", "runtime", ".1f"), ("runtime_vs_raw", "rt/raw", ".3f"),
               ("prefill_tok_s", "prefill", ".1f"), ("ttft_ms", "ttft ms", ".1f"),
               ("runtime_ttft_ms", "rt ttft", ".1f"), ("bandwidth_gb_s", "GB/s", ".1f"),
               ("roofline_fraction", "roofline", ".3f")]  # fmt: skip
    print("  " + " ".join(f"{title:>9}" for _, title, _ in columns))
    for row in result["by_threads"]:
        print("  " + " ".join(f"{row[key]:>9{fmt}}" for key, _, fmt in columns))
    goals = ", ".join(f"{k} >= {v}" for k, v in result["goals"].items())
    print(f"  goals: {goals}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hybridgen bench edge-decode`."""
    parser = argparse.ArgumentParser(
        prog="hybridgen bench edge-decode",
        description="The edge model at batch 1: torch fp32 vs onnxruntime-genai int4/int8, "
        "bare loop vs EdgeRuntime, prefill and roofline (median of several runs).",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer runs (3 instead of 7)")
    parser.add_argument(
        "--model",
        choices=["bundled", "gpt2-small"],
        default="bundled",
        help="bundled: --edge-dir/--checkpoint, else the CURRENT edge model (default); "
        "gpt2-small: a GPT-2-small-sized Llama with random weights, built on the fly",
    )
    parser.add_argument("--edge-dir", type=Path, help="int4 onnxruntime-genai folder")
    parser.add_argument("--checkpoint", type=Path, help="its fp32 Hugging Face checkpoint")
    parser.add_argument(
        "--threads", default="1,2", help="comma-separated thread counts (default 1,2)"
    )
    parser.add_argument("--runs", type=int, help="timed runs per runtime (median reported)")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="int4 builder-option sweep instead",
    )
    parser.add_argument(
        "--variants", help="with --sweep: comma-separated name prefixes of the variants to build"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # fmt: skip
    logging.basicConfig(level=logging.WARNING)
    runs = args.runs or (3 if args.quick else 7)
    try:
        threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads: {args.threads!r} is not a list of integers")
    if not threads or min(threads) < 1:
        parser.error("--threads needs positive counts")
    if args.sweep:
        from hybridgen.benches import edge_decode_sweep as bench_sweep

        return bench_sweep.main_sweep(args, threads=threads, runs=runs)
    result = run(
        args.model, threads=threads, runs=runs, edge_dir=args.edge_dir, checkpoint=args.checkpoint
    )
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0
