"""`hybridgen bench cloud-batching`: the cloud engine, one request at a time vs batched.

Side by side, in one run, on the same 16 chat-templated prompts of varied length (37-375
tokens with SmolLM2's template, 1646 in all) x 64 new tokens each (EOS ignored, greedy),
with `--threads` torch threads (2):

* `sequential_tok_s`: the engine serving one request after another;
* `batched_tok_s`: all requests submitted at once to the engine (time to first token per
  request, p50/p95);
* `padded_generate_tok_s`: plain `model.generate` on the same prompts as one left-padded
  batch, same dtype, EOS allowed but not stopping (as the engine's `ignore_eos`);
* `ratio` = batched / sequential, `vs_padded` = batched / padded;
* where the time went (engine counters of the batched and the sequential run: prefill
  seconds and tokens, decode steps, ms per step, rows per step, rebuilds);
* greedy parity: the engine's batched answers against padded `generate`'s, and with
  `--dtype both` (the default, every figure in fp32 and in bf16) bf16's against fp32's:
  outputs identical up to and including the first EOS (the answer; after it the
  `ignore_eos` filler amplifies the smallest numeric difference), and the token agreement.

Model: `--model-dir DIR` (an HF checkpoint folder), or `--model` bundled | random-90m |
random-1b | DIR (repeatable); default: the current model set's cloud checkpoint (a random
~90M Llama when no model set is installed).

Measured (four runs, 2 threads of a 2-core AMD EPYC VM with AVX512_BF16 and no AMX,
shared with other jobs, so figures move by up to a quarter from run to run;
SmolLM2-135M-Instruct), tok/s:

    dtype     sequential  batched  padded generate  ratio    vs_padded
    float32   12.6-15.2   87-106   44-50            6.1-8.3  1.9-2.4
    bfloat16  24-27       133-180  82-93            5.5-7.2  1.6-2.0

Where the time goes (bf16, a quiet run): batched, prefill 1.6 s (1862 padded tokens for
1646 real, ~1150 tok/s) + 66 decode steps of 61 ms (15.3 rows) + 5 rebuilds 0.1 s;
sequential, prefill 1.8 s + 1008 one-row steps of 36 ms. The decode step alone batches
~9.5x (16 rows in 61 ms vs one in 36); the prefill, the same work either way and ~28% of
the batched run, and two partly filled steps while the later prompts prefill bring the
end-to-end ratio to ~7. Greedy answers of the batched engine match padded `generate`
16/16 in fp32 every run (bf16: 10/16, 78% of tokens, as batch shapes change bf16
rounding); bf16 vs fp32: 9/16 answers identical, 73% of tokens (13/16, 87% in one run).

`--json` prints one object: the first dtype's figures at the top level, every run under
`runs`, and `parity_bf16_vs_fp32` when both dtypes ran.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: User turns of the benchmark prompts: short questions and longer pasted contexts.
_CONTEXT = (
    "The cloud tier of this system runs a small language model behind a message bus. "
    "Requests arrive from edge nodes when the local model is unsure; each one carries a "
    "prompt, sampling options and a deadline. Workers share a queue group, admit work only "
    "when they have room, stream tokens back as they are produced and report a heartbeat. "
)
QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "Summarise this text: " + _CONTEXT,
    "Give me a short recipe for pancakes with the quantities for four people.",
    "Read this and tell me what the workers do: " + _CONTEXT * 2,
    "How do I reverse a list in Python? Show an example.",
    "Translate to French: the weather is nice today and we are going to the beach.",
    "What could go wrong in this design? " + _CONTEXT * 3,
    "Name a famous painting by Vermeer.",
    "Write a limerick about a cat who learned to code.",
    "Given the following notes, draft a status update: " + _CONTEXT * 4,
    "Why do we have seasons on Earth?",
    "Which questions would you ask about this system? " + _CONTEXT * 5,
    "Suggest a name for a bakery.",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen bench cloud-batching",
        description="The cloud engine serving N chat requests one at a time vs all at once, "
        "next to plain padded model.generate, in fp32 and bf16.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--quick", action="store_true", help="32 tokens, sequential baseline on 4 of the requests"
    )
    parser.add_argument("--model-dir", type=Path, help="an HF checkpoint folder")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        help="bundled | random-90m | random-1b | a checkpoint folder (repeat; "
        "default: the current model set's cloud checkpoint)",
    )
    parser.add_argument("--streams", type=int, default=16, help="concurrent requests (16)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per request (64)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when present")
    parser.add_argument(
        "--dtype",
        choices=("both", "auto", "float32", "bfloat16"),
        default="both",
        help="dtypes to measure (both: fp32 and bf16)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=1024,
        help="prompt tokens per prefill forward of the engine (1024)",
    )
    return parser  # fmt: skip


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _prepare_model(spec: str, workdir: Path) -> tuple[str, Path] | None:
    """(label, checkpoint dir) for a --model value; None when `bundled` is not installed."""
    if spec == "bundled":
        from broker.errors import NotFound
        from models.registry import resolve

        try:
            model_set = resolve()
        except NotFound:
            return None
        return f"bundled:{model_set.version}", model_set.cloud_dir
    if spec in ("random-90m", "random-1b"):
        from models.lab.random_model import make_random_llama

        out = workdir / spec
        make_random_llama(out, preset=spec.split("-", 1)[1], context_length=1024)
        return spec, out
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {spec!r}: not bundled/random-90m/random-1b nor a checkpoint")
    return path.name, path


def cpu_description() -> str:
    """CPU model name and its avx2 / avx512_bf16 / amx flags (Linux), else the platform."""
    name, flags = platform.processor() or platform.machine(), set[str]()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name.startswith("AMD"):
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    present = [f for f in ("avx2", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(present) or 'no avx2/avx512_bf16/amx'})"


def _prompts(engine: Any, streams: int, new_tokens: int) -> list[list[int]]:
    """Chat-templated prompt ids (raw text where the tokenizer has no chat template)."""
    tokenizer, room = engine.tokenizer, engine.context_length - new_tokens
    prompts = []
    for index in range(streams):
        question = QUESTIONS[index % len(QUESTIONS)]
        messages = [{"role": "user", "content": question}]
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # no chat template
            text = question
        prompts.append(engine.encode(str(text))[-room:])
    return prompts


async def _run_engine(
    engine: Any, prompts: list[list[int]], new_tokens: int, *, concurrent: bool
) -> tuple[float, list[float], list[list[int]]]:
    """(tok/s, time to first token per request in ms, output ids) through the engine."""
    from serving.sampling import SamplingParams

    sampling = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    async def one(index: int, ids: list[int]) -> tuple[list[int], float]:
        started, first, out = time.perf_counter(), None, []
        async for delta in engine.generate(f"bench-{index}-{time.time_ns()}", ids, sampling):
            if first is None and delta.token_ids:
                first = time.perf_counter() - started
            out += delta.token_ids
        return out, (first or 0.0) * 1000

    started = time.perf_counter()
    if concurrent:
        results = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
    else:
        results = [await one(i, ids) for i, ids in enumerate(prompts)]
    elapsed = time.perf_counter() - started
    outputs = [out for out, _ in results]
    return sum(map(len, outputs)) / elapsed, [t for _, t in results], outputs


def _padded_generate(
    engine: Any, prompts: list[list[int]], new_tokens: int, threads: int | None
) -> tuple[float, list[list[int]]]:
    """(tok/s, output ids) of one left-padded `model.generate` call on all prompts."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    pad = engine.tokenizer.pad_token_id
    pad = pad if pad is not None else engine.eos_ids[0]
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    ids, mask = ids.to(engine.device), mask.to(engine.device)
    # Like the engine's ignore_eos: EOS may come out, and generation goes on past it.
    config = copy.deepcopy(engine.model.generation_config)
    config.eos_token_id, config.pad_token_id = None, pad
    config.max_new_tokens, config.do_sample = new_tokens, False
    started = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(ids, attention_mask=mask, generation_config=config)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    new = out[:, width:]
    return new.numel() / elapsed, new.tolist()


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    """The answer proper: up to and including the first EOS (after it, `ignore_eos`
    filler, where small numeric differences grow fastest)."""
    end = next((i for i, token in enumerate(ids) if token in eos), len(ids) - 1)
    return ids[: end + 1]


