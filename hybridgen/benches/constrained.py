"""`hybridgen bench constrained`: decode speed with a JSON schema against unconstrained.

On the CURRENT model set (the default SmolLM2-135M build; `--home` for another HG_HOME):
the edge's int4 model through `edge.runtime.EdgeRuntime` (onnxruntime-genai's llguidance) and
the cloud checkpoint through `cloud.engine.Engine` (an `llguidance.LLMatcher` masking the
row), one request at a time, greedy, the same chat prompts with and without the schema
(`response_format: json_schema`, whitespace-free), runs alternating. Tokens/s counts the
tokens after the first over the time since the first (decode speed: a constrained answer is
shorter, so prefill would weigh more in an end-to-end rate); `*_ratio` = constrained /
unconstrained. `valid_share`: constrained answers (both ends) that validate against the
schema.

JSON: `{"edge_ratio", "cloud_ratio", "valid_share", "edge": {...}, "cloud": {...}, "cpu",
"threads", "model", "goal"}`; goals: valid_share 1.0, each ratio >= 0.8. Compare ratios of
one run, never absolute rates across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

GOAL_RATIO = 0.8
MAX_TOKENS = 96
PROMPTS = [
    "Invent a customer of a bicycle shop and describe them.",
    "Describe a fictional city worth visiting.",
    "Tell me about a made-up book and its author.",
    "Describe a pet you would like to have.",
]
#: What the constrained answers must match (bounded, as a real API schema usually is).
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 20},
            "maxItems": 4,
        },
        "happy": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "tags", "happy"],
    "additionalProperties": False,
}


def valid(text: str) -> bool:
    """Whether `text` is JSON valid against `SCHEMA` (checked by hand: no extra dependency)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    if not isinstance(obj, dict) or set(obj) != set(SCHEMA["required"]):
        return False
    age, tags = obj["age"], obj["tags"]
    return (
        isinstance(obj["name"], str)
        and len(obj["name"]) <= 40
        and isinstance(obj["city"], str)
        and len(obj["city"]) <= 40
        and isinstance(age, int)
        and not isinstance(age, bool)
        and 0 <= age <= 150
        and isinstance(tags, list)
        and len(tags) <= 4
        and all(isinstance(t, str) and len(t) <= 20 for t in tags)
        and isinstance(obj["happy"], bool)
    )


