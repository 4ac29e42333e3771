"""The edge runtime on the tiny int4 edge model: prefill perplexity, sampling, stops, queueing."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest

from broker.errors import BadRequest, ContextLengthExceeded, Overloaded
from edge.api.personal import user_span
from edge.runtime import (
    OPEN_ANSWER_TOKENS,
    EdgeRuntime,
    Finished,
    Generation,
    Prefill,
    SamplingParams,
    Token,
)
from models.chat import render_chat
from models.registry import ModelSet
from models.scoring import encode_with_span, prompt_perplexity, scored_positions
from tests.waits import eventually

PROMPT = "<|user|>\nPermission is hereby granted, free of charge<|end|>\n<|assistant|>\n"


@pytest.fixture
async def runtime(tiny_models: ModelSet) -> AsyncIterator[EdgeRuntime]:
    rt = EdgeRuntime(tiny_models.edge_dir("int4"), threads=1, max_active=2, max_queue=2)
    try:
        yield rt
    finally:
        await rt.close()


async def run(generation: Generation) -> tuple[Prefill, str, list[Token], Finished]:
    events = [event async for event in generation]
    prefill, finished = events[0], events[-1]
    assert isinstance(prefill, Prefill) and isinstance(finished, Finished)
    tokens = [e for e in events if isinstance(e, Token)]
    return prefill, "".join(t.text for t in tokens) + finished.text, tokens, finished


async def test_prompt_perplexity_matches_stepping(runtime: EdgeRuntime) -> None:
    ids = runtime.encode(PROMPT)
    prefill, _, _, _ = await run(runtime.submit(ids, SamplingParams(max_tokens=1)))
    # Reference: feed the prompt one token at a time and read the last-position logits.
    params = og.GeneratorParams(runtime._model)
    params.set_search_options(max_length=len(ids) + 1)
    generator = og.Generator(runtime._model, params)
    rows = []
    for token in ids:
        generator.append_tokens([token])
        rows.append(np.array(generator.get_logits()[0, 0]))
    reference = prompt_perplexity(np.stack(rows), ids)
    assert prefill.perplexity is not None and reference is not None
    assert math.isclose(prefill.perplexity, reference, rel_tol=1e-3)
    assert prefill.prompt_tokens == len(ids)
    assert prompt_perplexity(np.zeros((1, 4)), [1]) is None


CHATS = [
    [{"role": "user", "content": "How do I list files sorted by size with ls?"}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": " def fibonacci(n):\n    return a generator  \n"},
    ],
    [{"role": "user", "content": "ünïcödé — 字 \t tabs\n\nand <|end|> a literal tag"}],
]


@pytest.mark.parametrize("messages", CHATS)
def test_chat_span_is_the_last_user_messages_content_tokens(
    runtime: EdgeRuntime, messages: list[dict[str, str]]
) -> None:
    rendered = runtime.render_chat(messages)
    assert rendered == render_chat(messages)  # the lab model's template is this format
    char_span = user_span(messages, rendered)
    assert char_span is not None
    content = messages[-1]["content"]
    assert rendered[char_span[0] : char_span[1]] == content
    ids, (start, end) = encode_with_span(runtime.encode, rendered, char_span)
    assert ids == runtime.encode(rendered)
    # The span is exactly the content's tokens: no role tag, newline or <|end|> in it.
    assert ids[start:end] == runtime.encode(content)
    assert runtime.tokenizer.decode(ids[start:end], skip_special_tokens=False) == content
    assert runtime.tokenizer.decode(ids[:start], skip_special_tokens=False).endswith("<|user|>\n")
    assert runtime.tokenizer.decode(ids[end:], skip_special_tokens=False).startswith("<|end|>")
    # No span, or a broken one: the whole prompt.
    assert encode_with_span(runtime.encode, rendered, None)[1] == (0, len(ids))
    assert encode_with_span(runtime.encode, rendered, (5, 2))[1] == (0, len(ids))


async def test_perplexity_over_a_span_scores_only_its_tokens(runtime: EdgeRuntime) -> None:
    messages = CHATS[0]
    rendered = runtime.render_chat(messages)
    ids, span = encode_with_span(runtime.encode, rendered, user_span(messages, rendered))
    options = SamplingParams(max_tokens=1)
    whole, _, _, _ = await run(runtime.submit(ids, options))
    part, _, _, _ = await run(runtime.submit(ids, options, score_span=span))
    assert whole.scored_tokens == len(ids) - 1
    assert part.scored_tokens == span[1] - span[0] == len(runtime.encode(messages[0]["content"]))
    assert part.perplexity is not None and part.perplexity != whole.perplexity
    # The same as the mean over those positions of the full-prompt logits.
    logits = np.random.default_rng(0).normal(size=(len(ids), runtime.vocab_size))
    nll = [
        -(logits[i - 1] - np.log(np.exp(logits[i - 1]).sum()))[ids[i]]
        for i in range(span[0], span[1])
    ]
    value = prompt_perplexity(logits, ids, span)
    assert value is not None and math.isclose(value, math.exp(float(np.mean(nll))), rel_tol=1e-9)
    assert list(scored_positions(10, (0, 4))) == [1, 2, 3]  # position 0 is never scored
    assert prompt_perplexity(logits, ids, (0, 1)) is None


async def test_greedy_is_deterministic_and_logprobs_are_kept(runtime: EdgeRuntime) -> None:
    ids = runtime.encode(PROMPT)
    options = SamplingParams(max_tokens=12, temperature=0)
    first = await run(runtime.submit(ids, options))
    second = await run(runtime.submit(ids, options))
    assert first[1] == second[1]
    assert all(t.logprob <= 0 for t in first[2])
    finished = first[3]
    assert finished.completion_tokens == len(first[2])
    if finished.finish_reason == "length":
        assert finished.completion_tokens == 12


async def test_seeded_sampling_is_reproducible(runtime: EdgeRuntime) -> None:
    ids = runtime.encode(PROMPT)
    options = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=7)
    a = await run(runtime.submit(ids, options))
    b = await run(runtime.submit(ids, options))
    assert a[1] == b[1]


async def test_stop_sequence_cuts_the_text(runtime: EdgeRuntime) -> None:
    ids = runtime.encode("Permission is hereby granted")
    options = SamplingParams(max_tokens=24, temperature=1.0, seed=3)
    _, text, _, _ = await run(runtime.submit(ids, options))
    assert len(text) >= 4, text
    start = len(text) // 2
    stop = text[start : start + 2]
    cut = text.index(stop)
    _, stopped, _, finished = await run(
        runtime.submit(ids, SamplingParams(max_tokens=24, temperature=1.0, seed=3, stop=(stop,)))
    )
    assert stopped == text[:cut]
    assert finished.finish_reason == "stop"


async def test_limits_queue_and_cancel(runtime: EdgeRuntime) -> None:
    ids = runtime.encode(PROMPT)
    with pytest.raises(ContextLengthExceeded):
        runtime.submit(ids, SamplingParams(max_tokens=runtime.context_length))
    with pytest.raises(BadRequest):
        runtime.submit([], SamplingParams())
    idle_wait = runtime.estimate_wait_s()
    long = SamplingParams(max_tokens=60, temperature=0.8, seed=1)
    held = [runtime.submit(ids, long, hold_after_prefill=True) for _ in range(2)]
    await eventually(lambda: runtime.queue_depth == 0, "both admitted into the pool")
    held += [runtime.submit(ids, long, hold_after_prefill=True) for _ in range(2)]
    with pytest.raises(Overloaded) as caught:  # 2 active + 2 queued: the queue is full
        runtime.submit(ids, long)
    assert caught.value.retry_after is not None
    assert runtime.estimate_wait_s() > idle_wait
    assert runtime.queue_depth >= 1
    for generation in held:
        generation.cancel()
    await eventually(lambda: runtime.in_flight == 0, "the cancelled generations dropped")
    assert runtime.cancelled == 4
    result = await run(runtime.submit(ids, SamplingParams(max_tokens=3)))
    assert result[3].completion_tokens <= 3


async def test_cancel_drops_a_held_generation_unfinished(runtime: EdgeRuntime) -> None:
    """`cancel()` takes a generation out of the pool for good: held after its prefill, it
    never runs (without the cancel it would hold its slot for ever)."""
    ids = runtime.encode(PROMPT)
    held = runtime.submit(ids, SamplingParams(max_tokens=20), hold_after_prefill=True)
    assert isinstance(await held.next_event(), Prefill)
    before = runtime.tokens_generated
    held.cancel()
    # The marker: a later generation ran to its end, so the worker has passed its pool (and
    # dropped what was cancelled) since.
    _, _, _, later = await run(runtime.submit(ids, SamplingParams(max_tokens=3, temperature=0)))
    assert runtime.cancelled == 1
    assert runtime.tokens_generated - before == later.completion_tokens
    await eventually(lambda: runtime.in_flight == 0, "the pool is empty")


async def test_concurrent_requests_and_close_drains(tiny_models: ModelSet) -> None:
    rt = EdgeRuntime(tiny_models.edge_dir("int4"), threads=1, max_active=3)
    ids = rt.encode(PROMPT)
    generations = [rt.submit(ids, SamplingParams(max_tokens=16, temperature=0)) for _ in range(5)]
    collecting = [asyncio.create_task(run(g)) for g in generations]
    await rt.close()  # admitted requests finish first
    results = await asyncio.gather(*collecting)
    assert len({text for _, text, _, _ in results}) == 1
    with pytest.raises(Overloaded):
        rt.submit(ids, SamplingParams())


def test_edge_never_imports_torch_or_transformers(tiny_models: ModelSet) -> None:
    """Import the edge app, serve a request, and check no torch/transformers module loaded."""
    code = textwrap.dedent(
        f"""
        import json, sys
        from fastapi.testclient import TestClient
        import edge.cli, edge.link, hybridgen.benches.edge_hop
        from edge.api.app import create_app
        from edge.settings import EdgeSettings
        app = create_app(EdgeSettings(model_dir={str(tiny_models.edge_dir("int4"))!r},
                                      no_cloud=True, threads=1))
        with TestClient(app, base_url="http://127.0.0.1") as client:
            r = client.post("/v1/completions",
                            json={{"model": "hg-edge", "prompt": "hi", "max_tokens": 2}})
            assert r.status_code == 200, r.text
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("torch", "transformers", "safetensors"))
        print(json.dumps(heavy))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


