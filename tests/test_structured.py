"""Structured outputs (`response_format`): constrained decoding on the edge and in the cloud.

Driven by the official `openai` client against a live edge (tiny model set) and the live
cloud API, with real workers on a real nats-server. The tiny models write gibberish: an
answer valid against its schema is there only because the decoder was constrained.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from broker import wire
from broker.errors import BadRequest
from models.registry import CLOUD_MODEL
from serving.grammar import Grammar, from_response_format, json_schema_grammar
from tests.fixtures_cloud import serve_cloud_api
from tests.fixtures_edge import LiveEdge
from tests.waits import eventually

EDGE_MODEL = "hg-edge"
MESSAGES: Any = [{"role": "user", "content": "Describe a person as JSON."}]


class Person(BaseModel):
    """Bounded fields: a gibberish model still reaches the end of the object."""

    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad"]


#: Person's schema, closed to other keys (as `parse` sends it).
PERSON_SCHEMA = {**Person.model_json_schema(), "additionalProperties": False}
BAD_SCHEMA: Any = {
    "type": "json_schema",
    "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}, "strict": True},
}


# ------------------------------------------------------------------------------- grammar


def test_response_format_maps_to_one_grammar() -> None:
    assert from_response_format(None) is None
    assert from_response_format({"type": "text"}) is None
    obj = from_response_format({"type": "json_object"})
    assert obj is not None and obj.kind == "json_schema"
    assert json.loads(obj.data) == {"type": "object", "x-guidance": {"whitespace_flexible": False}}
    schema = Person.model_json_schema()
    strict = from_response_format(
        {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}}
    )
    assert strict == json_schema_grammar(schema)
    # A schema's own whitespace choice is kept.
    loose = json_schema_grammar({"type": "object", "x-guidance": {"whitespace_flexible": True}})
    assert json.loads(loose.data)["x-guidance"] == {"whitespace_flexible": True}


@pytest.mark.parametrize(
    "value",
    [
        BAD_SCHEMA,
        {"type": "json_schema", "json_schema": {"name": "no schema"}},
        {"type": "xml"},
        "json",
    ],
)
def test_bad_response_format_names_the_field(value: Any) -> None:
    with pytest.raises(BadRequest) as caught:
        from_response_format(value)
    assert caught.value.param == "response_format"


def test_grammar_travels_on_the_bus() -> None:
    grammar = json_schema_grammar(Person.model_json_schema())
    request = wire.GenerateRequest(request_id="r", model="m", prompt="p", grammar=grammar.to_wire())
    decoded = wire.decode(wire.encode(request), wire.GenerateRequest)
    assert decoded.v == wire.VERSION == 3
    assert Grammar.from_wire(decoded.grammar) == grammar
    assert (
        Grammar.from_wire(wire.GenerateRequest(request_id="r", model="m", prompt="p").grammar)
        is None
    )
    old = wire.encode(request).replace(b"\xa1v\x03", b"\xa1v\x02")
    with pytest.raises(BadRequest, match="version 2"):
        wire.decode(old, wire.GenerateRequest)


# --------------------------------------------------------------------------------- edge


async def parse_person(client: openai.AsyncOpenAI, model: str, **extra: Any) -> Any:
    return await client.chat.completions.parse(
        model=model,
        messages=MESSAGES,
        response_format=Person,
        max_tokens=96,
        temperature=0,
        extra_body=extra or None,
    )


def assert_person(completion: Any) -> Person:
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    parsed = choice.message.parsed
    assert isinstance(parsed, Person)
    assert Person.model_validate_json(choice.message.content) == parsed
    return parsed


@pytest.mark.slow
async def test_edge_answers_valid_against_the_schema(
    start_edge: Callable[..., Awaitable[LiveEdge]],
) -> None:
    edge = await start_edge()
    async with edge.client() as client:
        done = await parse_person(client, EDGE_MODEL, route="edge")
        assert (done.model_extra or {})["served_by"] == "edge"
        assert_person(done)

        sampled = await client.chat.completions.create(
            model=EDGE_MODEL,
            messages=MESSAGES,
            response_format={"type": "json_object"},
            max_tokens=96,
            temperature=1.0,
            seed=1,  # the tiny model closes the object (many seeds ramble to the limit)
            extra_body={"route": "edge"},
        )
        assert (sampled.model_extra or {})["served_by"] == "edge"
        assert sampled.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(sampled.choices[0].message.content or ""), dict)

        # Streamed: the deltas join into the same valid answer.
        pieces = []
        stream = await client.chat.completions.create(
            model=EDGE_MODEL,
            messages=MESSAGES,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON_SCHEMA},
            },
            max_tokens=96,
            temperature=0,
            stream=True,
            extra_body={"route": "edge"},
        )
        async for chunk in stream:
            assert (chunk.model_extra or {})["served_by"] == "edge"  # every chunk says it
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
        Person.model_validate_json("".join(pieces))

        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=EDGE_MODEL, messages=MESSAGES, response_format=BAD_SCHEMA, max_tokens=8
            )
        assert caught.value.param == "response_format"
        assert "no-such-type" in caught.value.message


@pytest.mark.slow
async def test_constrained_fallback_is_constrained_in_the_cloud(
    start_edge: Callable[..., Awaitable[LiveEdge]], start_worker: Callable[..., Awaitable[Any]]
) -> None:
    await start_worker()
    edge = await start_edge()
    await eventually(edge.node.cloud_available, "the edge's link to the cloud")
    async with edge.client() as client:
        done = await parse_person(client, EDGE_MODEL, route="cloud")
    assert (done.model_extra or {})["served_by"] == "cloud"
    assert_person(done)


# -------------------------------------------------------------------------------- cloud


@pytest.fixture
async def cloud_api(nats_url: str) -> AsyncIterator[str]:
    """The cloud API on a free port (its workers: `start_worker`); yields its base URL."""
    async with serve_cloud_api(nats_url, models=[CLOUD_MODEL], idle_timeout_s=10.0) as url:
        yield url


@pytest.mark.slow
async def test_cloud_api_answers_valid_against_the_schema(
    cloud_api: str, start_worker: Callable[..., Awaitable[Any]]
) -> None:
    await start_worker()
    async with openai.AsyncOpenAI(
        base_url=f"{cloud_api}/v1", api_key="none", max_retries=0
    ) as client:
        # Two at once: a constrained row and an unconstrained one share the batch.
        constrained, free = await asyncio.gather(
            parse_person(client, CLOUD_MODEL),
            client.chat.completions.create(
                model=CLOUD_MODEL, messages=MESSAGES, max_tokens=40, temperature=0
            ),
        )
        assert_person(constrained)
        assert free.choices[0].message.content
        assert [(a.model_extra or {})["served_by"] for a in (constrained, free)] == ["cloud"] * 2

        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=CLOUD_MODEL, messages=MESSAGES, response_format=BAD_SCHEMA, max_tokens=8
            )
        assert caught.value.param == "response_format"