class _Run:
    """One answer's timing: tokens and the time of the first and last."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last = self.started
        self.tokens = 0
        self.text: list[str] = []

    def token(self, text: str, count: int = 1) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.tokens += count
        self.text.append(text)


def _summary(runs: list[_Run]) -> dict[str, Any]:
    """Decode tokens/s over the runs (tokens after the first / time since the first)."""
    tokens = sum(max(r.tokens - 1, 0) for r in runs)
    seconds = sum(r.last - (r.first or r.last) for r in runs)
    return {
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "tokens": sum(r.tokens for r in runs),
        "mean_tokens": round(statistics.mean(r.tokens for r in runs), 1),
    }


def _ratio(constrained: dict[str, Any], free: dict[str, Any]) -> float | None:
    a, b = constrained["tokens_per_s"], free["tokens_per_s"]
    return round(a / b, 3) if a and b else None


async def _alternate(
    generate: Any, prompts: list[list[int]], rounds: int, grammar: Any
) -> tuple[list[_Run], list[_Run]]:
    """(constrained runs, unconstrained runs), alternating, one at a time."""
    constrained: list[_Run] = []
    free: list[_Run] = []
    await _consume(generate(prompts[0], grammar))  # warm-up of both paths
    await _consume(generate(prompts[0], None))
    for _ in range(rounds):
        for ids in prompts:
            constrained.append(await _consume(generate(ids, grammar)))
            free.append(await _consume(generate(ids, None)))
    return constrained, free


async def _consume(pieces: AsyncIterator[tuple[str, int]]) -> _Run:
    run = _Run()
    async for text, count in pieces:
        run.token(text, count)
    return run


async def measure_edge(folder: Path, threads: int, rounds: int, grammar: Any) -> dict[str, Any]:
    """The edge runtime, constrained vs not."""
    from edge.runtime import EdgeRuntime, Finished, SamplingParams, Token

    runtime = EdgeRuntime(folder, threads=threads, max_active=1)
    options = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)

    async def generate(ids: list[int], constraint: Any) -> AsyncIterator[tuple[str, int]]:
        async for event in runtime.submit(ids, options, grammar=constraint):
            if isinstance(event, Token):
                yield event.text, 1
            elif isinstance(event, Finished) and event.text:
                yield event.text, 0

    try:
        prompts = [
            runtime.encode(runtime.render_chat([{"role": "user", "content": p}])) for p in PROMPTS
        ]
        constrained, free = await _alternate(generate, prompts, rounds, grammar)
    finally:
        await runtime.close()
    return _result(constrained, free)


async def measure_cloud(folder: Path, threads: int, rounds: int, grammar: Any) -> dict[str, Any]:
    """The cloud engine (one row at a time), constrained vs not."""
    from cloud.engine import Engine, EngineConfig
    from models.chat import render_chat
    from serving.sampling import SamplingParams

    engine = await asyncio.to_thread(
        Engine.load, folder, config=EngineConfig(threads=threads, max_batch_requests=4)
    )
    engine.start()
    options = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    count = 0

    async def generate(ids: list[int], constraint: Any) -> AsyncIterator[tuple[str, int]]:
        nonlocal count
        count += 1
        async for delta in engine.generate(f"bench-{count}", ids, options, grammar=constraint):
            yield delta.text, len(delta.token_ids)

    try:
        prompts = [engine.encode(render_chat([{"role": "user", "content": p}])) for p in PROMPTS]
        constrained, free = await _alternate(generate, prompts, rounds, grammar)
    finally:
        engine.close()
    return _result(constrained, free)


def _result(constrained: list[_Run], free: list[_Run]) -> dict[str, Any]:
    with_schema, without = _summary(constrained), _summary(free)
    answers = ["".join(r.text) for r in constrained]
    return {
        "ratio": _ratio(with_schema, without),
        "constrained": with_schema,
        "unconstrained": without,
        "valid": sum(valid(a) for a in answers),
        "answers": len(answers),
        "example": answers[0] if answers else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hybridgen bench constrained`."""
    from broker.errors import NotFound
    from hybridgen.benches.machine import cpu_info
    from models import registry
    from serving.grammar import json_schema_grammar

    parser = argparse.ArgumentParser(
        prog="hybridgen bench constrained",
        description="Decode tokens/s with a JSON schema (constrained decoding) against "
        "unconstrained, on the edge model and the cloud model of the CURRENT model set.",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument("--quick", action="store_true", help="one round of prompts (else 3)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--home", type=Path, help="HG_HOME holding the model set")
    parser.add_argument("--version", help="model set version (default: CURRENT)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        model_set = registry.resolve(args.version, args.home)
    except NotFound as exc:
        print(
            f"hybridgen bench constrained: {exc}. Build the default SmolLM2 set with "
            "`hybridgen models build`",
            file=sys.stderr,
        )
        return 2
    if "int4" not in model_set.edge_precisions:
        print(f"hybridgen bench constrained: {model_set.version} has no int4 edge build")
        return 2
    rounds = 1 if args.quick else 3
    grammar = json_schema_grammar(SCHEMA).check("schema")
    edge = asyncio.run(measure_edge(model_set.edge_dir("int4"), args.threads, rounds, grammar))
    cloud = asyncio.run(measure_cloud(model_set.cloud_dir, args.threads, rounds, grammar))
    cpu = cpu_info()
    result = {
        "edge_ratio": edge["ratio"],
        "cloud_ratio": cloud["ratio"],
        "valid_share": round(
            (edge["valid"] + cloud["valid"]) / max(edge["answers"] + cloud["answers"], 1), 3
        ),
        "edge": edge,
        "cloud": cloud,
        "threads": args.threads,
        "max_tokens": MAX_TOKENS,
        "cpu": {"model": cpu["model"], "flags": cpu["flags"]},
        "model": model_set.version,
        "goal": {"valid_share": 1.0, "ratio": GOAL_RATIO},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model set {model_set.version}, {args.threads} thread(s), {cpu['model']}")
    for name in ("edge", "cloud"):
        part = result[name]
        print(
            f"  {name:5}  constrained {part['constrained']['tokens_per_s']} tok/s, "
            f"unconstrained {part['unconstrained']['tokens_per_s']} tok/s, "
            f"ratio {part['ratio']} (goal >= {GOAL_RATIO}); valid {part['valid']}/"
            f"{part['answers']}"
        )
    print(f"  valid_share {result['valid_share']} (goal 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