def _agreement(a: list[list[int]], b: list[list[int]], eos: list[int]) -> dict[str, Any]:
    """Identical answers (up to the first EOS), and the share of positions with the same
    token over those answers."""
    pairs = [(_until_eos(x, set(eos)), _until_eos(y, set(eos))) for x, y in zip(a, b, strict=True)]
    same = sum(x == y for x, y in pairs)
    total = sum(max(len(x), len(y)) for x, y in pairs) or 1
    equal = sum(p == q for x, y in pairs for p, q in zip(x, y, strict=False))
    return {"identical": same, "of": len(a), "token_agreement": round(equal / total, 4)}


def _breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    d = {k: after[k] - before[k] for k in before if isinstance(before[k], float)}
    steps = d.get("decode_steps", 0) or 1
    return {
        "prefill_s": round(d["prefill_s"], 2),
        "prefill_chunks": int(d["prefill_chunks"]),
        "prefill_real_tokens": int(d["prefill_real_tokens"]),
        "prefill_padded_tokens": int(d["prefill_padded_tokens"]),
        "decode_s": round(d["decode_s"], 2),
        "decode_steps": int(d["decode_steps"]),
        "decode_ms_per_step": round(1000 * d["decode_s"] / steps, 1),
        "mean_rows_per_step": round(d["decode_live_rows"] / steps, 1),
        "rebuild_s": round(d["rebuild_s"], 2),
        "rebuilds": int(d["rebuilds"]),
    }


