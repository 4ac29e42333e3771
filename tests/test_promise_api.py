"""Promises of docs/api.md, on the edge API and the cloud API alike.

- "Request parameters": the end token is not listed in the log-probabilities. An answer
  that ends with its end token (`finish_reason: "stop"`) lists one entry per token of its
  text, and none for the end token.
- "Tool calling": `tool_choice: auto` with a `json_schema` `response_format`: the text the
  model writes instead of a call is that JSON.

Three live targets started once for the module (real uvicorn servers, a real nats-server,
the session's tiny models): the edge serving locally, the same edge sending the request to
a real cloud worker (`route: cloud`), and the cloud API in front of that worker.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema
import pytest
import pytest_asyncio

from broker.bus import connect
from broker.server import NatsServer
from cloud.settings import WorkerSettings
from cloud.worker import CloudWorker
from edge.settings import EdgeSettings
from models.registry import ModelSet
from tests.fixtures_cloud import serve_cloud_api
from tests.fixtures_edge import serve_edge
from tests.waits import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Api:
    """A live API: its base URL, the model and extra fields a request sends, where the
    answer must be served (`served_by`)."""

    name: str
    url: str
    model: str
    served_by: str
    extra: dict[str, Any] = field(default_factory=dict)

    async def chat(self, **fields: Any) -> dict[str, Any]:
        """A chat answer's JSON body (200, served where the target says)."""
        body = {"model": self.model, "temperature": 0, **self.extra, **fields}
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as http:
            answer = await http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        assert result["served_by"] == self.served_by, result
        return result


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def apis(
    tiny_models: ModelSet, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Api]]:
    """The three targets (see the module docstring), started once."""
    folder = tmp_path_factory.mktemp("promise_api")
    server = NatsServer(store_dir=folder / "nats")
    await server.start()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(server.shutdown)
        nc = await connect(server.client_url, name="test-promise-api-worker")
        stack.push_async_callback(nc.close)
        worker = CloudWorker(
            nc,
            WorkerSettings(
                model_dir=tiny_models.cloud_dir, threads=1, cache_tokens=2048, max_batch_tokens=256
            ),
        )
        await worker.start()
        stack.push_async_callback(worker.close)
        settings = EdgeSettings(
            model_dir=tiny_models.edge_dir("int4"),
            nats_url=server.client_url,
            node_id="edge-promise-api",
            users_db=folder / "users.sqlite3",
            threads=1,
            reconnect_s=0.2,
            policy={"perplexity_threshold": 1e9},  # the route is the request's own
        )
        edge = await stack.enter_async_context(serve_edge(settings))
        await eventually(edge.node.cloud_available, "the edge's link to the cloud worker")
        cloud = await stack.enter_async_context(
            serve_cloud_api(server.client_url, models=["hg-cloud"])
        )
        yield {
            "edge": Api("edge", edge.url, "hg-edge", "edge", {"route": "edge"}),
            "edge-to-cloud": Api("edge-to-cloud", edge.url, "hg-edge", "cloud", {"route": "cloud"}),
            "cloud": Api("cloud", cloud, "hg-cloud", "cloud"),
        }


@pytest.fixture(params=["edge", "edge-to-cloud", "cloud"])
def api(request: pytest.FixtureRequest, apis: dict[str, Api]) -> Api:
    """Each target."""
    return apis[request.param]


# ------------------------------------------------------------ "Request parameters"

