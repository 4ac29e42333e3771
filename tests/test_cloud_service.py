"""Cloud API + workers + a real nats-server, driven by the official openai client.

Workers run in-process (their engine in its own thread) except in the kill test, where a
real worker process is killed mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import subjects, wire
from broker.bus import connect
from cloud.api import create_app
from cloud.settings import ApiSettings, WorkerSettings
from cloud.worker import CloudWorker
from tests.fixtures_cloud import LONG_CACHE_TOKENS, LONG_CONTEXT, serve_cloud_api
from tests.waits import BOUND_S, eventually

pytestmark = pytest.mark.slow

MODEL = "hg-cloud"
#: A second model name, served by the worker that the drain test stops.
DRAIN_MODEL = "hg-drain"


@pytest.fixture(scope="module")
def cloud_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """(checkpoint dir, tokenizer dir, context length) of a small random Llama."""
    from models.lab.random_model import make_random_llama

    root = tmp_path_factory.mktemp("cloud_model")
    make_random_llama(root, preset="tiny", context_length=256)
    return root, root, 256


@pytest.fixture
def start_worker(
    start_cloud_worker: Callable[..., Any], cloud_model: tuple[Path, Path, int]
) -> Callable[..., Any]:
    """`await start_worker(**WorkerSettings overrides)`: a worker on the random model."""
    return functools.partial(start_cloud_worker, cloud_model[0])


@pytest.fixture
def start_long_worker(
    start_cloud_worker: Callable[..., Any], cloud_long_model: Path
) -> Callable[..., Any]:
    """`await start_long_worker(**overrides)`: a worker on the long-context model, whose
    long requests are still running whatever the test does meanwhile."""
    return functools.partial(start_cloud_worker, cloud_long_model, cache_tokens=LONG_CACHE_TOKENS)


def engine_idle(worker: CloudWorker) -> bool:
    """The worker's engine holds nothing: no request, no row, no admitted token."""
    assert worker.engine is not None
    stats = worker.engine.stats()
    return stats["requests"] == stats["running"] == stats["admitted_tokens"] == 0


@pytest.fixture
async def api(
    nats_url: str, cloud_model: tuple[Path, Path, int]
) -> AsyncIterator[tuple[str, ApiSettings]]:
    """A live uvicorn serving the cloud API on a free port; yields its base URL."""
    settings = ApiSettings(
        port=0,
        models=[MODEL, DRAIN_MODEL],
        idle_timeout_s=2.0,
        accept_timeout_s=2.0,
        max_body_bytes=64 * 1024,
    )
    async with serve_cloud_api(nats_url, **settings.model_dump(exclude={"port"})) as url:
        yield url, settings


def client_for(url: str, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, **kwargs)


async def test_completions_and_chat_stream_and_not(
    start_worker: Callable[..., Any], api: tuple[str, ApiSettings], cloud_model: Any
) -> None:
    from transformers import AutoTokenizer

    await start_worker()
    url, _ = api
    client = client_for(url)
    done = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0)
    assert done.choices[0].finish_reason == "length"  # greedy from "Hello": no end token
    assert done.usage is not None and done.usage.completion_tokens == 8
    unset = await client.completions.create(model=MODEL, prompt="Hello", temperature=0)
    # No max_tokens: until the model stops or the window (256) is full, chat or completion.
    assert unset.usage is not None and unset.choices[0].finish_reason == "length"
    assert unset.usage.completion_tokens == 256 - unset.usage.prompt_tokens
    assert done.model_extra is not None and done.model_extra["served_by"] == "cloud"
    assert done.id == f"cmpl-{done.model_extra['request_id']}"

    pieces, finish = [], None
    stream = await client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=8, temperature=0, stream=True
    )
    async for chunk in stream:
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == done.choices[0].text and finish == done.choices[0].finish_reason

    messages: Any = [{"role": "user", "content": "Say hi"}]
    chat = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0
    )
    assert chat.choices[0].message.role == "assistant"
    tokenizer = AutoTokenizer.from_pretrained(str(cloud_model[1]))
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(str(rendered), add_special_tokens=False)["input_ids"]
    assert chat.usage is not None and chat.usage.prompt_tokens == len(prompt_ids)
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None
    usage = (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens)
    assert usage == (chat.usage.prompt_tokens, chat.usage.completion_tokens)

    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL, DRAIN_MODEL]
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/readyz")).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert "hybridgen_cloud_api_tokens_total" in metrics


