"""The shared serving layer (serving/: OpenAI schema, errors, bodies, auth, SSE, metrics) on a
small app of its own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse

from broker.errors import Overloaded, Timeout
from serving.auth import require_api_key
from serving.bodies import json_body
from serving.metrics import install_common
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    completion_chunk,
    completion_response,
)
from serving.sse import sse_response


def make_app(*, ready: bool = True, keys: list[str] | None = None) -> FastAPI:
    app = FastAPI()

    async def ready_check() -> tuple[bool, dict[str, Any]]:
        return ready, {"reason": "no worker"} if not ready else {"workers": 1}

    install_common(app, service="test", max_body_bytes=1000, ready_check=ready_check)
    auth = require_api_key(keys)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(
        req: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))],
    ) -> Any:
        if req.prompt_text() == "overload":
            raise Overloaded("queue full", retry_after=2.5)
        if req.stream:

            async def chunks() -> AsyncIterator[Any]:
                if req.prompt_text() == "fail-first":
                    raise Timeout("no answer")
                yield completion_chunk(request_id="r1", model=req.model, text="a")
                if req.prompt_text() == "fail-mid":
                    raise Timeout("worker went away")
                yield completion_chunk(request_id="r1", model=req.model, finish_reason="stop")

            return await sse_response(chunks())
        return JSONResponse(
            completion_response(
                request_id="r1",
                model=req.model,
                text="hi",
                finish_reason="stop",
                usage=(2, 1),
                served_by="cloud",
            ).body()
        )

    @app.post("/v1/chat/completions")
    async def chat(
        req: Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))],
    ) -> Any:
        return chat_chunk(request_id="r", model=req.model, content=req.messages[0].text()).body()

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


def assert_envelope(resp: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error


async def test_completion_ok_with_extra_fields(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    body = resp.json()
    assert resp.status_code == 200
    assert body["choices"][0]["text"] == "hi"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    assert body["served_by"] == "cloud" and body["id"] == "cmpl-r1"


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b"{not json", None),
        (b"\xff\xfe{}", None),
        (b"[1, 2]", None),
        (b"", None),
        (b'{"model": "m", "prompt": "x", "temperature": NaN}', None),
        (b'{"model": "m"}', "prompt"),
        (b'{"model": "m", "prompt": "x", "max_tokens": 0}', "max_tokens"),
        (b'{"model": "m", "prompt": "x", "max_tokens": "5"}', "max_tokens"),
        (b'{"model": "m", "prompt": "x", "stream": "yes"}', "stream"),
        (b'{"model": "m", "prompt": 5}', "prompt"),
        (b'{"model": "m", "prompt": "x", "stop": ["a","b","c","d","e"]}', "stop"),
        (b'{"model": "m", "prompt": "x", "n": 9}', "n"),
        (b'{"model": "m", "prompt": "x", "n": 0}', "n"),
        (b'{"model": "m", "prompt": "x", "repetition_penalty": 0}', "repetition_penalty"),
    ],
)
async def test_bad_input_is_400_envelope(
    client: httpx.AsyncClient, content: bytes, param: str | None
) -> None:
    resp = await client.post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert_envelope(resp, 400, "bad_request", param)


async def test_chat_validation(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert_envelope(resp, 400, "bad_request", "messages")
    resp = await client.post(
        "/v1/chat/completions", json={"model": "m", "messages": [{"role": "robot", "content": ""}]}
    )
    assert_envelope(resp, 400, "bad_request", "messages.0.role")
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
        },
    )
    assert resp.json()["choices"][0]["delta"]["content"] == "q"


async def test_unknown_route_and_overload(client: httpx.AsyncClient) -> None:
    assert_envelope(await client.get("/nope"), 404, "not_found")
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "overload"})
    assert_envelope(resp, 503, "overloaded")
    assert resp.headers["retry-after"] == "3"


async def test_body_limit_by_header_and_by_stream(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x" * 2000})
    assert_envelope(resp, 413, "bad_request")

    async def chunked() -> AsyncIterator[bytes]:
        yield b'{"model": "m", "prompt": "'
        for _ in range(100):
            yield b"x" * 100

    resp = await client.post("/v1/completions", content=chunked())
    assert_envelope(resp, 413, "bad_request")


async def test_api_keys() -> None:
    transport = httpx.ASGITransport(app=make_app(keys=["k1", "k2"]))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        body = {"model": "m", "prompt": "x"}
        assert_envelope(await c.post("/v1/completions", json=body), 401, "unauthorized")
        bad = {"Authorization": "Bearer nope"}
        assert_envelope(
            await c.post("/v1/completions", json=body, headers=bad), 401, "unauthorized"
        )
        good = {"Authorization": "Bearer k2"}
        assert (await c.post("/v1/completions", json=body, headers=good)).status_code == 200


async def test_sse_ends_with_done_and_error_event(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
    events = [line for line in resp.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and len(events) == 3
    resp = await client.post(
        "/v1/completions", json={"model": "m", "prompt": "fail-mid", "stream": True}
    )
    events = [line for line in resp.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert '"code":"timeout"' in events[-2]
    resp = await client.post(
        "/v1/completions", json={"model": "m", "prompt": "fail-first", "stream": True}
    )
    assert_envelope(resp, 504, "timeout")


async def test_health_ready_metrics() -> None:
    for ready, status in ((True, 200), (False, 503)):
        transport = httpx.ASGITransport(app=make_app(ready=ready))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/readyz")).status_code == status
            await c.post("/v1/completions", json={"model": "m", "prompt": "x"})
            text = (await c.get("/metrics")).text
            assert (
                'hybridgen_test_http_requests_total{method="POST",route="/v1/completions"' in text
            )


def test_shared_layer_is_torch_free() -> None:
    code = (
        "import sys, serving.auth, serving.bodies, serving.errors, serving.metrics, "
        "serving.protocol, serving.sse; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_stop_matcher_holds_back_only_what_may_start_a_stop() -> None:
    from serving.stops import StopMatcher, held_suffix

    assert held_suffix("abcde", ("dex", "zz")) == 2
    assert held_suffix("abc", ("x",)) == 0
    matcher = StopMatcher(["\n\nUser:", "###"])
    # Nothing here can start a stop string: all of it is shown at once.
    assert matcher.push("Hello there") == ("Hello there", False)
    # "\n\nU" may start "\n\nUser:": held until the next piece decides.
    assert matcher.push(" friend\n\nU") == (" friend", False)
    assert matcher.push("nder the sea") == ("\n\nUnder the sea", False)
    # A stop string split across pieces, and the earliest of two matches wins.
    assert matcher.push(" #") == (" ", False)
    assert matcher.push("## and \n\nUser:") == ("", True)
    assert matcher.flush() == ""
    tail = StopMatcher(["END"])
    assert tail.push("the EN") == ("the ", False)
    assert tail.flush() == "EN"  # the answer ended without a stop: the held text is shown
    assert StopMatcher([]).push("as is") == ("as is", False)