async def _measure(
    label: str, model_dir: Path, dtype: str, args: argparse.Namespace
) -> dict[str, Any]:
    from cloud.engine import Engine, EngineConfig, call_in_fresh_thread

    streams, new_tokens = args.streams, (32 if args.quick else args.new_tokens)
    config = EngineConfig(
        max_batch_requests=max(16, streams),
        max_batch_tokens=args.max_batch_tokens,
        cache_tokens=None,
        threads=args.threads,
        device=args.device,
        dtype=dtype,
    )
    engine = await asyncio.to_thread(Engine.load, model_dir, config=config)
    try:
        prompts = _prompts(engine, streams, new_tokens)
        engine.start()
        await _run_engine(engine, prompts[:2], 4, concurrent=True)  # warm-up
        await asyncio.to_thread(
            call_in_fresh_thread, partial(_padded_generate, engine, prompts[:2], 2, args.threads)
        )
        before = engine.stats()
        batched, ttft, outputs = await _run_engine(engine, prompts, new_tokens, concurrent=True)
        breakdown = _breakdown(before, engine.stats())
        padded, padded_out = await asyncio.to_thread(
            call_in_fresh_thread,
            partial(_padded_generate, engine, prompts, new_tokens, args.threads),
        )
        baseline = prompts[::4] if args.quick else prompts  # --quick: 4, short to long
        await _run_engine(engine, prompts[:1], 4, concurrent=False)  # warm-up, one row
        before = engine.stats()
        sequential, _, _ = await _run_engine(engine, baseline, new_tokens, concurrent=False)
        sequential_breakdown = _breakdown(before, engine.stats())
    finally:
        await asyncio.to_thread(engine.close)
    lengths = [len(p) for p in prompts]
    return {
        "model": label,
        "params_m": round(sum(p.numel() for p in engine.model.parameters()) / 1e6, 1),
        "device": str(engine.device),
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "threads": args.threads,
        "cpu": cpu_description(),
        "streams": streams,
        "new_tokens": new_tokens,
        "prompt_tokens": {"min": min(lengths), "max": max(lengths), "sum": sum(lengths)},
        "sequential_tok_s": round(sequential, 1),
        "batched_tok_s": round(batched, 1),
        "padded_generate_tok_s": round(padded, 1),
        "ratio": round(batched / sequential, 2),
        "vs_padded": round(batched / padded, 2),
        "p50_ttft_ms": round(statistics.median(ttft), 1),
        "p95_ttft_ms": round(_percentile(ttft, 0.95), 1),
        "batched_vs_padded_greedy": _agreement(outputs, padded_out, engine.eos_ids),
        "_eos": engine.eos_ids,
        "batched_breakdown": breakdown,
        "sequential_breakdown": sequential_breakdown,
        "_outputs": outputs,
    }


