"""The OpenAI API, on the edge API and the cloud API alike, through the official `openai` client.

Three live targets: the edge serving locally (`route: edge`), the edge sending the request to a
cloud worker over the bus (`route: cloud`), and the cloud API in front of a worker. Every HTTP
body they answer (JSON or SSE chunk) is recorded and validated against the OpenAI OpenAPI
component schemas vendored in tests/data/openai_schema/ (see its README).
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from models.registry import ModelSet
from tests.fixtures_cloud import serve_cloud_api
from tests.waits import eventually

pytestmark = pytest.mark.slow

SCHEMA_FILE = Path(__file__).parent / "data" / "openai_schema" / "openai_components.json"
USER = [{"role": "user", "content": "Tell me about the software license"}]


# ------------------------------------------------------------------------------ schemas


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` (still in the 3.1 spec in places) as JSON Schema."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


def _load_schemas() -> dict[str, Any]:
    document = _nullable(json.loads(SCHEMA_FILE.read_text(encoding="utf-8")))
    # OpenAI streams completion chunks with `"finish_reason": null` until the last one,
    # which the spec's non-nullable enum does not allow: the one documented relaxation.
    stream = copy.deepcopy(document)
    choice = stream["components"]["schemas"]["CreateCompletionResponse"]["properties"]
    reason = choice["choices"]["items"]["properties"]["finish_reason"]
    choice["choices"]["items"]["properties"]["finish_reason"] = {
        "anyOf": [reason, {"type": "null"}]
    }
    return {"plain": document, "stream": stream}


SCHEMAS = _load_schemas()


def validate(name: str, body: Any, *, stream: bool = False) -> None:
    """Validate `body` against the component schema `name` (jsonschema, draft 2020-12)."""
    document = SCHEMAS["stream" if stream else "plain"]
    schema = {**document, "$ref": f"#/components/schemas/{name}"}
    jsonschema.Draft202012Validator(schema).validate(body)


def schema_for(path: str, status: int, stream: bool) -> str:
    if status >= 400:
        return "ErrorResponse"
    if path.endswith("/chat/completions"):
        return "CreateChatCompletionStreamResponse" if stream else "CreateChatCompletionResponse"
    if path.endswith("/completions"):
        return "CreateCompletionResponse"
    if path.endswith("/models"):
        return "ListModelsResponse"
    return "Model"


# ------------------------------------------------------------------------------ targets


@dataclass
class Target:
    """One API under test: where it is, which model and extra body fields to use, where its
    answers must say they were served (`served_by`), and every body it answered (path,
    status, streamed, JSON)."""

    name: str
    url: str
    model: str
    extra_body: dict[str, Any]
    served_by: str
    #: `system_fingerprint` of its answers: `fp_` and the version of the model that serves.
    fingerprint: str = ""
    bodies: list[tuple[str, int, bool, Any]] = field(default_factory=list)
    #: What was wrong with its answers: not served where asked, or a stream without its
    #: closing `[DONE]` (checked after every call).
    misplaced: list[str] = field(default_factory=list)

    async def _record(self, response: Any) -> None:  # the openai client's httpx Response
        await response.aread()  # the SDK then reads the stream from the buffered content
        path, status = response.request.url.path, response.status_code
        if "text/event-stream" in response.headers.get("content-type", ""):
            chunks = [
                json.loads(line[6:])
                for line in response.text.splitlines()
                if line.startswith("data: ") and line != "data: [DONE]"
            ]
            self.bodies.extend((path, status, True, chunk) for chunk in chunks)
            self._check_served(response, chunks, stream=True)
            if response.text.rstrip().splitlines()[-1:] != ["data: [DONE]"]:
                self.misplaced.append(f"{path}: a stream that does not end with [DONE]")
        elif "json" in response.headers.get("content-type", ""):
            self.bodies.append((path, status, False, response.json()))
            self._check_served(response, [response.json()], stream=False)

    def _check_served(self, response: Any, bodies: list[Any], *, stream: bool) -> None:
        """Note an answer that does not say it was served by `served_by`: the edge says it
        in a header and in every body and chunk; the cloud API in its body, or in a
        stream's closing chunk (docs/api.md, "Responses")."""
        path = response.request.url.path
        if response.status_code != 200 or not path.endswith("completions"):
            return
        edge = self.name != "cloud"
        header = response.headers.get("x-hybridgen-served-by")
        if edge and header != self.served_by:
            self.misplaced.append(f"{path}: header X-Hybridgen-Served-By {header!r}")
        for body in bodies:
            closing = (
                stream
                and bool(body.get("choices"))
                and (body["choices"][0].get("finish_reason") is not None)
            )
            said = body.get("served_by")
            if said != self.served_by and (edge or not stream or closing or said is not None):
                self.misplaced.append(f"{path}: served_by {said!r} in {body}")
            # The edge says why too: the route the request asked for.
            if edge and body.get("route_reason") != f"requested_{self.served_by}":
                self.misplaced.append(f"{path}: route_reason {body.get('route_reason')!r}")

    def assert_served_where_asked(self) -> None:
        """Every answer so far said it was served by `served_by`, every stream ended with
        `[DONE]`."""
        assert not self.misplaced, f"{self.name} answers (to serve: {self.served_by}): " + (
            "; ".join(self.misplaced[:3])
        )

    def client(self) -> openai.AsyncOpenAI:
        http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [self._record]}, timeout=60)
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, http_client=http
        )

    def validate_all(self) -> int:
        """Validate every recorded body against its OpenAI schema; how many there were."""
        for path, status, stream, body in self.bodies:
            validate(schema_for(path, status, stream), body, stream=stream)
        return len(self.bodies)

    async def chat(self, **kwargs: Any) -> Any:
        extra = {**self.extra_body, **kwargs.pop("extra_body", {})}
        async with self.client() as client:
            answer = await client.chat.completions.create(
                model=self.model,
                messages=kwargs.pop("messages", USER),
                max_tokens=kwargs.pop("max_tokens", 12),
                extra_body=extra or None,
                **kwargs,
            )
        self.assert_served_where_asked()
        return answer

    async def chat_stream(self, **kwargs: Any) -> list[Any]:
        answer = await self.chat(stream=True, **kwargs)
        return [chunk async for chunk in answer]

    async def complete(self, **kwargs: Any) -> Any:
        extra = {**self.extra_body, **kwargs.pop("extra_body", {})}
        async with self.client() as client:
            answer = await client.completions.create(
                model=self.model,
                prompt=kwargs.pop("prompt", "The software"),
                max_tokens=kwargs.pop("max_tokens", 12),
                extra_body=extra or None,
                **kwargs,
            )
        self.assert_served_where_asked()
        return answer


