"""Penalties and `n` (docs/api.md), on the three live targets of test_openai_api: the edge
serving locally, the edge sending to a real cloud worker, the cloud API; and an edge whose
cloud is gone answering them itself.

The tiny models repeat one token when greedy, so a penalty visibly changes their answers.
Presence and frequency penalties shift a token's logit and its log-probability alike, so
each step of a penalized answer can be checked against the model's own log-probabilities
the answer reports: its token is the best after the penalties. The repetition penalty
scales logits, which the answer does not report: its rule is checked against
onnxruntime-genai's and transformers' own in test_penalties_rule.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema
import pytest

from broker import wire
from broker.bus import Responder
from edge.runtime import SamplingParams
from tests.fixtures_edge import ends_well, sse_json, sse_lines, stand_in
from tests.test_edge_faults import LOCAL_POLICY, _call, body, slot_taken
from tests.test_openai_api import Target, cloud_api, target  # noqa: F401 (fixtures)
from tests.test_tools import ADD_PARAMS, ASK, ONE_CALL, TOOLS, WEATHER, WEATHER_PARAMS
from tests.waits import eventually

pytestmark = pytest.mark.slow

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}
#: Strong enough to change every target's greedy answer.
ADDITIVE: dict[str, Any] = {"frequency_penalty": 2.0, "presence_penalty": 0.5}


def content_of(answer: Any, index: int = 0) -> str:
    return str(answer.choices[index].message.content)


def tops(entry: Any) -> list[tuple[str, float]]:
    return [(top.token, round(top.logprob, 4)) for top in entry.top_logprobs]


def assert_best_after_the_penalties(answer: Any, presence: float, frequency: float) -> None:
    """Every step's token is the most likely one after OpenAI's penalties, by the model's
    own log-probabilities (the chosen token's and the 20 most likely)."""
    counts: Counter[str] = Counter()

    def penalized(token: str, logprob: float) -> float:
        return logprob - presence * (counts[token] > 0) - frequency * counts[token]

    for step, entry in enumerate(answer.choices[0].logprobs.content):
        chosen = penalized(entry.token, entry.logprob)
        best = max(penalized(top.token, top.logprob) for top in entry.top_logprobs)
        assert chosen >= best - 1e-4, (step, entry.token, tops(entry)[:3], dict(counts))
        counts[entry.token] += 1


async def test_penalties_pick_the_best_token_after_them_and_report_the_models_own(
    target: Target,  # noqa: F811
) -> None:
    scored = {**GREEDY, "max_tokens": 16, "logprobs": True, "top_logprobs": 20}
    plain = await target.chat(**scored)
    penalized = await target.chat(**scored, **ADDITIVE)
    assert_best_after_the_penalties(penalized, 0.5, 2.0)
    plain_steps, steps = plain.choices[0].logprobs.content, penalized.choices[0].logprobs.content
    split = next(
        i for i, (a, b) in enumerate(zip(plain_steps, steps, strict=True)) if a.token != b.token
    )
    # Up to the first token the penalties changed, both answers read the same text: that
    # step's log-probabilities are the same, the model's own, not the penalized ones.
    assert tops(steps[split]) == tops(plain_steps[split])
    assert plain_steps[split].token == plain_steps[split].top_logprobs[0].token
    assert steps[split].token != steps[split].top_logprobs[0].token

    chunks = await target.chat_stream(**{**GREEDY, "max_tokens": 16}, **ADDITIVE)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content_of(penalized)

    # The repetition penalty reaches whoever serves: it changes the greedy answer.
    prompt = "The software"
    plain_text = (await target.complete(prompt=prompt, **GREEDY)).choices[0].text
    repeated = {"extra_body": {"repetition_penalty": 2.0}}
    text = (await target.complete(prompt=prompt, **GREEDY, **repeated)).choices[0].text
    assert text != plain_text
    stream = await target.complete(prompt=prompt, **GREEDY, **repeated, stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == text


async def test_penalties_keep_grammars_tools_and_seeds(target: Target) -> None:  # noqa: F811
    every = {**ADDITIVE, "extra_body": {"repetition_penalty": 2.0}}
    # A schema that leaves nothing open once its one digit is written.
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": ADD_PARAMS}}
    answer = await target.chat(**{**GREEDY, "max_tokens": 40}, response_format=schema, **every)
    # The grammar's tokens win over the penalties (`"` repeats): the answer is valid, whole.
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content_of(answer)), ADD_PARAMS)

    call = {"messages": ASK, "tools": TOOLS, "tool_choice": WEATHER, "parallel_tool_calls": False}
    called = await target.chat(**{**GREEDY, "max_tokens": ONE_CALL}, **call, **every)
    (made,) = called.choices[0].message.tool_calls
    assert (made.function.name, called.choices[0].finish_reason) == ("w", "tool_calls")
    jsonschema.validate(json.loads(made.function.arguments), WEATHER_PARAMS)

    seeded = {"temperature": 1.0, "max_tokens": 16, "seed": 11, **every}
    first, second = [content_of(await target.chat(**seeded)) for _ in range(2)]
    assert first == second
    assert first != content_of(await target.chat(**{**seeded, "extra_body": {}}))


