"""The bad-input catalogue over HTTP: every row on the edge API and the cloud API alike.

Each row is one refusal that docs/api.md ("Refused values"), docs/cloud.md ("Errors") and
docs/edge.md ("Input limits and refusals") state, with its exact `status`, `error.type`,
`code` and `param` (and a piece of the message where the docs give one). Every row runs on
four live APIs (real uvicorn servers, real nats-servers, a real cloud worker):

- `edge`: an edge alone on its bus (no worker: the cloud is unavailable);
- `edge-to-cloud`: an edge with a live worker behind it, the request sent with `route: cloud`;
- `edge-cloud-model`: the same edge, the request naming the cloud's model (`hg-cloud`);
- `cloud`: the cloud API in front of the same worker.

Bad input the edge would send to the cloud gets the same clear error, never a 5xx, and each
API keeps serving: a good request is answered (by the end the API says) after each row. The
servers are shared by the whole module (started once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
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

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

#: What both APIs refuse above (the edge's and the cloud API's default, 1 MiB).
BODY_LIMIT = 1 << 20
#: OpenAI's `error.type` of a refused request and of an unknown model (docs/api.md).
INVALID = "invalid_request_error"
NOT_FOUND = "not_found_error"


@dataclass
class Api:
    """A live API under test: its base URL, the model and extra body fields a request sends
    to it, where a good answer is served, and the edge's context window (None: the cloud)."""

    name: str
    url: str
    model: str
    extra: dict[str, Any] = field(default_factory=dict)
    served_by: str = "cloud"
    edge_context: int | None = None


@contextlib.asynccontextmanager
async def nats_on(folder: Path) -> AsyncIterator[str]:
    """A real nats-server with its store in `folder`; its client URL."""
    server = NatsServer(store_dir=folder)
    try:
        await server.start()
        yield server.client_url
    finally:
        await server.shutdown()


def edge_settings(models: ModelSet, nats_url: str, folder: Path, node_id: str) -> EdgeSettings:
    """An edge on the tiny int4 model, its users in `folder`, the cloud never judged
    low-confidence (the routing is the request's own)."""
    return EdgeSettings(
        model_dir=models.edge_dir("int4"),
        nats_url=nats_url,
        node_id=node_id,
        users_db=folder / node_id / "users.sqlite3",
        threads=1,
        reconnect_s=0.2,
        policy={"perplexity_threshold": 1e9},
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def apis(
    tiny_models: ModelSet, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Api]]:
    """The four APIs under test, started once for the module (see the module docstring)."""
    folder = tmp_path_factory.mktemp("catalogue_http")
    async with contextlib.AsyncExitStack() as stack:
        alone_url = await stack.enter_async_context(nats_on(folder / "nats-alone"))
        fleet_url = await stack.enter_async_context(nats_on(folder / "nats-fleet"))
        nc = await connect(fleet_url, name="test-cloud-worker")
        stack.push_async_callback(nc.close)
        worker = CloudWorker(
            nc,
            WorkerSettings(
                model_dir=tiny_models.cloud_dir, threads=1, cache_tokens=2048, max_batch_tokens=256
            ),
        )
        await worker.start()
        stack.push_async_callback(worker.close)
        alone = await stack.enter_async_context(
            serve_edge(edge_settings(tiny_models, alone_url, folder, "edge-alone"))
        )
        linked = await stack.enter_async_context(
            serve_edge(edge_settings(tiny_models, fleet_url, folder, "edge-linked"))
        )
        await eventually(linked.node.cloud_available, "the edge's link to the cloud worker")
        cloud = await stack.enter_async_context(
            serve_cloud_api(fleet_url, models=["hg-cloud"], max_body_bytes=BODY_LIMIT)
        )
        context = alone.node.runtime.context_length
        yield {
            "edge": Api("edge", alone.url, "hg-edge", served_by="edge", edge_context=context),
            "edge-to-cloud": Api(
                "edge-to-cloud", linked.url, "hg-edge", {"route": "cloud"}, edge_context=context
            ),
            "edge-cloud-model": Api(
                "edge-cloud-model", linked.url, "hg-cloud", edge_context=context
            ),
            "cloud": Api("cloud", cloud, "hg-cloud"),
        }