@pytest.fixture
async def cloud_api(nats_url: str, tiny_models: ModelSet) -> AsyncIterator[str]:
    """A live cloud API (uvicorn) on the test's nats-server; its base URL."""
    async with serve_cloud_api(
        nats_url, models=["hg-cloud"], idle_timeout_s=5.0, accept_timeout_s=5.0
    ) as url:
        yield url


@pytest.fixture(params=["edge", "edge-to-cloud", "cloud"])
async def target(
    request: pytest.FixtureRequest,
    start_edge: Callable[..., Any],
    start_worker: Callable[..., Any],
    cloud_api: str,
) -> AsyncIterator[Target]:
    """Each API under test, with a cloud worker behind it; every body validated after, and
    every answer served where the target says (`edge`: at the edge; the others: the cloud)."""
    worker = await start_worker()
    cloud_print = f"fp_{worker.model_version}"
    if request.param == "cloud":
        api = Target("cloud", cloud_api, "hg-cloud", {}, "cloud", cloud_print)
    else:
        edge = await start_edge(policy={"perplexity_threshold": 1e9})
        route = "edge" if request.param == "edge" else "cloud"
        if route == "cloud":  # the edge's bus link connects in the background
            await eventually(edge.node.cloud_available, "the edge's link to the cloud")
        fingerprint = f"fp_{edge.node.runtime.version}" if route == "edge" else cloud_print
        api = Target(request.param, edge.url, "hg-edge", {"route": route}, route, fingerprint)
    yield api
    assert api.validate_all() > 0
    api.assert_served_where_asked()


# --------------------------------------------------------------------------------- tests


async def test_required_fields_usage_chunk_and_fingerprint(target: Target) -> None:
    answer = await target.chat(temperature=0)
    choice = answer.choices[0]
    assert choice.logprobs is None and choice.message.refusal is None
    assert choice.message.annotations == []
    # Greedy, 12 tokens asked: the tiny models write all 12 (no end token before).
    assert (choice.finish_reason, answer.usage.completion_tokens) == ("length", 12)
    assert answer.system_fingerprint == target.fingerprint  # the serving model's version
    raw = target.bodies[-1][3]["choices"][0]
    assert {"logprobs", "finish_reason"} <= raw.keys() and "refusal" in raw["message"]

    chunks = await target.chat_stream(temperature=0, stream_options={"include_usage": True})
    *answer_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == answer.usage.completion_tokens
    assert usage_chunk.system_fingerprint == answer.system_fingerprint
    assert "".join(c.choices[0].delta.content or "" for c in answer_chunks) == (
        choice.message.content
    )
    streamed = [body for _, _, stream, body in target.bodies if stream]
    # The cloud tells its version at the end: only the closing and usage chunks carry it.
    prints = [body.get("system_fingerprint") for body in streamed]
    if target.served_by == "cloud":
        assert prints == [None] * (len(prints) - 2) + [target.fingerprint] * 2
    else:
        assert prints == [target.fingerprint] * len(prints)
    assert all("finish_reason" in body["choices"][0] for body in streamed[:-1])
    assert [body["choices"][0]["finish_reason"] for body in streamed[:-1]][-1] is not None
    assert all(body["choices"][0]["finish_reason"] is None for body in streamed[:-2])

    # Completions at parity; unknown fields are ignored.
    completion = await target.complete(temperature=0, extra_body={"no_such_field": 1})
    assert completion.choices[0].logprobs is None and completion.usage is not None
    pieces = await (await target.complete(temperature=0, stream=True)).__aiter__().__anext__()
    assert pieces.choices[0].finish_reason is None