async def test_bad_input(start_worker: Callable[..., Any], api: tuple[str, ApiSettings]) -> None:
    await start_worker()
    url, _ = api
    client = client_for(url)

    async def expect(status: int, code: str, param: str | None, **kwargs: Any) -> None:
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(**{"model": MODEL, "prompt": "x", **kwargs})
        assert (info.value.status_code, info.value.code) == (status, code), info.value
        assert isinstance(info.value.body, dict) and info.value.body["param"] == param

    await expect(400, "bad_request", "max_tokens", max_tokens=0)
    await expect(400, "bad_request", "temperature", extra_body={"temperature": "hot"})
    await expect(400, "context_length_exceeded", "prompt", prompt="word " * 400)
    await expect(400, "context_length_exceeded", "max_tokens", max_tokens=10_000)
    await expect(404, "not_found", "model", model="no-such-model")
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=[])
    assert info.value.code == "bad_request" and info.value.param == "messages"

    async with httpx.AsyncClient(base_url=url) as http:
        for content in (b"{oops", b"\xff\xfe", b"[1]", b'"text"'):  # no field to name
            resp = await http.post(
                "/v1/completions", content=content, headers={"content-type": "application/json"}
            )
            assert resp.status_code == 400
            assert (resp.json()["error"]["code"], resp.json()["error"]["param"]) == (
                "bad_request",
                None,
            )
        resp = await http.post(
            "/v1/completions", content=b"x" * 100_000, headers={"content-type": "application/json"}
        )
        assert resp.status_code == 413 and resp.json()["error"]["code"] == "bad_request"


async def test_api_keys(nats_url: str) -> None:
    settings = ApiSettings(api_keys=["secret"])  # the API needs no model files
    app = create_app(settings, nats_url=nats_url)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        http_client = httpx.AsyncClient(transport=transport)
        client = openai.AsyncOpenAI(
            base_url="http://127.0.0.1/v1", api_key="wrong", max_retries=0, http_client=http_client
        )
        with pytest.raises(openai.AuthenticationError) as info:
            await client.models.list()
        assert info.value.code == "unauthorized"
        resp = await http_client.get("http://127.0.0.1/v1/models")
        assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
        client = openai.AsyncOpenAI(
            base_url="http://127.0.0.1/v1", api_key="secret", max_retries=0, http_client=http_client
        )
        assert (await client.models.list()).data[0].id == MODEL


async def test_no_worker_is_503_and_not_ready(api: tuple[str, ApiSettings]) -> None:
    url, _ = api
    with pytest.raises(openai.APIStatusError) as info:
        await client_for(url).completions.create(model=MODEL, prompt="x", max_tokens=4)
    assert info.value.status_code == 503 and info.value.code == "unavailable"
    async with httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/readyz")).status_code == 503


async def test_disconnect_cancels_on_worker(
    start_long_worker: Callable[..., Any], api: tuple[str, ApiSettings], nc: Client
) -> None:
    worker = await start_long_worker()
    url, _ = api
    cancels: list[str] = []

    async def on_cancel(msg: Msg) -> None:
        cancels.append(msg.subject)

    await nc.subscribe(subjects.CANCEL_ALL, cb=on_cancel)
    long = {"model": MODEL, "prompt": "Hello", "max_tokens": LONG_CONTEXT - 100, "temperature": 0}
    async with (
        httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http,
        http.stream("POST", "/v1/completions", json={**long, "stream": True}) as resp,
    ):
        request_id = resp.headers["x-request-id"]
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and '"text":""' not in line:
                break  # one token in: hang up
    await eventually(lambda: cancels and worker.admitted == 0, "the stream's cancel")
    assert cancels == [subjects.cancel(request_id)]
    # The engine holds nothing of the cancelled request: no ticket, no row, no tokens.
    await eventually(lambda: engine_idle(worker), "the engine let the stream go")
    stopped_at = worker.tokens_out
    assert stopped_at < long["max_tokens"]  # stopped, not run to the end

    # A client of a non-streamed request that gives up cancels it too: it hangs up while the
    # worker is generating.
    async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http:
        call = asyncio.ensure_future(http.post("/v1/completions", json=long))
        # Generating: this request's own tokens (the first one's stopped at `stopped_at`).
        await eventually(
            lambda: worker.tokens_out > stopped_at and worker.admitted == 1, "generating"
        )
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
    await eventually(lambda: len(cancels) == 2, "the API's cancel of the second request")
    await eventually(lambda: worker.admitted == 0, "the worker's end of the second request")
    await eventually(lambda: engine_idle(worker), "the engine let the request go")
    assert worker.tokens_out - stopped_at < long["max_tokens"]


