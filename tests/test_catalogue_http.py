"""The bad-input catalogue over HTTP, one test per row, on the edge API and the cloud API.

Live servers: the edge (uvicorn, its tiny model) and the cloud API (uvicorn) in front of a
real cloud worker, both on a real nats-server. Every row expects a 4xx in OpenAI's error
envelope (with `param` where a field is at fault), never a 5xx, and the service keeps
serving: a good request is answered after each row.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from models.registry import ModelSet
from tests.fixtures_cloud import serve_cloud_api

pytestmark = pytest.mark.slow

#: What the cloud API refuses above (the edge keeps its default of 1 MiB).
BODY_LIMIT = 1 << 20


@dataclass
class Api:
    """A live API under test: its base URL and the model name it serves."""

    name: str
    url: str
    model: str


@pytest.fixture(params=["edge", "cloud"])
async def api(
    request: pytest.FixtureRequest,
    start_edge: Callable[..., Any],
    start_worker: Callable[..., Any],
    nats_url: str,
    tiny_models: ModelSet,
) -> AsyncIterator[Api]:
    """The edge API (no worker: the cloud is unavailable) or the cloud API with a worker."""
    if request.param == "edge":
        edge = await start_edge()
        yield Api("edge", edge.url, "hg-edge")
        return
    await start_worker()
    async with serve_cloud_api(nats_url, models=["hg-cloud"], max_body_bytes=BODY_LIMIT) as url:
        yield Api("cloud", url, "hg-cloud")


def completion(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0, **fields}


def chat(model: str, **fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Hello"}]
    return {"model": model, "messages": messages, "max_tokens": 2, "temperature": 0, **fields}


async def still_serving(http: httpx.AsyncClient, api: Api) -> None:
    """A good request after the bad one: the service keeps serving."""
    response = await http.post("/v1/completions", json=completion(api.model))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] is not None


def assert_envelope(
    response: httpx.Response, status: int | tuple[int, ...], code: str | None, param: str | None
) -> dict[str, Any]:
    """A 4xx in OpenAI's envelope with the expected code and param; returns the error."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["message"] and error["type"] and error["code"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


async def post(http: httpx.AsyncClient, path: str, content: bytes | dict[str, Any]) -> Any:
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    return await http.post(path, content=raw, headers={"content-type": "application/json"})


# ------------------------------------------------------------------- malformed bodies

RAW_BODIES = {
    "malformed_json": b'{"model": "x", "prompt": ',
    "string": b'"Hello"',
    "list": b'[{"model": "x"}]',
    "number": b"42",
    "null": b"null",
    "invalid_utf8": b'{"model": "x", "prompt": "\xff\xfe"}',
    "nan": b'{"model": "x", "prompt": "x", "temperature": NaN}',
}


@pytest.mark.parametrize("case", sorted(RAW_BODIES))
async def test_a_body_that_is_not_a_json_object_is_a_400(api: Api, case: str) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        response = await post(http, "/v1/completions", RAW_BODIES[case])
        assert_envelope(response, 400, "bad_request", None)
        await still_serving(http, api)