async def test_logprobs_and_top_logprobs(target: Target) -> None:
    answer = await target.chat(temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 12  # one entry per token
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # Greedy: the chosen token is the most likely one, with the same log-probability.
        assert math.isclose(entry.logprob, values[0], abs_tol=1e-3)
        assert entry.bytes == list(entry.token.encode("utf-8"))

    chunks = await target.chat_stream(temperature=0, logprobs=True, top_logprobs=3)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in (
        c.choices[0].logprobs.content or []
    )]  # fmt: skip
    assert [e.token for e in streamed] == [e.token for e in content]

    completion = await target.complete(temperature=0, logprobs=2)
    scores = completion.choices[0].logprobs
    assert len(scores.tokens) == len(scores.token_logprobs) == completion.usage.completion_tokens
    assert [len(top) for top in scores.top_logprobs] == [2] * len(scores.tokens)
    # Each token's offset in the answer: the lengths of the tokens before it.
    assert scores.text_offset == [
        sum(map(len, scores.tokens[:i])) for i in range(len(scores.tokens))
    ]
    assert all(lp <= 0 for lp in scores.token_logprobs)


async def test_same_seed_same_answer(target: Target) -> None:
    sampled = {"temperature": 1.0, "max_tokens": 16, "seed": 1234}
    first = await target.chat(**sampled)
    # Again, next to an unseeded neighbour (a batch neighbour in the cloud).
    second, _ = await asyncio.gather(target.chat(**sampled), target.chat(temperature=1.0))
    assert second.choices[0].message.content == first.choices[0].message.content
    other = [await target.chat(**{**sampled, "seed": seed}) for seed in (1, 2, 3)]
    texts = {first.choices[0].message.content, *(o.choices[0].message.content for o in other)}
    assert len(texts) > 1, "the seed changes nothing: sampling is not seeded"


async def test_stop_string_and_list(target: Target) -> None:
    prompt = "Permission is hereby granted, free of charge, to any person obtaining a copy"
    sampled: dict[str, Any] = {"prompt": prompt, "temperature": 1.0, "seed": 3, "max_tokens": 16}
    full = (await target.complete(**sampled)).choices[0].text
    cut = next((i for i in range(2, len(full)) if full[i] not in full[:2]), None)
    assert cut is not None, f"no stop string to pick in {full!r}"
    stop = full[cut]
    for given in (stop, [stop, "\u2603never"]):
        answer = await target.complete(**sampled, stop=given)
        assert answer.choices[0].text == full[: full.index(stop)]
        assert answer.choices[0].finish_reason == "stop"
    chunks = [c async for c in await target.complete(**sampled, stop=[stop], stream=True)]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full[: full.index(stop)]


async def _refused(call: Any) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        await call
    return info.value


async def test_unsupported_values_get_a_400_naming_param(target: Target) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 9}, "n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
    ]
    for kwargs, param in cases:
        error = await _refused(target.chat(**kwargs))
        assert (error.status_code, error.param) == (400, param), kwargs
    image = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        }
    ]
    error = await _refused(target.chat(messages=image))
    assert error.status_code == 400 and (error.param or "").startswith("messages")
    assert "image_url" in str(error.message)
    # Zero penalties and n=1 are what OpenAI's defaults are: accepted, the same answer.
    ok = await target.chat(n=1, presence_penalty=0, frequency_penalty=0.0, temperature=0)
    assert (ok.choices[0].finish_reason, ok.usage.completion_tokens) == ("length", 12)


async def test_models_and_one_model(target: Target) -> None:
    async with target.client() as client:
        listed = await client.models.list()
        assert target.model in [m.id for m in listed.data]
        one = await client.models.retrieve(target.model)
        assert (one.id, one.object) == (target.model, "model")
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve("no-such-model")
    assert info.value.param == "model"