async def test_overload_is_coded(
    start_long_worker: Callable[..., Any], api: tuple[str, ApiSettings]
) -> None:
    await start_long_worker(max_queue_requests=1)
    url, _ = api
    client = client_for(url)
    stream = await client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=LONG_CONTEXT - 100, stream=True, temperature=0
    )
    with pytest.raises(openai.APIStatusError) as info:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=4)
    assert info.value.status_code == 503 and info.value.code == "overloaded"
    assert info.value.response.headers["retry-after"] == "1"
    await stream.close()


async def test_the_clients_timeout_header_reaches_the_worker_as_timeout_ms(
    start_worker: Callable[..., Any], api: tuple[str, ApiSettings], nc: Client
) -> None:
    """`X-Request-Timeout` (seconds) becomes the bus request's `timeout_ms`, below the
    API's own `request_timeout_s`; without it the worker gets the API's whole budget."""
    await start_worker()
    url, settings = api
    seen: list[wire.GenerateRequest] = []

    async def on_request(msg: Msg) -> None:  # beside the worker's queue group: sees all
        seen.append(wire.decode(msg.data, wire.GenerateRequest))

    await nc.subscribe(subjects.gen(MODEL), cb=on_request)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        timed = await http.post("/v1/completions", json=body, headers={"X-Request-Timeout": "3"})
        untimed = await http.post("/v1/completions", json=body)
        bad = await http.post("/v1/completions", json=body, headers={"X-Request-Timeout": "-1"})
    assert timed.status_code == untimed.status_code == 200
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Timeout"
    await eventually(lambda: len(seen) == 2, "both requests seen on the bus")
    assert seen[0].timeout_ms is not None and 0 < seen[0].timeout_ms <= 3000
    assert seen[1].timeout_ms is not None and seen[1].timeout_ms > 3000
    assert seen[1].timeout_ms <= settings.request_timeout_s * 1000


async def test_two_workers_share_load(
    start_worker: Callable[..., Any], api: tuple[str, ApiSettings], nc: Client
) -> None:
    beats: list[wire.Heartbeat] = []

    async def on_beat(msg: Msg) -> None:
        beats.append(wire.decode(msg.data, wire.Heartbeat))

    await nc.subscribe(subjects.telemetry_of_role("api"), cb=on_beat)
    first = await start_worker(node_id="cloud-a")
    second = await start_worker(node_id="cloud-b")
    url, _ = api
    client = client_for(url)
    answers = await asyncio.gather(
        *(client.completions.create(model=MODEL, prompt=f"n{i}", max_tokens=4) for i in range(16))
    )
    served = {a.model_extra["worker"] for a in answers if a.model_extra}
    assert served == {first.node_id, second.node_id}
    # The API's own heartbeat, every second: one counts the requests, none in flight.
    await eventually(lambda: beats and beats[-1].rps > 0, "a heartbeat with the requests")
    assert beats[-1].role == "api" and beats[-1].in_flight == 0


async def _stream_events(
    http: httpx.AsyncClient, model: str, on_event: Callable[[int], None]
) -> list[str]:
    body = {"model": model, "prompt": "Hello", "max_tokens": 240, "stream": True,
            "temperature": 0}  # fmt: skip
    events: list[str] = []
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line:
                events.append(line)
                on_event(len(events))
    return events