@pytest.fixture(params=["edge", "edge-to-cloud", "edge-cloud-model", "cloud"])
def api(request: pytest.FixtureRequest, apis: dict[str, Api]) -> Api:
    """Each API under test."""
    return apis[request.param]


def completion(api: Api, **fields: Any) -> dict[str, Any]:
    good = {"model": api.model, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
    return {**good, **api.extra, **fields}


def chat(api: Api, **fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Hello"}]
    good = {"model": api.model, "messages": messages, "max_tokens": 2, "temperature": 0}
    return {**good, **api.extra, **fields}


async def still_serving(http: httpx.AsyncClient, api: Api) -> None:
    """A good request after the bad one: answered, by the end the API serves it at."""
    response = await http.post("/v1/completions", json=completion(api))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["text"] is not None
    assert body["served_by"] == api.served_by, body


def assert_error(
    response: httpx.Response,
    status: int,
    kind: str,
    code: str,
    param: str | None,
    says: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error envelope with exactly this status, type, code and param (and `says`
    in its message); returns the error."""
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["code"], error["param"]) == (kind, code, param), error
    assert error["message"], error
    if says is not None:
        assert says in error["message"], error
    return error


async def post(
    http: httpx.AsyncClient,
    path: str,
    content: bytes | dict[str, Any],
    content_type: str = "application/json",
) -> httpx.Response:
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    return await http.post(path, content=raw, headers={"content-type": content_type})


# ------------------------------------------------------------------------------- the rows


@dataclass(frozen=True)
class Row:
    """One refusal: the request (fields over a good body, or a raw body) and its answer."""

    name: str
    path: str
    fields: dict[str, Any] | bytes
    param: str | None
    status: int = 400
    kind: str = INVALID
    code: str = "bad_request"
    says: str | None = None
    content_type: str = "application/json"


COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
FN = {"type": "function", "function": {"name": "f"}}

# fmt: off
ROWS: list[Row] = [
    # Malformed bodies: no field is at fault, so `param` is null.
    Row("malformed_json", COMPLETIONS, b'{"model": "x", "prompt": ', None),
    Row("body_string", COMPLETIONS, b'"Hello"', None),
    Row("body_list", COMPLETIONS, b'[{"model": "x"}]', None),
    Row("body_number", COMPLETIONS, b"42", None),
    Row("body_null", COMPLETIONS, b"null", None),
    Row("invalid_utf8", COMPLETIONS, b'{"model": "x", "prompt": "\xff\xfe"}', None),
    Row("nan", COMPLETIONS, b'{"model": "x", "prompt": "x", "temperature": NaN}', None),
    Row("not_json_content_type", COMPLETIONS, b'{"model": "x"}', None, status=415,
        content_type="text/plain"),
    # Lone surrogates: the field that holds one.
    Row("surrogate_prompt", COMPLETIONS, b'{"model": "M", "prompt": "a\\ud800b"}', "prompt"),
    Row("surrogate_prompt_list", COMPLETIONS, b'{"model": "M", "prompt": ["\\udfff"]}',
        "prompt.0"),
    Row("surrogate_content", CHAT,
        b'{"model": "M", "messages": [{"role": "user", "content": "\\ud83d"}]}',
        "messages.0.content"),
    # Wrong types and values.
    Row("max_tokens_string", COMPLETIONS, {"max_tokens": "5"}, "max_tokens"),
    Row("max_tokens_float", COMPLETIONS, {"max_tokens": 2.5}, "max_tokens"),
    Row("max_tokens_zero", COMPLETIONS, {"max_tokens": 0}, "max_tokens"),
    Row("max_tokens_negative", CHAT, {"max_tokens": -1}, "max_tokens"),
    Row("temperature_string", COMPLETIONS, {"temperature": "hot"}, "temperature"),
    Row("temperature_above_2", CHAT, {"temperature": 2.5}, "temperature"),
    Row("seed_beyond_32_bits", COMPLETIONS, {"seed": 2**80}, "seed"),
    Row("prompt_number", COMPLETIONS, {"prompt": 5}, "prompt"),
    Row("prompt_two_strings", COMPLETIONS, {"prompt": ["a", "b"]}, "prompt"),
    Row("stream_string", COMPLETIONS, {"stream": "yes"}, "stream"),
    Row("model_number", COMPLETIONS, {"model": 7}, "model"),
    Row("messages_string", CHAT, {"messages": "hi"}, "messages"),
    Row("role_unknown", CHAT, {"messages": [{"role": "x", "content": "a"}]}, "messages.0.role"),
    # Nothing to answer.
    Row("prompt_empty", COMPLETIONS, {"prompt": ""}, "prompt"),
    Row("messages_empty", CHAT, {"messages": []}, "messages"),
    Row("content_empty", CHAT, {"messages": [{"role": "user", "content": ""}]}, "messages"),
    # docs/api.md, "Refused values".
    Row("n_9", COMPLETIONS, {"n": 9}, "n", says="between 1 and 8"),
    Row("n_0_chat", CHAT, {"n": 0}, "n", says="between 1 and 8"),
    Row("presence_penalty_above_2", CHAT, {"presence_penalty": 2.5}, "presence_penalty"),
    Row("frequency_penalty_below_minus_2", COMPLETIONS, {"frequency_penalty": -2.5},
        "frequency_penalty"),
    Row("repetition_penalty_zero", CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    Row("repetition_penalty_above_2", COMPLETIONS, {"repetition_penalty": 2.5},
        "repetition_penalty"),
    Row("image_part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
        "messages.0.content", says="the models read text only"),
    Row("top_logprobs_without_logprobs", CHAT, {"top_logprobs": 2}, "top_logprobs"),
    Row("top_logprobs_21", CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    Row("completions_logprobs_6", COMPLETIONS, {"logprobs": 6}, "logprobs"),
    Row("logit_bias", CHAT, {"logit_bias": {"50256": -100}}, "logit_bias", says="remove it"),
    Row("best_of", COMPLETIONS, {"best_of": 3}, "best_of", says="remove it"),
    Row("functions (legacy)", CHAT, {"functions": [{"name": "f"}]}, "functions",
        says="use tools and tool_choice"),
    Row("function_call (legacy)", CHAT, {"function_call": "auto"}, "function_call",
        says="use tools and tool_choice"),
    Row("function_call naming one (legacy)", CHAT, {"function_call": {"name": "f"}},
        "function_call", says="use tools and tool_choice"),
    Row("tools not a function", CHAT, {"tools": [{"type": "x"}]}, "tools"),
    Row("tool name invalid", CHAT, {"tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools"),
    Row("tool names repeated", CHAT, {"tools": [FN, FN]}, "tools", says="used twice"),
    Row("tool_choice not in tools", CHAT,
        {"tools": [FN], "tool_choice": {"type": "function", "function": {"name": "g"}}},
        "tool_choice"),
    Row("tool_choice auto without tools", CHAT, {"tool_choice": "auto"}, "tool_choice"),
    Row("tool_choice required without tools", CHAT, {"tool_choice": "required"}, "tool_choice"),
    Row("tools on completions", COMPLETIONS, {"tools": [FN]}, "tools",
        says="/v1/chat/completions"),
    Row("stop_5", CHAT, {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    Row("stop_empty", COMPLETIONS, {"stop": ""}, "stop", says="must not be empty"),
    Row("stop_empty_in_list", CHAT, {"stop": ["x", ""]}, "stop", says="must not be empty"),
    # Structured outputs.
    Row("unknown response_format", CHAT, {"response_format": {"type": "xml"}},
        "response_format"),
    Row("json_schema without a schema", CHAT,
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format"),
    # An unknown model: 404, and the message names the models there are.
    Row("unknown model", CHAT, {"model": "gpt-9"}, "model", status=404, kind=NOT_FOUND,
        code="not_found", says="hg-cloud"),
]
# fmt: on


def request_of(row: Row, api: Api) -> bytes | dict[str, Any]:
    """The row's request for `api`: its raw body (the model named), or its fields over a
    good body with the API's own extra fields."""
    if isinstance(row.fields, bytes):
        return row.fields.replace(b'"M"', json.dumps(api.model).encode())
    good = chat if row.path == CHAT else completion
    return good(api, **row.fields)


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
async def test_each_row_is_refused_with_its_status_type_code_and_param(api: Api, row: Row) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        response = await post(http, row.path, request_of(row, api), row.content_type)
        assert_error(response, row.status, row.kind, row.code, row.param, row.says)
        await still_serving(http, api)


# ----------------------------------------------------------------------- long inputs


async def test_huge_max_tokens_at_the_edge_alone_is_cut_to_the_room_left(
    apis: dict[str, Api],
) -> None:
    """No cloud to take it: the edge serves a prompt that fits with `max_tokens` cut to the
    room its window leaves (`route_reason: cloud_unavailable`), so the answer fills the
    window exactly and ends on `length` (edge/route/rules.py, `Decision.max_tokens`)."""
    api = apis["edge"]
    assert api.edge_context is not None
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        for path, good in ((COMPLETIONS, completion), (CHAT, chat)):
            response = await post(http, path, good(api, max_tokens=10**9))
            assert response.status_code == 200, response.text
            body = response.json()
            assert (body["served_by"], body["route_reason"]) == ("edge", "cloud_unavailable")
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"]["total_tokens"] == api.edge_context, body["usage"]
        await still_serving(http, api)


@pytest.mark.parametrize("name", ["edge-to-cloud", "edge-cloud-model", "cloud"])
async def test_huge_max_tokens_for_the_cloud_is_a_400_naming_max_tokens(
    apis: dict[str, Api], name: str
) -> None:
    """The cloud is the judge of its own window: prompt + max_tokens beyond it is a 400
    `context_length_exceeded` naming `max_tokens` (docs/cloud.md, "Errors")."""
    api = apis[name]
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        for path, good in ((COMPLETIONS, completion), (CHAT, chat)):
            response = await post(http, path, good(api, max_tokens=10**9))
            assert_error(response, 400, INVALID, "context_length_exceeded", "max_tokens")
        await still_serving(http, api)


async def test_a_prompt_beyond_every_window_is_a_400_naming_it(api: Api) -> None:
    """Beyond the edge's window and the cloud's: 400 `context_length_exceeded` naming the
    prompt (a completion) or the messages (a chat), wherever it was sent."""
    prompt = "word " * 4000  # tiny windows: 128 (edge) and 256 (cloud) tokens
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        response = await post(http, COMPLETIONS, completion(api, prompt=prompt))
        assert_error(response, 400, INVALID, "context_length_exceeded", "prompt")
        messages = [{"role": "user", "content": prompt}]
        response = await post(http, CHAT, chat(api, messages=messages))
        assert_error(response, 400, INVALID, "context_length_exceeded", "messages")
        await still_serving(http, api)


#: ~150 tokens: beyond the tiny edge's window (128), within the tiny cloud's (256).
EDGE_OVERFLOW = "word " * 50


async def test_a_prompt_beyond_the_edge_window_goes_to_the_cloud(apis: dict[str, Api]) -> None:
    """With a worker, a prompt the edge cannot hold is answered by the cloud
    (`context_overflow`, docs/edge.md "Routing")."""
    linked = apis["edge-to-cloud"]
    async with httpx.AsyncClient(base_url=linked.url, timeout=60) as http:
        body = {**completion(linked, prompt=EDGE_OVERFLOW), "route": "auto"}
        response = await post(http, COMPLETIONS, body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert (answer["served_by"], answer["route_reason"]) == ("cloud", "context_overflow")


async def test_a_prompt_beyond_the_edge_window_with_no_cloud_is_a_400(
    apis: dict[str, Api],
) -> None:
    """With no worker, the same prompt has nowhere to go: 400 `context_length_exceeded`
    naming it (docs/edge.md, "Input limits and refusals")."""
    api = apis["edge"]
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        response = await post(http, COMPLETIONS, completion(api, prompt=EDGE_OVERFLOW))
        assert_error(response, 400, INVALID, "context_length_exceeded", "prompt",
                     "the cloud is unavailable")  # fmt: skip
        await still_serving(http, api)


#: A 1 MB word: under the body limit (1 MiB), far beyond every window.
WORD = "a" * 1_000_000


def word_request(api: Api, path: str) -> dict[str, Any]:
    if path == CHAT:
        return chat(api, messages=[{"role": "user", "content": WORD}])
    return completion(api, prompt=WORD)


@pytest.mark.parametrize(
    ("name", "path"),
    [("edge-to-cloud", CHAT), ("cloud", COMPLETIONS), ("cloud", CHAT)],
)
async def test_a_one_megabyte_word_is_refused_before_the_cloud_tokenizes_it(
    apis: dict[str, Api], name: str, path: str
) -> None:
    """The word reaches the worker, which refuses it by its character count (64 per token
    of its window) before its tokenizer runs: a 400 `context_length_exceeded` whose message
    counts characters (docs/cloud.md, "Long input"), not a 413 (the body is under 1 MiB)."""
    api = apis[name]
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        response = await post(http, path, word_request(api, path))
        param = "messages" if path == CHAT else "prompt"
        assert_error(response, 400, INVALID, "context_length_exceeded", param,
                     "the input (1000000 characters) cannot fit")  # fmt: skip
        await still_serving(http, api)


async def test_a_one_megabyte_word_at_the_edge_alone_is_a_400(apis: dict[str, Api]) -> None:
    """With no cloud, the edge refuses the word itself: 400 `context_length_exceeded`
    naming the prompt, not a 413 (the body is under 1 MiB) and never a 5xx."""
    api = apis["edge"]
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        response = await post(http, COMPLETIONS, word_request(api, COMPLETIONS))
        assert_error(response, 400, INVALID, "context_length_exceeded", "prompt",
                     "the cloud is unavailable")  # fmt: skip
        await still_serving(http, api)


# ----------------------------------------------------------------------- body limit


async def raw_exchange(url: str, head: bytes, chunks: list[bytes]) -> tuple[bytes, Any]:
    """Send `head` and `chunks` on a raw connection, never finishing the body, and read the
    server's answer meanwhile: (status line, JSON body). A server that waited for the whole
    body would never answer, and the test would fail on its bound."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def send() -> None:
        with contextlib.suppress(ConnectionError):  # refused: the server may close early
            writer.write(head)
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()

    sending = asyncio.create_task(send())
    try:
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        length = re.search(rb"(?i)content-length: *(\d+)", answer)
        assert length is not None, answer
        body = await asyncio.wait_for(reader.readexactly(int(length[1])), 60)
        return answer.split(b"\r\n", 1)[0], json.loads(body)
    finally:
        sending.cancel()
        writer.close()


def request_head(url: str, length_or_chunked: int | None) -> bytes:
    host = url.removeprefix("http://")
    framing = (
        "Transfer-Encoding: chunked"
        if length_or_chunked is None
        else f"Content-Length: {length_or_chunked}"
    )
    return (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\n{framing}\r\n\r\n"
    ).encode()


TOO_LARGE = {"type": INVALID, "code": "bad_request", "param": None}


async def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(api: Api) -> None:
    """A chunked body that stalls after passing the limit, and a Content-Length over it with
    no body at all: both a 413 `bad_request` (a server that read the body whole would wait
    on the stall)."""
    piece = b"a" * (64 * 1024)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    chunks = [b'1a\r\n{"model": "x", "prompt": "\r\n'] + [chunk] * (BODY_LIMIT // len(piece) + 1)
    status, body = await raw_exchange(api.url, request_head(api.url, None), chunks)
    assert status.startswith(b"HTTP/1.1 413 "), status
    assert {key: body["error"][key] for key in TOO_LARGE} == TOO_LARGE, body

    status, body = await raw_exchange(api.url, request_head(api.url, 2 * BODY_LIMIT), [])
    assert status.startswith(b"HTTP/1.1 413 "), status
    assert {key: body["error"][key] for key in TOO_LARGE} == TOO_LARGE, body
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        await still_serving(http, api)