def _dtypes(choice: str) -> list[str]:
    return ["float32", "bfloat16"] if choice == "both" else [choice]


COLUMNS = ("model", "dtype", "sequential_tok_s", "batched_tok_s", "padded_generate_tok_s",
           "ratio", "vs_padded", "p50_ttft_ms")  # fmt: skip


def main(argv: list[str]) -> int:
    """Entry point of `hybridgen bench cloud-batching`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    specs = ([str(args.model_dir)] if args.model_dir else []) + (args.models or [])
    runs: list[dict[str, Any]] = []
    parity: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hg-bench-") as tmp:
        queue = specs or ["bundled"]
        for spec in queue:
            prepared = _prepare_model(spec, Path(tmp))
            if prepared is None:
                runs.append({"model": spec, "skipped": "no model set installed (run `hybridgen "
                             "models build`, or pass --model-dir DIR)"})  # fmt: skip
                if not specs:  # the default: measure a random ~90M Llama instead
                    queue.append("random-90m")
                continue
            label, model_dir = prepared
            measured: dict[str, dict[str, Any]] = {}
            for dtype in _dtypes(args.dtype):
                if not args.json:
                    print(f"measuring {label} ({dtype}) ...", file=sys.stderr)
                measured[dtype] = asyncio.run(_measure(label, model_dir, dtype, args))
                runs.append(measured[dtype])
            if "float32" in measured and "bfloat16" in measured:
                parity[label] = _agreement(
                    measured["bfloat16"]["_outputs"],
                    measured["float32"]["_outputs"],
                    measured["float32"]["_eos"],
                )
    for run in runs:
        run.pop("_outputs", None)
        run.pop("_eos", None)
    done = [r for r in runs if "skipped" not in r]
    if not done:
        print("no model could be measured: " + "; ".join(r["skipped"] for r in runs),
              file=sys.stderr)  # fmt: skip
        return 1
    if args.json:
        print(json.dumps({**done[0], "parity_bf16_vs_fp32": parity, "runs": runs}))
        return 0
    print(f"cpu: {done[0]['cpu']}, threads: {args.threads}, {done[0]['streams']} streams x "
          f"{done[0]['new_tokens']} tokens, prompts {done[0]['prompt_tokens']}")  # fmt: skip
    print("  ".join(f"{c:>14}" for c in COLUMNS))
    for run in runs:
        print("  ".join(f"{run.get(c, '-')!s:>14}" for c in COLUMNS))
        if "batched_breakdown" in run:
            print(f"{'':>14}  batched: {run['batched_breakdown']}")
            print(f"{'':>14}  sequential: {run['sequential_breakdown']}")
            print(f"{'':>14}  batched vs padded generate, greedy answers: "
                  f"{run['batched_vs_padded_greedy']}")  # fmt: skip
        if "skipped" in run:
            print(f"{run['model']}: skipped ({run['skipped']})")
    for label, figures in parity.items():
        print(f"{label}: greedy bf16 vs fp32: {figures['identical']}/{figures['of']} outputs "
              f"identical, token agreement {figures['token_agreement']:.1%}")  # fmt: skip
    return 0
