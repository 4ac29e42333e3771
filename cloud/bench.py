"""`hybridgen bench cloud-batching`: sequential `generate` vs continuous batching, side by side.

For each model: N concurrent requests of mixed prompt lengths (16 by default), each making
exactly `--new-tokens` tokens (64; EOS ignored so both sides do the same work), greedy.

* sequential: `model.generate` on one request after another (batch 1, the baseline);
* batched: the worker's own `Engine` (transformers continuous batching), all requests
  submitted at once from asyncio, streaming — time to first token measured per request.

Models: `bundled` (the current model set's cloud model), `random-90m` (a ~90M-parameter
random-weight Llama, built in a temp dir), `random-1b` (for a GPU), or a checkpoint folder.
Default: bundled (when installed) and random-90m. Runs unchanged on CUDA (bf16).

`--json` prints one object: the figures of the first model measured at the top level
(`sequential_tok_s`, `batched_tok_s`, `ratio`, `streams`, `p50_ttft_ms`, `p95_ttft_ms`,
`model`) and every model's figures under `runs`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROMPT_LENGTHS = (12, 40, 96, 24, 160, 64, 8, 128, 32, 200, 16, 80, 48, 112, 20, 140)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen bench cloud-batching",
        description="Throughput of sequential generate vs transformers continuous batching "
        "(the cloud worker's engine) on N concurrent requests of mixed prompt lengths.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--quick", action="store_true", help="fewer tokens, sequential baseline on 4 requests only"
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        help="bundled | random-90m | random-1b | a checkpoint folder "
        "(repeat; default: bundled if installed, and random-90m)",
    )
    parser.add_argument("--streams", type=int, default=16, help="concurrent requests (16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per request (64)")
    parser.add_argument("--threads", type=int, help="torch threads on CPU (default: all cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when present")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=1024,
        help="tokens per forward step of the batched engine (1024)",
    )
    return parser  # fmt: skip


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _prepare_model(spec: str, workdir: Path) -> tuple[str, Path] | None:
    """(label, checkpoint dir) for a --model value; None when `bundled` is not installed."""
    from models.random_model import make_random_llama

    if spec == "bundled":
        from broker.errors import NotFound
        from models.registry import resolve

        try:
            model_set = resolve()
        except NotFound:
            return None
        return f"bundled:{model_set.version}", model_set.cloud_dir
    if spec in ("random-90m", "random-1b"):
        preset = spec.split("-", 1)[1]
        tokenizer_dir = None
        try:
            from models.registry import resolve

            tokenizer_dir = resolve().tokenizer_dir
        except Exception:
            tokenizer_dir = None
        out = workdir / spec
        make_random_llama(out, preset=preset, tokenizer_dir=tokenizer_dir, context_length=512)
        return spec, out
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {spec!r}: not bundled/random-90m/random-1b nor a checkpoint")
    return str(path), path


def _prompts(engine: Any, streams: int, new_tokens: int) -> list[list[int]]:
    import torch

    room = engine.context_length - new_tokens - 1
    generator = torch.Generator().manual_seed(0)
    low = 8 if engine.vocab_size > 64 else 0  # skip the special tokens
    return [
        torch.randint(low, engine.vocab_size, (max(4, min(room, PROMPT_LENGTHS[i % 16])),),
                      generator=generator).tolist()
        for i in range(streams)
    ]  # fmt: skip


def _sequential(engine: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """tok/s of `generate` on one request after another."""
    import torch

    model = engine.model
    tokens, started = 0, time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            input_ids = torch.tensor([ids], device=engine.device)
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=engine.tokenizer.pad_token_id,
            )
            tokens += out.shape[1] - input_ids.shape[1]
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - started)


async def _batched(
    engine: Any, prompts: list[list[int]], new_tokens: int
) -> tuple[float, list[float]]:
    """(tok/s, time-to-first-token per request in ms) of all requests at once."""
    from cloud.engine import SamplingParams

    sampling = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    started = time.perf_counter()

    async def one(index: int, ids: list[int]) -> tuple[int, float]:
        first, count = None, 0
        async for delta in engine.generate(f"bench-{index}-{time.time_ns()}", ids, sampling):
            if first is None and delta.token_ids:
                first = time.perf_counter() - started
            count += len(delta.token_ids)
        return count, (first or 0.0) * 1000

    results = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
    elapsed = time.perf_counter() - started
    return sum(c for c, _ in results) / elapsed, [t for _, t in results]


async def _measure(label: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from cloud.engine import Engine, EngineConfig

    streams, new_tokens = args.streams, (32 if args.quick else args.new_tokens)
    config = EngineConfig(
        max_batch_requests=max(16, streams),
        max_batch_tokens=args.max_batch_tokens,
        cache_tokens=max(4096, streams * 512),
        threads=args.threads,
        device=args.device,
    )
    engine = await asyncio.to_thread(Engine.load, model_dir, config=config)
    try:
        params = sum(p.numel() for p in engine.model.parameters())
        prompts = _prompts(engine, streams, new_tokens)
        engine.start()
        await _batched(engine, prompts[:2], 4)  # warm-up (allocations, first kernels)
        await asyncio.to_thread(_sequential, engine, prompts[:1], 4)
        batched, ttft = await _batched(engine, prompts, new_tokens)
        baseline = prompts[:4] if args.quick else prompts
        sequential = await asyncio.to_thread(_sequential, engine, baseline, new_tokens)
    finally:
        await asyncio.to_thread(engine.close)
    return {
        "model": label,
        "params_m": round(params / 1e6, 1),
        "device": str(engine.device),
        "threads": engine.config.threads or __import__("torch").get_num_threads(),
        "streams": streams,
        "new_tokens": new_tokens,
        "sequential_tok_s": round(sequential, 1),
        "batched_tok_s": round(batched, 1),
        "ratio": round(batched / sequential, 2),
        "p50_ttft_ms": round(statistics.median(ttft), 1),
        "p95_ttft_ms": round(_percentile(ttft, 0.95), 1),
    }


def main(argv: list[str]) -> int:
    """Entry point of `hybridgen bench cloud-batching`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    specs = args.models or ["bundled", "random-90m"]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hg-bench-") as tmp:
        for spec in specs:
            prepared = _prepare_model(spec, Path(tmp))
            if prepared is None:
                runs.append({"model": spec, "skipped": "no model set installed "
                             "(run `hybridgen models build`)"})  # fmt: skip
                continue
            label, model_dir = prepared
            if not args.json:
                print(f"measuring {label} ...", file=sys.stderr)
            runs.append(asyncio.run(_measure(label, model_dir, args)))
    measured = [r for r in runs if "skipped" not in r]
    if not measured:
        print("no model could be measured", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**measured[0], "runs": runs}))
        return 0
    columns = ("model", "params_m", "device", "sequential_tok_s", "batched_tok_s", "ratio",
               "p50_ttft_ms", "p95_ttft_ms")  # fmt: skip
    print("  ".join(f"{c:>16}" for c in columns))
    for run in runs:
        print("  ".join(f"{run.get(c, '-')!s:>16}" for c in columns))
    for run in runs:
        if "skipped" in run:
            print(f"{run['model']}: skipped ({run['skipped']})")
    return 0
