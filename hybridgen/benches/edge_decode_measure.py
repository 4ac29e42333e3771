"""Timing primitives of `hybridgen bench edge-decode` (and its `--sweep`), and machine facts.

The bare onnxruntime-genai loop (`raw_generate`, `raw_prefill`), the project's
`edge.runtime.EdgeRuntime` on the same request (`time_edge` alternates the two), torch
`generate`, the CPU's model name and flags, RSS and load average.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from hybridgen.benches.machine import cpu_info, load_average
from models.ort_edge import new_generator

logger = logging.getLogger(__name__)

__all__ = ["cpu_info", "load_average"]  # re-exported for the edge-decode benches


def rss_mb() -> float:
    """Resident set size of this process now, in MB."""
    try:
        pages = int(Path("/proc/self/statm").read_text(encoding="utf-8").split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def prompt_ids(folder: Path, count: int, vocab_size: int) -> list[int]:
    """`count` token ids of real English text (CPython's help topics, tokenized with the
    folder's tokenizer); random ids when the tokenizer cannot make that many."""
    with contextlib.suppress(Exception):
        from tokenizers import Tokenizer

        from models.lab.corpus import iter_python_topics

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        ids: list[int] = []
        for document in iter_python_topics():
            ids += tokenizer.encode(document.text, add_special_tokens=False).ids
            if len(ids) >= count:
                return [int(t) for t in ids[:count]]
    rng = np.random.default_rng(0)
    return [int(t) for t in rng.integers(8, max(9, min(500, vocab_size)), count)]


def time_torch(model: Any, prompt: list[int], new_tokens: int, runs: int) -> float:
    """Median tokens/s of torch `generate` (prefill included, EOS ignored)."""
    import torch

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


def raw_generate(model: Any, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """One bare onnxruntime-genai greedy run (EOS ignored).

    Returns:
        `generate_tok_s` (new tokens / time from `append_tokens` on, like torch `generate`),
        `decode_tok_s` (tokens after the first / their time) and `ttft_s`.
    """
    total = len(prompt) + new_tokens
    generator = new_generator(model, total, min_length=total, do_sample=False)
    started = time.perf_counter()
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    generator.generate_next_token()
    generator.get_next_tokens()
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        generator.generate_next_token()
        generator.get_next_tokens()
    end = time.perf_counter()
    return {
        "generate_tok_s": new_tokens / (end - started),
        "decode_tok_s": (new_tokens - 1) / max(end - first, 1e-9),
        "ttft_s": first - started,
    }


def raw_prefill(model: Any, prompt: list[int]) -> dict[str, float]:
    """Prefill tokens/s (`append_tokens` of the whole prompt) and time to first token."""
    generator = new_generator(model, len(prompt) + 1, do_sample=False)
    started = time.perf_counter()
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    read = time.perf_counter()
    generator.generate_next_token()
    generator.get_next_tokens()
    return {
        "prefill_tok_s": len(prompt) / (read - started),
        "ttft_s": time.perf_counter() - started,
    }


async def _runtime_generate(runtime: Any, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """One greedy request through `EdgeRuntime.submit` and its events."""
    from edge.runtime import SamplingParams, Token

    started = time.perf_counter()
    generation = runtime.submit(prompt, SamplingParams(max_tokens=new_tokens, temperature=0))
    stamps: list[float] = []
    async for event in generation:
        if isinstance(event, Token):
            stamps.append(time.perf_counter())
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {
        "decode_tok_s": decode,
        "ttft_s": (stamps[0] if stamps else time.perf_counter()) - started,
        "tokens": float(len(stamps)),
    }


def time_edge(
    folder: Path, threads: int, prompt: list[int], long_prompt: list[int], new_tokens: int,
    runs: int,
) -> dict[str, Any]:  # fmt: skip
    """The int4 build at `threads`: bare loop and EdgeRuntime side by side, prefill, TTFT."""
    from edge.runtime import EdgeRuntime
    from models.ort_edge import load_model

    model = load_model(folder, threads)
    before = rss_mb()
    runtime = EdgeRuntime(folder, threads=threads, max_active=1)

    async def measure() -> tuple[list[dict[str, float]], list[dict[str, float]], list[Any]]:
        raw_runs, runtime_runs, prefills = [], [], []
        raw_generate(model, prompt, new_tokens)  # warm-up, both
        await _runtime_generate(runtime, prompt, new_tokens)
        raw_prefill(model, long_prompt)
        await _runtime_generate(runtime, long_prompt, 1)
        for _ in range(runs):  # alternate, so drift on a shared machine hits both alike
            raw_runs.append(raw_generate(model, prompt, new_tokens))
            runtime_runs.append(await _runtime_generate(runtime, prompt, new_tokens))
            prefills.append((raw_prefill(model, long_prompt),
                             await _runtime_generate(runtime, long_prompt, 1)))  # fmt: skip
        await runtime.close()
        return raw_runs, runtime_runs, prefills

    raw_runs, runtime_runs, prefills = asyncio.run(measure())
    edge_rss = rss_mb() - before

    def median(items: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in items)

    return {
        "edge_int4_tok_s": median(raw_runs, "generate_tok_s"),
        "raw_tok_s": median(raw_runs, "decode_tok_s"),
        "runtime_tok_s": median(runtime_runs, "decode_tok_s"),
        "runtime_vs_raw": statistics.median(
            b["decode_tok_s"] / a["decode_tok_s"]
            for a, b in zip(raw_runs, runtime_runs, strict=True)
        ),
        "runtime_tokens": int(min(r["tokens"] for r in runtime_runs)),
        "ttft_ms": statistics.median(p[0]["ttft_s"] for p in prefills) * 1e3,
        "prefill_tok_s": statistics.median(p[0]["prefill_tok_s"] for p in prefills),
        "runtime_ttft_ms": statistics.median(p[1]["ttft_s"] for p in prefills) * 1e3,
        "edge_rss_mb": edge_rss,
    }


def time_generate(
    folder: Path, threads: int, prompt: list[int], new_tokens: int, runs: int
) -> float:
    """Median `generate_tok_s` of the bare loop on one build."""
    from models.ort_edge import load_model

    model = load_model(folder, threads)
    raw_generate(model, prompt, new_tokens)
    return statistics.median(
        raw_generate(model, prompt, new_tokens)["generate_tok_s"] for _ in range(runs)
    )
