"""Persona prefix reuse in the edge runtime, on the tiny int4 edge model.

A request naming a prefix (`submit(prefix_key=..., prefix_len=...)`) reuses the kept prefill
of that prefix (`rewind_to`) and gives the same greedy tokens and prompt perplexity as a full
prefill. `prefix_hits` and the Prefill event's `reused_tokens` prove the reuse happened.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from edge.api.personal import user_span
from edge.runtime import (
    EdgeRuntime,
    Finished,
    Generation,
    Prefill,
    SamplingParams,
    Token,
    prefix_length,
)
from models.registry import ModelSet
from models.scoring import encode_with_span

PERSONA = "You are Ada, a kind teacher."
OTHER_PERSONA = "You are Bo, a sailor."
QUESTIONS = ["List files?", "Why is my line printed twice?", "Sort?", "List files?"]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def chat(
    runtime: EdgeRuntime, question: str, persona: str = PERSONA
) -> tuple[list[int], tuple[int, int], int]:
    """Prompt ids of persona + question, the question's token span, and the persona's length."""
    messages = [{"role": "system", "content": persona}, {"role": "user", "content": question}]
    rendered = runtime.render_chat(messages)
    ids, span = encode_with_span(runtime.encode, rendered, user_span(messages, rendered))
    system_part = rendered[: rendered.index(question)]
    system_part = system_part[: system_part.rindex("<|user|>")]
    prefix_len = prefix_length(ids, runtime.encode(system_part))
    assert 0 < prefix_len < span[0]
    return ids, span, prefix_len


async def run(generation: Generation) -> tuple[Prefill, list[int], str, Finished]:
    events = [event async for event in generation]
    prefill, finished = events[0], events[-1]
    assert isinstance(prefill, Prefill) and isinstance(finished, Finished)
    tokens = [e for e in events if isinstance(e, Token)]
    text = "".join(t.text for t in tokens) + finished.text
    return prefill, [t.token_id for t in tokens], text, finished


async def reference(
    runtime: EdgeRuntime, ids: list[int], span: tuple[int, int], options: SamplingParams = GREEDY
) -> tuple[Prefill, list[int], str, Finished]:
    """The same request without a prefix key: a full prefill."""
    return await run(runtime.submit(ids, options, score_span=span))


def same(
    got: tuple[Prefill, list[int], str, Finished], want: tuple[Prefill, list[int], str, Finished]
) -> None:
    assert got[1] == want[1] and got[2] == want[2]
    assert got[3].finish_reason == want[3].finish_reason
    assert got[0].perplexity is not None and want[0].perplexity is not None
    assert math.isclose(got[0].perplexity, want[0].perplexity, rel_tol=1e-4)
    assert got[0].scored_tokens == want[0].scored_tokens
    assert got[0].prompt_tokens == want[0].prompt_tokens


def test_prefix_length_checks_the_tokens() -> None:
    assert prefix_length([1, 2, 3, 4], [1, 2]) == 2
    assert prefix_length([1, 2, 3, 4], [1, 3]) == 0
    assert prefix_length([1, 2], [1, 2, 3]) == 0
    assert prefix_length([1, 2], []) == 0


async def test_reuse_gives_the_same_greedy_outputs(runtime: EdgeRuntime) -> None:
    hits = []
    for number, question in enumerate(QUESTIONS):  # longer, then shorter suffixes
        ids, span, prefix_len = chat(runtime, question)
        want = await reference(runtime, ids, span)
        got = await run(
            runtime.submit(ids, GREEDY, score_span=span, prefix_key="ada", prefix_len=prefix_len)
        )
        same(got, want)
        assert got[1], "the tiny model generated nothing: the comparison would be empty"
        assert want[0].reused_tokens == 0
        # The first request prefills and keeps the prefix; the others reuse all of it.
        assert got[0].reused_tokens == (0 if number == 0 else prefix_len)
        hits.append(runtime.prefix_hits)
    assert hits == [0, 1, 2, 3]
    assert runtime.prefix_cache_keys == ["ada"]
    # One kept generator, sized to the request's need rounded up to 256 tokens: the whole
    # 128-token window of the tiny model.
    assert runtime.prefix_cache_bytes == runtime.kv_bytes_per_token * runtime.context_length


async def test_penalized_and_plain_requests_share_a_kept_prefix(runtime: EdgeRuntime) -> None:
    """Penalties are no search option: the request's job keeps what they read, so a
    penalized request reuses the generator a plain one kept (and hands it back), each with
    its own answer, the same as without reuse."""
    penalized = SamplingParams(
        max_tokens=12, temperature=0, frequency_penalty=2.0, repetition_penalty=1.5
    )
    ids, span, prefix_len = chat(runtime, QUESTIONS[1])
    keyed = {"score_span": span, "prefix_key": "ada", "prefix_len": prefix_len}
    plain_want = await reference(runtime, ids, span)
    penalized_want = await reference(runtime, ids, span, penalized)
    assert penalized_want[1] != plain_want[1]
    outputs = [
        await run(runtime.submit(ids, options, **keyed))  # type: ignore[arg-type]
        for options in (GREEDY, penalized, GREEDY, penalized)
    ]
    for got, want in zip(outputs, [plain_want, penalized_want] * 2, strict=True):
        same(got, want)
    assert [o[0].reused_tokens for o in outputs] == [0] + [prefix_len] * 3
    assert runtime.prefix_cache_keys == ["ada"]


async def test_a_prefix_that_does_not_match_falls_back(runtime: EdgeRuntime) -> None:
    ids, span, prefix_len = chat(runtime, QUESTIONS[0])
    await run(runtime.submit(ids, GREEDY, score_span=span, prefix_key="k", prefix_len=prefix_len))
    # Same key, another persona: the kept tokens differ, so the prompt is prefilled in full.
    other_ids, other_span, other_len = chat(runtime, QUESTIONS[1], OTHER_PERSONA)
    want = await reference(runtime, other_ids, other_span)
    got = await run(
        runtime.submit(
            other_ids, GREEDY, score_span=other_span, prefix_key="k", prefix_len=other_len
        )
    )
    same(got, want)
    assert got[0].reused_tokens == 0 and runtime.prefix_hits == 0
    # The kept generator is now the other persona's, and it is reused.
    again = await run(
        runtime.submit(
            other_ids, GREEDY, score_span=other_span, prefix_key="k", prefix_len=other_len
        )
    )
    same(again, want)
    assert again[0].reused_tokens == other_len and runtime.prefix_hits == 1
    # The kept generator holds only the KV cache (the edge samples): a sampled request, and a
    # seeded one, reuse it too, and the seed still reproduces its answer, as without reuse.
    sampled = SamplingParams(max_tokens=4, temperature=0.8)
    first = await run(
        runtime.submit(
            other_ids, sampled, score_span=other_span, prefix_key="k", prefix_len=other_len
        )
    )
    assert first[0].reused_tokens == other_len
    seeded = SamplingParams(max_tokens=8, temperature=0.8, seed=7)
    outputs = [
        await run(
            runtime.submit(
                other_ids, seeded, score_span=other_span, prefix_key="k", prefix_len=other_len
            )
        )
        for _ in range(2)
    ]
    unkeyed = await run(runtime.submit(other_ids, seeded, score_span=other_span))
    assert outputs[0][1] == outputs[1][1] == unkeyed[1]
    assert [o[0].reused_tokens for o in outputs] == [other_len, other_len]


async def test_the_lru_evicts_by_memory_budget(tiny_models: ModelSet) -> None:
    probe = EdgeRuntime(tiny_models.edge_dir("int4"), threads=1, prefix_cache_mb=0)
    try:
        ids, span, prefix_len = chat(probe, QUESTIONS[0])
        await run(probe.submit(ids, GREEDY, score_span=span, prefix_key="a", prefix_len=prefix_len))
        assert probe.prefix_cache_keys == [] and probe.prefix_hits == 0  # 0 MiB: reuse is off
        per_entry_bytes = probe.kv_bytes_per_token * min(probe.context_length, 256)
    finally:
        await probe.close()
    budget_mb = 2.5 * per_entry_bytes / (1 << 20)  # room for two kept prefixes
    rt = EdgeRuntime(tiny_models.edge_dir("int4"), threads=1, prefix_cache_mb=budget_mb)
    try:
        for key in ("a", "b", "c"):
            await run(
                rt.submit(ids, GREEDY, score_span=span, prefix_key=key, prefix_len=prefix_len)
            )
        assert rt.prefix_cache_keys == ["b", "c"]
        assert rt.prefix_evictions == 1
        assert rt.prefix_cache_bytes == 2 * per_entry_bytes <= budget_mb * (1 << 20)
        evicted = await run(
            rt.submit(ids, GREEDY, score_span=span, prefix_key="a", prefix_len=prefix_len)
        )
        assert evicted[0].reused_tokens == 0
        assert rt.prefix_cache_keys == ["c", "a"]  # "a" kept again, "b" (oldest) evicted
        kept = await run(
            rt.submit(ids, GREEDY, score_span=span, prefix_key="c", prefix_len=prefix_len)
        )
        assert kept[0].reused_tokens == prefix_len and rt.prefix_hits == 1
    finally:
        await rt.close()
    assert rt.prefix_cache_bytes == 0 and rt.prefix_cache_keys == []  # close() frees them


async def test_two_concurrent_requests_with_one_key(runtime: EdgeRuntime) -> None:
    prompts = [chat(runtime, q) for q in QUESTIONS[:2]]
    wants = [await reference(runtime, ids, span) for ids, span, _ in prompts]
    (ids0, span0, len0), (ids1, span1, len1) = prompts
    await run(runtime.submit(ids0, GREEDY, score_span=span0, prefix_key="u", prefix_len=len0))
    assert runtime.prefix_cache_keys == ["u"]
    both = await asyncio.gather(
        *(
            run(runtime.submit(ids, GREEDY, score_span=span, prefix_key="u", prefix_len=n))
            for ids, span, n in prompts
        )
    )
    for got, want in zip(both, wants, strict=True):
        same(got, want)
    # One took the kept generator, the other prefilled its own; one of them is kept after.
    assert sorted(got[0].reused_tokens for got in both) == [0, len0]
    assert runtime.prefix_hits == 1 and runtime.prefix_cache_keys == ["u"]
    after = await run(
        runtime.submit(ids1, GREEDY, score_span=span1, prefix_key="u", prefix_len=len1)
    )
    same(after, wants[1])
    assert after[0].reused_tokens == len1 and runtime.prefix_hits == 2


async def test_cancelling_keeps_the_cache_consistent(runtime: EdgeRuntime) -> None:
    ids, span, prefix_len = chat(runtime, QUESTIONS[1])
    want = await reference(runtime, ids, span)
    long = SamplingParams(max_tokens=30, temperature=0)
    await run(runtime.submit(ids, long, score_span=span, prefix_key="c", prefix_len=prefix_len))
    # Cancelled mid-generation while holding the kept generator.
    generation = runtime.submit(ids, long, score_span=span, prefix_key="c", prefix_len=prefix_len)
    first = await generation.next_event()
    assert isinstance(first, Prefill) and first.reused_tokens == prefix_len
    assert isinstance(await generation.next_event(), Token)
    generation.cancel()  # (the tiny model may have finished meanwhile: kept either way)
    # Cancelled while held after its prefill (the router's path).
    held = runtime.submit(
        ids, long, score_span=span, prefix_key="c", prefix_len=prefix_len, hold_after_prefill=True
    )
    prefill = await held.next_event()
    assert isinstance(prefill, Prefill) and prefill.reused_tokens == prefix_len
    assert runtime.prefix_cache_keys == []  # taken while in use
    held.cancel()
    got = await run(
        runtime.submit(ids, GREEDY, score_span=span, prefix_key="c", prefix_len=prefix_len)
    )
    same(got, want)
    assert got[0].reused_tokens == prefix_len
    assert runtime.prefix_cache_keys == ["c"]
    await runtime.close()
    assert runtime.prefix_cache_keys == [] and runtime.prefix_cache_bytes == 0


@pytest.mark.slow
def test_bench_prefix_quick_prints_its_json(tiny_models: ModelSet, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybridgen",
            "bench",
            "prefix",
            "--quick",
            "--json",
            "--edge-dir",
            str(tiny_models.edge_dir("int4")),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for field in ("ttft_reuse_ms", "ttft_recompute_ms", "ratio", "prefix_tokens", "cpu", "threads"):
        assert field in report
    # Timings are the benchmark's business; the report must be consistent with itself.
    assert report["ratio"] == pytest.approx(
        report["ttft_recompute_ms"] / report["ttft_reuse_ms"], abs=0.01
    )
    assert (report["runs"], report["threads"]) == (3, 1)  # --quick: 3 runs of each kind
    # The persona, a prefix of the prompt, is reused whole on every run.
    assert 0 < report["prefix_tokens"] < report["prompt_tokens"]
    assert report["reused_tokens"] == report["prefix_tokens"]