@pytest.mark.parametrize(
    ("path", "escaped", "param"),
    [
        ("/v1/completions", '{"model": "M", "prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", '{"model": "M", "prompt": ["\\udfff"]}', "prompt.0"),
        (
            "/v1/chat/completions",
            '{"model": "M", "messages": [{"role": "user", "content": "\\ud83d"}]}',
            "messages.0.content",
        ),
    ],
)
async def test_a_lone_surrogate_is_a_400_naming_the_field(
    api: Api, path: str, escaped: str, param: str
) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        response = await post(http, path, escaped.replace("M", api.model).encode())
        assert_envelope(response, 400, "bad_request", param)
        await still_serving(http, api)


# ------------------------------------------------------------------------ wrong fields

FIELD_ROWS: list[tuple[str, str, dict[str, Any], str]] = [
    # (row, path, fields over a good body, param at fault)
    ("max_tokens_string", "/v1/completions", {"max_tokens": "5"}, "max_tokens"),
    ("max_tokens_float", "/v1/completions", {"max_tokens": 2.5}, "max_tokens"),
    ("temperature_string", "/v1/completions", {"temperature": "hot"}, "temperature"),
    ("prompt_number", "/v1/completions", {"prompt": 5}, "prompt"),
    ("stream_string", "/v1/completions", {"stream": "yes"}, "stream"),
    ("model_number", "/v1/completions", {"model": 7}, "model"),
    ("messages_string", "/v1/chat/completions", {"messages": "hi"}, "messages"),
    (
        "role_unknown",
        "/v1/chat/completions",
        {"messages": [{"role": "x", "content": "a"}]},
        "messages.0.role",
    ),
    ("max_tokens_zero", "/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens_negative", "/v1/chat/completions", {"max_tokens": -1}, "max_tokens"),
    ("prompt_empty", "/v1/completions", {"prompt": ""}, "prompt"),
    ("messages_empty", "/v1/chat/completions", {"messages": []}, "messages"),
    (
        "content_empty",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": ""}]},
        "messages",
    ),
    ("n_2", "/v1/completions", {"n": 2}, "n"),
    ("logit_bias", "/v1/chat/completions", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("tools not a function", "/v1/chat/completions", {"tools": [{"type": "x"}]}, "tools"),
    ("tool_choice without tools", "/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    (
        "tools on completions",
        "/v1/completions",
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        "tools",
    ),
    ("functions (legacy)", "/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("best_of", "/v1/completions", {"best_of": 3}, "best_of"),
    (
        "unknown response_format",
        "/v1/chat/completions",
        {"response_format": {"type": "xml"}},
        "response_format",
    ),
    (
        "json_schema without a schema",
        "/v1/chat/completions",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format",
    ),
]


@pytest.mark.parametrize(
    ("path", "fields", "param"), [row[1:] for row in FIELD_ROWS], ids=[r[0] for r in FIELD_ROWS]
)
async def test_a_field_at_fault_is_a_400_naming_it(
    api: Api, path: str, fields: dict[str, Any], param: str
) -> None:
    good = chat if "chat" in path else completion
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        response = await post(http, path, {**good(api.model), **fields})
        assert_envelope(response, 400, "bad_request", param)
        await still_serving(http, api)


async def test_an_unknown_model_is_a_404(api: Api) -> None:
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        response = await post(http, "/v1/chat/completions", chat("gpt-9"))
        assert_envelope(response, 404, "not_found", "model")
        await still_serving(http, api)


# ----------------------------------------------------------------------- long inputs


async def test_huge_max_tokens_is_refused_or_routed(api: Api) -> None:
    """The cloud refuses more than its window; the edge may route it (documented): both a
    400 `context_length_exceeded` naming max_tokens, or an answer, never a 5xx."""
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        response = await post(http, "/v1/completions", completion(api.model, max_tokens=10**9))
        if api.name == "cloud" or response.status_code != 200:
            assert_envelope(response, 400, "context_length_exceeded", "max_tokens")
        await still_serving(http, api)


async def test_a_prompt_beyond_the_context_is_refused_or_routed(api: Api) -> None:
    """Beyond every window: a 400 `context_length_exceeded` (the edge would route a prompt
    beyond its own window to the cloud, docs/edge.md; with no cloud it refuses it too)."""
    prompt = "word " * 4000  # tiny windows: 128 (edge) and 256 (cloud) tokens
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        response = await post(http, "/v1/completions", completion(api.model, prompt=prompt))
        if response.status_code == 200:
            assert api.name == "edge" and response.json()["route_reason"] == "context_overflow"
        else:
            assert_envelope(response, 400, "context_length_exceeded", "prompt")
        chat_body = chat(api.model, messages=[{"role": "user", "content": prompt}])
        response = await post(http, "/v1/chat/completions", chat_body)
        assert_envelope(response, 400, "context_length_exceeded", "messages")
        await still_serving(http, api)


async def test_a_one_megabyte_word_is_refused_before_tokenizing(api: Api) -> None:
    """A 1 MB word under the body limit: refused by the character limit (derived from the
    context window) before the tokenizer sees it; a hang here would be the tokenizer."""
    word = "a" * 1_000_000
    async with httpx.AsyncClient(base_url=api.url, timeout=60) as http:
        response = await post(http, "/v1/completions", completion(api.model, prompt=word))
        assert_envelope(response, (400, 413), None, None)
        chat_body = chat(api.model, messages=[{"role": "user", "content": word}])
        response = await post(http, "/v1/chat/completions", chat_body)
        assert_envelope(response, (400, 413), None, None)
        await still_serving(http, api)


async def raw_exchange(url: str, head: bytes, chunks: list[bytes]) -> bytes:
    """Send `head` and `chunks` on a raw connection, never finishing the body, and read the
    server's answer (head and body) meanwhile: a server that waited for the whole body would
    never answer, and the test would hang."""
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
        return answer + await asyncio.wait_for(reader.readexactly(int(length[1])), 60)
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


async def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(api: Api) -> None:
    """A chunked body that stalls after passing the limit, and a Content-Length over it with
    no body at all: both get a 413 (a server that read the body whole would wait on the
    stall, and the test would hang)."""
    piece = b"a" * (64 * 1024)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    chunks = [b'1a\r\n{"model": "x", "prompt": "\r\n'] + [chunk] * (BODY_LIMIT // len(piece) + 1)
    answer = await raw_exchange(api.url, request_head(api.url, None), chunks)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"code":"bad_request"' in answer

    answer = await raw_exchange(api.url, request_head(api.url, 2 * BODY_LIMIT), [])
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        await still_serving(http, api)