async def test_an_unset_max_tokens_runs_until_the_window_is_full_at_most_the_cap(
    tiny_models: ModelSet,
) -> None:
    """`serving.context`'s one rule at the edge: a request without `max_tokens` runs until
    the model stops or the window is full, never past the runtime's cap."""
    rt = EdgeRuntime(tiny_models.edge_dir("int4"), threads=1, max_tokens_cap=5)
    try:
        ids = rt.encode(PROMPT)
        greedy = SamplingParams(temperature=0)
        _, _, _, capped = await run(rt.submit(ids, greedy))
        assert (capped.finish_reason, capped.completion_tokens) == ("length", 5)
        rt.max_tokens_cap = rt.context_length  # the window is the limit now
        near = list(ids) * (-(-(rt.context_length - 3) // len(ids)))
        near = near[: rt.context_length - 3]  # room for 3 tokens
        _, _, _, full = await run(rt.submit(near, greedy))
        assert (full.finish_reason, full.completion_tokens) == ("length", 3)
    finally:
        await rt.close()


async def test_a_queued_answer_of_open_length_weighs_as_a_typical_answer_in_the_wait(
    runtime: EdgeRuntime,
) -> None:
    """The predicted wait counts a request without `max_tokens` as long as recent such
    answers (64 tokens before any), not as its cap: else one open request queued would send
    every later one to the cloud as `edge_overloaded`."""
    ids = runtime.encode(PROMPT)

    async def wait_with(options: SamplingParams) -> float:
        held = [runtime.submit(ids, options, hold_after_prefill=True) for _ in range(2)]
        await eventually(lambda: runtime.queue_depth == 0, "both admitted into the pool")
        held.append(runtime.submit(ids, options, hold_after_prefill=True))  # queued
        wait = runtime.estimate_wait_s()
        for generation in held:
            generation.cancel()
        await eventually(lambda: runtime.in_flight == 0, "the cancelled generations dropped")
        return wait

    sampled = SamplingParams(temperature=0.8, seed=1)
    open_wait = await wait_with(sampled)
    assert open_wait > 0
    assert open_wait == await wait_with(sampled.with_max_tokens(OPEN_ANSWER_TOKENS))
    assert OPEN_ANSWER_TOKENS == 64 and runtime.max_tokens_cap == 1024
