"""The OpenAI surface through a live `hybridgen up --headless` network, with the official
client: structured output, a forced tool call and its second turn, logprobs and the usage
chunk, against the edge API (served locally and routed to the cloud) and the cloud API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from models.registry import ModelSet
from tests.test_up import running_up
from tests.waits import eventually

pytestmark = pytest.mark.slow


class Person(BaseModel):
    """Bounded fields: even a gibberish model reaches the end of the object."""

    name: str = Field(max_length=8)
    mood: Literal["happy", "sad"]


ADD: Any = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["n"],
    "additionalProperties": False,
}
TOOLS: Any = [{"type": "function", "function": {"name": "a", "parameters": ADD}}]


def served_by(answer: Any) -> str:
    """Where an answer (or a chunk) says it was served."""
    return str((answer.model_extra or {}).get("served_by"))


async def check_api(
    client: openai.AsyncOpenAI, model: str, extra: dict[str, Any], where: str
) -> None:
    """One pass over the features on one API (`extra`: the edge's routing hint, if any),
    every answer served `where` (edge or cloud)."""
    parsed = await client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "A person?"}],
        response_format=Person,
        temperature=0,
        max_tokens=40,
        extra_body=extra,
    )
    assert isinstance(parsed.choices[0].message.parsed, Person), parsed
    assert served_by(parsed) == where

    ask: Any = [{"role": "user", "content": "Add?"}]
    called = await client.chat.completions.create(
        model=model,
        messages=ask,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "a"}},
        temperature=0,
        max_tokens=45,  # room for one call on the tiny edge model (128-token window)
        extra_body=extra,
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, called
    assert served_by(called) == where
    call = choice.message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), ADD)
    second = await client.chat.completions.create(
        model=model,
        messages=[
            *ask,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "5"},
        ],
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=4,
        extra_body=extra,
    )
    assert second.choices[0].message.tool_calls is None
    assert (second.choices[0].finish_reason, second.usage.completion_tokens) == ("length", 4)
    assert served_by(second) == where

    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    closing = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert [served_by(c) for c in closing] == [where]
    scored = [c for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert scored and all(
        len(entry.top_logprobs) == 2
        for chunk in scored
        for entry in chunk.choices[0].logprobs.content or []
    )


async def test_structured_tools_logprobs_and_usage_through_up(
    tiny_models: ModelSet, tmp_path: Path
) -> None:
    async with running_up(tiny_models, tmp_path) as up:
        edge = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{up.edge_port}/v1", api_key="none", max_retries=0
        )
        cloud = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{up.api_port}/v1", api_key="none", max_retries=0
        )
        async with edge, cloud:
            await check_api(edge, "hg-edge", {"route": "edge"}, "edge")

            async def linked() -> bool:  # the edge's bus link to the cloud is up
                cards = (await edge.models.list()).data
                return any((c.model_extra or {}).get("available") for c in cards)

            await eventually(linked, "the edge's link to the cloud")
            await check_api(edge, "hg-edge", {"route": "cloud"}, "cloud")
            await check_api(cloud, "hg-cloud", {}, "cloud")