async def test_n_choices_are_each_their_own_sequence(target: Target) -> None:  # noqa: F811
    single = await target.chat(**GREEDY)
    three = await target.chat(**GREEDY, n=3, logprobs=True)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [content_of(three, i) for i in range(3)] == [content_of(single)] * 3
    assert [c.finish_reason for c in three.choices] == ["length"] * 3
    assert [len(c.logprobs.content) for c in three.choices] == [12] * 3
    # The prompt is counted once, the tokens of every choice.
    assert (three.usage.prompt_tokens, three.usage.completion_tokens) == (
        single.usage.prompt_tokens,
        36,
    )
    # Seeded: choice i is the request with seed + i, so the whole answer repeats.
    seeded = {"temperature": 1.0, "max_tokens": 12, "seed": 5}
    sampled = await target.chat(**seeded, n=3, **ADDITIVE)
    alone = [await target.chat(**{**seeded, "seed": 5 + i}, **ADDITIVE) for i in range(3)]
    assert [content_of(sampled, i) for i in range(3)] == [content_of(a) for a in alone]

    chunks = await target.chat_stream(**GREEDY, n=3, stream_options={"include_usage": True})
    *answer_chunks, usage_chunk = chunks
    texts, ends = ["", "", ""], []
    for chunk in answer_chunks:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason is not None:
            ends.append((choice.index, choice.finish_reason))
    assert texts == [content_of(single)] * 3
    assert sorted(ends) == [(0, "length"), (1, "length"), (2, "length")]
    assert (usage_chunk.choices, usage_chunk.usage.completion_tokens) == ([], 36)

    completions = await target.complete(prompt="The software", **GREEDY, n=2)
    assert [c.index for c in completions.choices] == [0, 1]
    assert completions.choices[0].text == completions.choices[1].text
    assert completions.usage.completion_tokens == 24


async def test_without_a_cloud_the_edge_answers_every_choice_penalized(
    start_edge: Callable[..., Any],
) -> None:
    """Sent to the cloud with no worker on the bus, a request with `n` and penalties falls
    back to the edge: every choice is the edge's own penalized answer."""
    edge = await start_edge(policy={"perplexity_threshold": 1e9})
    body = {"model": "hg-edge", "prompt": "The software", **GREEDY, **ADDITIVE}
    async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
        local = (await http.post("/v1/completions", json={**body, "route": "edge"})).json()
        fallback = await http.post("/v1/completions", json={**body, "route": "cloud", "n": 2})
        streamed = await sse_lines(http, {**body, "route": "cloud", "n": 2, "stream": True})
    answer = fallback.json()
    assert (answer["served_by"], answer["route_reason"]) == ("edge", "cloud_unavailable")
    expected = local["choices"][0]["text"]
    assert [c["text"] for c in answer["choices"]] == [expected, expected]
    assert expected != (await _plain_text(edge.url, body))
    last = ends_well(streamed)
    assert (last["served_by"], last["route_reason"]) == ("edge", "cloud_unavailable")
    texts = ["", ""]
    for event in streamed[:-1]:
        for choice in sse_json(event)["choices"]:
            texts[choice["index"]] += choice["text"]
    assert texts == [expected, expected]


async def _plain_text(url: str, body: dict[str, Any]) -> str:
    plain = {k: v for k, v in body.items() if k not in ADDITIVE}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        answer = await http.post("/v1/completions", json={**plain, "route": "edge"})
    return str(answer.json()["choices"][0]["text"])