def signal_at(proc: subprocess.Popen[bytes], sig: int) -> Callable[[int], None]:
    """A `_stream_events` callback: send `sig` to `proc` at the second event (a token in)."""

    def on_event(count: int) -> None:
        if count == 2:
            proc.send_signal(sig)

    return on_event


async def test_worker_processes_killed_and_drained_mid_stream(
    nats_url: str, api: tuple[str, ApiSettings], cloud_model: tuple[Path, Path, int], nc: Client
) -> None:
    """SIGKILL: the stream ends with an error event (the API's idle timeout: the worker
    sends nothing more) then [DONE]. SIGTERM: the stream completes."""
    env = {**os.environ, "HG_CLOUD_THREADS": "1", "OMP_NUM_THREADS": "1"}
    ready: set[str] = set()

    async def on_beat(msg: Msg) -> None:
        beat = wire.decode(msg.data, wire.Heartbeat)
        if beat.status == "ready":
            ready.add(beat.node_id)

    await nc.subscribe(subjects.telemetry_of_role("cloud"), cb=on_beat)
    procs = {
        node: subprocess.Popen(  # noqa: ASYNC220 (worker processes to kill)
            [sys.executable, "-m", "cloud", "worker", "--model-dir", str(cloud_model[0]),
             "--nats", nats_url, "--node-id", node, "--model", model],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for node, model in (("cloud-victim", MODEL), ("cloud-drained", DRAIN_MODEL))
    }  # fmt: skip
    url, _ = api
    try:

        def both_ready() -> bool:
            for proc in procs.values():
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            return len(ready) == 2

        await eventually(both_ready, "both worker processes are ready")
        async with httpx.AsyncClient(base_url=url, timeout=BOUND_S) as http:
            victim = procs["cloud-victim"]
            events = await _stream_events(http, MODEL, signal_at(victim, signal.SIGKILL))
            assert events[-1] == "data: [DONE]"
            error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert (error["type"], error["code"]) == ("timeout_error", "timeout"), events[-3:]

            drained = procs["cloud-drained"]
            events = await _stream_events(http, DRAIN_MODEL, signal_at(drained, signal.SIGTERM))
            assert events[-1] == "data: [DONE]"
            assert '"finish_reason":"length"' in events[-2], events[-3:]
            assert await asyncio.to_thread(drained.wait, 30) == 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


async def test_bundled_model_set_end_to_end(
    nats_url: str, tiny_models: Any, tiny_models_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker resolves the model set (checkpoint, tokenizer, context) itself; the API
    needs no model files."""
    monkeypatch.setenv("HG_HOME", str(tiny_models_home))
    nc = await connect(nats_url, name="test-worker")
    settings = WorkerSettings(model_set=tiny_models.version, threads=1, cache_tokens=4096)
    try:
        async with CloudWorker(nc, settings) as worker:
            assert worker.model_version == tiny_models.version
            assert worker.engine is not None
            assert worker.engine.context_length == tiny_models.cloud_context_length
            app = create_app(ApiSettings(), nats_url=nats_url)
            async with app.router.lifespan_context(app):
                http_client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
                client = openai.AsyncOpenAI(
                    base_url="http://127.0.0.1/v1",
                    api_key="x",
                    max_retries=0,
                    http_client=http_client,
                )
                messages: Any = [{"role": "user", "content": "What is a module?"}]
                chat = await client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=12, seed=1
                )
                assert chat.usage is not None
                ended = "length" if chat.usage.completion_tokens == 12 else "stop"
                assert chat.choices[0].finish_reason == ended
                streamed = [
                    c.choices[0].delta.content or ""
                    async for c in await client.chat.completions.create(
                        model=MODEL, messages=messages, max_tokens=12, seed=1, stream=True
                    )
                    if c.choices
                ]
                assert "".join(streamed) == chat.choices[0].message.content
                with pytest.raises(openai.BadRequestError) as info:
                    too_long: Any = [{"role": "user", "content": "word " * 2000}]
                    await client.chat.completions.create(model=MODEL, messages=too_long)
                assert info.value.code == "context_length_exceeded"
    finally:
        await nc.close()