#: A schema the tiny models complete in a few tokens: once the JSON is whole, the grammar
#: allows only the end token, so the answer ends with it (`finish_reason: "stop"`).
PICK: dict[str, Any] = {
    "type": "object",
    "properties": {"c": {"enum": ["yes", "no"]}},
    "required": ["c"],
    "additionalProperties": False,
}
PICK_FORMAT = {"type": "json_schema", "json_schema": {"name": "pick", "schema": PICK}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def sse_chunks(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON chunks of a stream's `data:` lines, which must end with `[DONE]`."""
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


async def chat_stream(api: Api, **fields: Any) -> list[dict[str, Any]]:
    """A streamed chat's chunks (its closing chunk saying it was served where asked)."""
    body = {"model": api.model, "temperature": 0, **api.extra, **fields, "stream": True}
    async with (
        httpx.AsyncClient(base_url=api.url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as answer,
    ):
        assert answer.status_code == 200, await answer.aread()
        lines = [line async for line in answer.aiter_lines() if line.startswith("data: ")]
    chunks = sse_chunks(lines)
    closing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert closing[-1]["served_by"] == api.served_by, closing[-1]
    return chunks


def assert_text_only_listed(content: str, entries: list[dict[str, Any]], usage: int) -> None:
    """The log-probabilities list the tokens of `content` and nothing else: their texts
    joined are the content, and there is one fewer than the `usage` completion tokens,
    which count the end token."""
    assert "".join(entry["token"] for entry in entries) == content
    assert len(entries) == usage - 1


async def test_the_end_token_is_not_listed_in_the_logprobs(api: Api) -> None:
    """docs/api.md, "Request parameters": "The end token is not listed." Under a schema
    whose JSON the model completes in a few tokens, the answer ends with its end token
    (`stop`): one entry per token of the text, none for the end token; streamed too."""
    ask: dict[str, Any] = {
        "messages": ASK, "response_format": PICK_FORMAT, "logprobs": True, "max_tokens": 30,
    }  # fmt: skip
    body = await api.chat(**ask)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    content = choice["message"]["content"]
    jsonschema.validate(json.loads(content), PICK)
    completion_tokens = body["usage"]["completion_tokens"]
    assert_text_only_listed(content, choice["logprobs"]["content"], completion_tokens)

    chunks = await chat_stream(api, **ask, stream_options={"include_usage": True})
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert choices[-1]["finish_reason"] == "stop"
    entries = [e for c in choices if c.get("logprobs") for e in c["logprobs"]["content"]]
    streamed = "".join(c["delta"].get("content") or "" for c in choices)
    assert streamed == content
    assert_text_only_listed(streamed, entries, chunks[-1]["usage"]["completion_tokens"])


# ------------------------------------------------------------------- "Tool calling"

#: Two small bounded tools (test_tools.py's): the prompt, their listing and one call fit the
#: tiny edge model's window of 128 tokens.
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "w",
            "parameters": {
                "type": "object",
                "properties": {"u": {"enum": ["c", "f"]}},
                "required": ["u"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "a",
            "parameters": {
                "type": "object",
                "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["n"],
                "additionalProperties": False,
            },
        },
    },
]
#: `auto` with the `PICK` schema, sampled: on these seeds each end's tiny model answers in
#: text, on `CALL_SEED` it calls `w` (found by trying seeds; sampling is seeded, so each
#: makes the same choice on every run). Greedy, the cloud model always calls.
TEXT_SEED = {"edge": 1, "edge-to-cloud": 1, "cloud": 1}
CALL_SEED = {"edge": 3, "edge-to-cloud": 2, "cloud": 2}
AUTO: dict[str, Any] = {
    "messages": ASK, "tools": TOOLS, "tool_choice": "auto", "temperature": 1.0,
    "max_tokens": 45,
}  # fmt: skip


async def test_auto_with_a_json_schema_answers_in_that_json(api: Api) -> None:
    """docs/api.md, "Tool calling": under `auto`, "with a `json_schema` `response_format`,
    the text is that JSON". On a seed where the model answers in text: the text is JSON
    valid against the schema, ended by the end token, whole and streamed; the same request
    without the schema answers text that is not JSON (the JSON is the schema's doing)."""
    ask = {**AUTO, "seed": TEXT_SEED[api.name]}
    free = (await api.chat(**ask))["choices"][0]
    assert free["message"].get("tool_calls") is None
    with pytest.raises(json.JSONDecodeError):
        json.loads(free["message"]["content"])

    body = await api.chat(**ask, response_format=PICK_FORMAT)
    choice = body["choices"][0]
    assert (choice["finish_reason"], choice["message"].get("tool_calls")) == ("stop", None)
    jsonschema.validate(json.loads(choice["message"]["content"]), PICK)
    chunks = await chat_stream(api, **ask, response_format=PICK_FORMAT)
    choices = [c["choices"][0] for c in chunks]
    streamed = "".join(c["delta"].get("content") or "" for c in choices)
    assert streamed == choice["message"]["content"]
    assert choices[-1]["finish_reason"] == "stop"
    assert not any(c["delta"].get("tool_calls") for c in choices)


async def test_auto_with_a_json_schema_may_still_call_a_tool(api: Api) -> None:
    """docs/api.md, "Tool calling": `auto` is "either text ..., or calls (never both)",
    the schema or not. On a seed where the model calls: one call of `w`, arguments valid
    against its parameters, no text, `finish_reason: "tool_calls"`."""
    body = await api.chat(**AUTO, seed=CALL_SEED[api.name], response_format=PICK_FORMAT)
    choice = body["choices"][0]
    assert (choice["finish_reason"], choice["message"]["content"]) == ("tool_calls", None)
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "w"
    parameters = TOOLS[0]["function"]["parameters"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)