async def test_each_choice_is_one_bus_request_with_its_id_seed_and_the_penalties(
    start_edge: Callable[..., Any], nats_url: str
) -> None:
    """docs/broker.md: the bus carries no `n`; choice i is a request of its own, id
    `<request_id>-<i>` after the first and seed + i, each with the request's penalties."""
    seen: list[wire.GenerateRequest] = []

    async def answer(request: wire.GenerateRequest, responder: Responder) -> None:
        seen.append(request)
        await responder.chunk(text=f" {request.seed}", token_ids=[1])
        await responder.done("stop", wire.Usage(prompt_tokens=3, completion_tokens=1))

    async with stand_in(nats_url, answer):
        edge = await start_edge(policy={"perplexity_threshold": 1e9})
        body = {"model": "hg-edge", "prompt": "x", "route": "cloud", "n": 3, "seed": 40,
                "max_tokens": 4, "presence_penalty": -1.0, "frequency_penalty": 0.5,
                "repetition_penalty": 1.25}  # fmt: skip
        async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
            answer_body = (await http.post("/v1/completions", json=body)).json()
    request_id = answer_body["request_id"]
    assert sorted(r.request_id for r in seen) == [request_id, f"{request_id}-1", f"{request_id}-2"]
    by_id = {r.request_id: r for r in seen}
    assert [by_id[i].seed for i in (request_id, f"{request_id}-1", f"{request_id}-2")] == [
        40,
        41,
        42,
    ]
    assert {(r.presence_penalty, r.frequency_penalty, r.repetition_penalty) for r in seen} == {
        (-1.0, 0.5, 1.25)
    }
    assert [c["text"] for c in answer_body["choices"]] == [" 40", " 41", " 42"]
    assert answer_body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


@pytest.mark.parametrize("stream", [True, False])
async def test_a_hang_up_cancels_every_choice(start_edge: Callable[..., Any], stream: bool) -> None:
    """Three choices wait behind a held job; a client that hangs up cancels all three
    before they run (as test_edge_faults' hang-up test does for one)."""
    edge = await start_edge(no_cloud=True, max_active=1, max_queue=4, policy=LOCAL_POLICY)
    runtime = edge.node.runtime
    async with slot_taken(edge), httpx.AsyncClient(base_url=edge.url, timeout=None) as http:
        hang_up = asyncio.Event()
        payload = {**body("edge", stream=stream, max_tokens=64), "n": 3}
        call = asyncio.create_task(_call(http, payload, hang_up))
        await eventually(lambda: runtime.in_flight == 4, "the held job and our three, queued")
        if stream:
            hang_up.set()  # it hangs up after the first chunk
            await call
        else:
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        # Marked cancelled in the queue (the worker drops them when the slot frees).
        pending = runtime._pending
        await eventually(lambda: all(job.cancelled for job in pending), "ours are cancelled")
        before = runtime.tokens_generated
    await eventually(lambda: runtime.in_flight == 0, "the pool is empty")
    assert runtime.cancelled == 4  # the held job and our three, none finished
    assert runtime.tokens_generated == before


async def test_a_cloud_answer_cut_mid_stream_is_finished_penalized_for_its_whole(
    start_edge: Callable[..., Any], nats_url: str
) -> None:
    """The cloud writes three newlines (what the tiny edge model would write forever) and
    fails: the edge finishes the answer, its frequency penalty counting those three as the
    answer's own, exactly as its runtime continues such an answer."""
    streamed = "\n\n\n"

    async def crashing(request: wire.GenerateRequest, responder: Responder) -> None:
        for _ in streamed:
            await responder.chunk(text="\n", token_ids=[1])
        raise RuntimeError("boom")

    prompt = "Permission is hereby granted"
    async with stand_in(nats_url, crashing):
        edge = await start_edge(policy={**LOCAL_POLICY, "cloud_idle_timeout_ms": 60_000})
        payload = {**body("cloud", stream=True, max_tokens=12), "prompt": prompt, **ADDITIVE}
        async with httpx.AsyncClient(base_url=edge.url, timeout=60) as http:
            events = await sse_lines(http, payload)
    last = ends_well(events)
    assert (last["served_by"], last["completed_by"]) == ("cloud", "edge")
    text = "".join(c["text"] for e in events[:-1] for c in sse_json(e)["choices"])
    runtime = edge.node.runtime
    context = runtime.encode(prompt + streamed)
    options = SamplingParams(max_tokens=12 - len(streamed), temperature=0, **ADDITIVE)

    async def finished(answer_tokens: int) -> str:
        generation = runtime.submit(context, options, answer_tokens=answer_tokens)
        events = [event async for event in generation]
        return "".join(getattr(event, "text", "") for event in events)

    answered = len(context) - len(runtime.encode(prompt))
    assert text == streamed + await finished(answered)
    assert text != streamed + await finished(0)  # read as prompt, they would not count
