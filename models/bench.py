"""`hybridgen bench edge-decode`: torch fp32 vs the edge's int4 and int8 builds, side by side.

One checkpoint, batch 1, a 32-token prompt, 128 new tokens (greedy, EOS ignored), threads set
explicitly, median of several runs. The roofline is the machine's read bandwidth (numpy, one
thread, a buffer far larger than the caches) divided by the bytes of weights read per decoded
token (every weight matrix once; an embedding table only used by a Gather reads one row).
Models: `bundled` (the CURRENT model set's edge model; a tiny set is built in a temporary
folder when none is installed) or `gpt2-small` (a GPT-2-small-sized Llama, random weights,
built on the fly).
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PROMPT_TOKENS = 32
NEW_TOKENS = 128


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


def weight_bytes_per_token(folder: Path) -> int:
    """Bytes of initializers read to decode one token with the ONNX model in `folder`.

    An initializer used only as the table of a Gather (token embedding) reads one row per
    token, so it is left out; everything else (matmul weights, norms) is read once.
    """
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    graph = model.graph
    gather_tables = {n.input[0] for n in graph.node if n.op_type.startswith("Gather")}
    other_uses = {i for n in graph.node if not n.op_type.startswith("Gather") for i in n.input}
    total = 0
    for init in graph.initializer:
        if init.name in gather_tables and init.name not in other_uses:
            continue
        external = {e.key: e.value for e in init.external_data}
        if "length" in external:
            total += int(external["length"])
        else:
            total += len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
    return total


def _time_torch(checkpoint: Path, prompt: list[int], new_tokens: int, runs: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        rates = []
        for _ in range(runs):
            started = time.perf_counter()
            out = model.generate(ids, **kwargs)
            elapsed = time.perf_counter() - started
            rates.append((out.shape[1] - len(prompt)) / elapsed)
    return statistics.median(rates)


def _time_edge(folder: Path, prompt: list[int], new_tokens: int, runs: int, threads: int):  # type: ignore[no-untyped-def]
    """(tokens/s, ttft seconds) medians for one onnxruntime-genai build."""
    import onnxruntime_genai as og

    from models.ort_edge import load_model

    model = load_model(folder, threads)

    def one() -> tuple[float, float]:
        params = og.GeneratorParams(model)
        total = len(prompt) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        generator.generate_next_token()
        ttft = time.perf_counter() - started
        produced = 1
        while not generator.is_done():
            generator.generate_next_token()
            produced += 1
        return produced / (time.perf_counter() - started), ttft

    one()  # warm-up
    results = [one() for _ in range(runs)]
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)


@contextlib.contextmanager
def _bundled_model(threads: int) -> Iterator[tuple[Path, dict[str, Path], str, int]]:
    """(edge checkpoint, {precision: onnx folder}, label, context) of the CURRENT model set."""
    from broker.errors import NotFound
    from models import edge_build, registry

    with tempfile.TemporaryDirectory(prefix="hg-bench-") as tmp:
        try:
            model_set = registry.resolve()
        except NotFound:
            from models.build import BuildOptions, build_model_set

            print("no model set installed: building a tiny one for the bench", file=sys.stderr)
            model_set = build_model_set(
                BuildOptions(profile="tiny", home=Path(tmp), version="bench", threads=threads,
                             progress=False, set_current=False)
            )  # fmt: skip
        folders: dict[str, Path] = {}
        for precision in ("int4", "int8"):
            if precision in model_set.edge_precisions:
                folders[precision] = model_set.edge_dir(precision)
            else:
                folders[precision] = edge_build.build_edge(
                    model_set.edge_checkpoint_dir, Path(tmp) / f"edge-{precision}", precision
                )
        yield (
            model_set.edge_checkpoint_dir,
            folders,
            f"bundled:{model_set.version}",
            model_set.edge_context_length,
        )


@contextlib.contextmanager
def _gpt2_small_model() -> Iterator[tuple[Path, dict[str, Path], str, int]]:
    """A GPT-2-small-sized Llama (124M parameters, random weights) and its int4/int8 builds."""
    from models import edge_build
    from models.random_model import make_random_llama

    with tempfile.TemporaryDirectory(prefix="hg-bench-gpt2s-") as tmp:
        checkpoint = make_random_llama(
            Path(tmp) / "checkpoint", preset="gpt2-small", tokenizer_vocab=512, context_length=1024
        )
        folders: dict[str, Path] = {
            p: edge_build.build_edge(checkpoint, Path(tmp) / f"edge-{p}", p)
            for p in ("int4", "int8")
        }
        yield checkpoint, folders, "gpt2-small-llama-124M-random", 1024


def run(model: str, *, threads: int, runs: int) -> dict[str, Any]:
    """Measure one model; the result dict of the bench's JSON."""
    import torch

    torch.set_num_threads(threads)
    source = _bundled_model(threads) if model == "bundled" else _gpt2_small_model()
    with source as (checkpoint, folders, label, context):
        new_tokens = min(NEW_TOKENS, context - PROMPT_TOKENS)
        rng = np.random.default_rng(0)
        prompt = [int(t) for t in rng.integers(8, 500, PROMPT_TOKENS)]
        torch_rate = _time_torch(checkpoint, prompt, new_tokens, runs)
        int4_rate, ttft = _time_edge(folders["int4"], prompt, new_tokens, runs, threads)
        int8_rate, _ = _time_edge(folders["int8"], prompt, new_tokens, runs, threads)
        bytes_per_token = weight_bytes_per_token(folders["int4"])
    bandwidth = measure_read_bandwidth()
    roofline_tok_s = bandwidth * 1e9 / bytes_per_token
    return {
        "torch_fp32_tok_s": round(torch_rate, 1),
        "edge_int4_tok_s": round(int4_rate, 1),
        "edge_int8_tok_s": round(int8_rate, 1),
        "ratio_int4": round(int4_rate / torch_rate, 2),
        "ratio_int8": round(int8_rate / torch_rate, 2),
        "ttft_ms": round(ttft * 1000, 2),
        "bytes_per_token": bytes_per_token,
        "bandwidth_gb_s": round(bandwidth, 2),
        "roofline_fraction": round(int4_rate / roofline_tok_s, 3),
        "model": label,
        "threads": threads,
        "runs": runs,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": new_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hybridgen bench edge-decode`."""
    parser = argparse.ArgumentParser(
        prog="hybridgen bench edge-decode",
        description="Decode speed at batch 1: torch fp32 vs onnxruntime-genai int4 and int8 "
        f"({PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, median of several runs).",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer runs (3 instead of 7)")
    parser.add_argument(
        "--model",
        choices=["bundled", "gpt2-small"],
        default="bundled",
        help="bundled: the CURRENT edge model (default); gpt2-small: a "
        "GPT-2-small-sized Llama with random weights, built on the fly",
    )
    parser.add_argument("--threads", type=int, default=1, help="threads for every runtime")
    parser.add_argument("--runs", type=int, help="timed runs per runtime (median reported)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)  # fmt: skip
    logging.basicConfig(level=logging.WARNING)
    runs = args.runs or (3 if args.quick else 7)
    result = run(args.model, threads=args.threads, runs=runs)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"edge-decode  model={result['model']}  threads={args.threads}  runs={runs}  "
          f"prompt={PROMPT_TOKENS}  new={result['new_tokens']}")  # fmt: skip
    print(f"  {'runtime':<12} {'tok/s':>9} {'x torch':>8}")
    print(f"  {'torch fp32':<12} {result['torch_fp32_tok_s']:>9.1f} {1.0:>8.2f}")
    print(f"  {'edge int4':<12} {result['edge_int4_tok_s']:>9.1f} {result['ratio_int4']:>8.2f}")
    print(f"  {'edge int8':<12} {result['edge_int8_tok_s']:>9.1f} {result['ratio_int8']:>8.2f}")
    print(f"  int4 ttft {result['ttft_ms']:.2f} ms; weights read per token "
          f"{result['bytes_per_token'] / 1e6:.2f} MB; read bandwidth "
          f"{result['bandwidth_gb_s']:.1f} GB/s; "
          f"roofline fraction {result['roofline_fraction']}")  # fmt: skip
    return 0
