"""Promises of docs/cloud.md about the worker's settings, its heartbeat and the cloud API.

- "Running them": every worker flag of the table reaches the worker's settings, and so does
  its `HG_CLOUD_*` variable (the flag winning over it); `--threads` and `--device` reach
  the engine a worker loads.
- The heartbeat's figures, on runs built so that each has one right value: queue depth and
  in-flight with one request running and one waiting, errors, tokens/s against requests/s,
  and the latency percentiles of the one request served.
- "Calling the cloud API": `request_id` in a stream's last chunk (the `X-Request-Id`
  header's id), and a chat's default of up to 256 tokens within the context window.

Real parts: the CLI's own parser and settings, real in-process workers on random Llamas, a
real nats-server, the cloud API under a real uvicorn.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import torch
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import subjects, wire
from broker.bus import connect
from broker.errors import BadRequest, ContextLengthExceeded
from broker.server import NatsServer
from broker.settings import BusSettings
from broker.streaming import request_stream
from cloud.cli import _parser, worker_settings
from cloud.settings import WorkerSettings
from cloud.worker import CloudWorker
from serving.context import MAX_TOKENS_CAP
from tests.fixtures_cloud import LONG_CACHE_TOKENS, serve_cloud_api
from tests.waits import eventually

MODEL = "hg-cloud"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "cloud.md"

# ------------------------------------------------------------- "Running them": the flags

#: A value for each flag of docs/cloud.md's worker table, as typed, and the setting it
#: must give (field, value). A flag the table gains needs a row here.
FLAG_VALUES: dict[str, tuple[str, str, Any]] = {
    "--model-dir": ("/srv/ckpt/llama", "model_dir", Path("/srv/ckpt/llama")),
    "--model-set": ("2024-06-01", "model_set", "2024-06-01"),
    "--node-id": ("cloud-b", "node_id", "cloud-b"),
    "--device": ("cpu", "device", "cpu"),
    "--threads": ("3", "threads", 3),
    "--max-queue-requests": ("7", "max_queue_requests", 7),
    "--max-queue-tokens": ("4096", "max_queue_tokens", 4096),
    "--drain-timeout-s": ("2.5", "drain_timeout_s", 2.5),
    "--max-tokens-cap": ("40", "max_tokens_cap", 40),
}
#: Another value of each (as typed, as set), for the flag-wins-over-the-variable check.
OTHER_VALUES: dict[str, tuple[str, Any]] = {
    "--model-dir": ("/opt/other", Path("/opt/other")),
    "--model-set": ("2023-01-01", "2023-01-01"),
    "--node-id": ("cloud-env", "cloud-env"),
    "--device": ("cuda", "cuda"),
    "--threads": ("5", 5),
    "--max-queue-requests": ("9", 9),
    "--max-queue-tokens": ("8192", 8192),
    "--drain-timeout-s": ("11", 11.0),
    "--max-tokens-cap": ("12", 12),
}


def documented_flags() -> list[str]:
    """The flags of the worker table under "Running them" in docs/cloud.md."""
    section = DOCS.read_text(encoding="utf-8").split("## Running them", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(--[a-z-]+)", section, flags=re.MULTILINE)


def parse_worker(*flags: str) -> WorkerSettings:
    """The settings `hybridgen cloud worker FLAGS` runs with (the CLI's parser and path)."""
    return worker_settings(_parser().parse_args(["worker", *flags]))


def _worker_help() -> str:
    """`hybridgen cloud worker --help`."""
    parser = _parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return str(action.choices["worker"].format_help())


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No `HG_CLOUD_*` or `HG_NATS_URL` of the developer's in the settings under test."""
    for name in WorkerSettings.model_fields:
        monkeypatch.delenv(f"HG_CLOUD_{name.upper()}", raising=False)
    monkeypatch.delenv("HG_NATS_URL", raising=False)
    return monkeypatch


def test_the_table_lists_the_flags_these_tests_check() -> None:
    """Every flag of the table is checked below (and `--nats`, whose variable is
    `HG_NATS_URL`, by its own test)."""
    assert sorted(documented_flags()) == sorted([*FLAG_VALUES, "--nats"])


@pytest.mark.parametrize("flag", sorted(FLAG_VALUES))
def test_each_worker_flag_and_its_hg_cloud_variable_give_the_same_setting(
    flag: str, clean_env: pytest.MonkeyPatch
) -> None:
    """docs/cloud.md, "Running them": each flag sets its setting, its `HG_CLOUD_*`
    variable sets the same one the same way, and a flag given wins over the variable."""
    typed, field, expected = FLAG_VALUES[flag]
    variable = "HG_CLOUD_" + flag.removeprefix("--").replace("-", "_").upper()
    assert f"env {variable})" in " ".join(_worker_help().split())
    assert getattr(parse_worker(), field) != expected  # the flag's doing, not the default
    assert getattr(parse_worker(flag, typed), field) == expected
    clean_env.setenv(variable, typed)
    assert getattr(parse_worker(), field) == expected
    other_typed, other = OTHER_VALUES[flag]
    assert getattr(parse_worker(flag, other_typed), field) == other  # the flag wins


def test_nats_flag_and_hg_nats_url(clean_env: pytest.MonkeyPatch) -> None:
    """docs/cloud.md: `--nats URL`, default `HG_NATS_URL` or nats://127.0.0.1:4222."""
    assert _parser().parse_args(["worker", "--nats", "nats://a:4222"]).nats == "nats://a:4222"
    assert _parser().parse_args(["worker"]).nats is None  # then the bus settings decide
    assert BusSettings().url == "nats://127.0.0.1:4222"
    clean_env.setenv("HG_NATS_URL", "nats://machine-a:4222")
    assert BusSettings().url == "nats://machine-a:4222"


# --------------------------------------------------------------- live: a bus and workers


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bus(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, Client]]:
    """A real nats-server for the module and a client of it: (URL, client)."""
    server = NatsServer(store_dir=tmp_path_factory.mktemp("promise_cloud_nats"))
    await server.start()
    try:
        nc = await connect(server.client_url, name="test-promise-cloud")
        try:
            yield server.client_url, nc
        finally:
            await nc.close()
    finally:
        await server.shutdown()


@contextlib.asynccontextmanager
async def running_worker(url: str, model_dir: Path, **settings: Any) -> AsyncIterator[CloudWorker]:
    """A started in-process worker on `model_dir` (one thread), on its own connection."""
    nc = await connect(url, name="test-promise-cloud-worker")
    values: dict[str, Any] = {"model_dir": model_dir, "threads": 1, "cache_tokens": 4096}
    worker = CloudWorker(nc, WorkerSettings(**{**values, **settings}))
    try:
        await worker.start()
        yield worker
    finally:
        await worker.close()
        await nc.close()


async def collected(nc: Client, subject: str, kind: type[Any]) -> list[Any]:
    """The messages published on `subject` from now on, decoded as `kind`."""
    seen: list[Any] = []

    async def record(msg: Msg) -> None:
        seen.append(wire.decode(msg.data, kind))

    await nc.subscribe(subject, cb=record)
    await nc.flush()
    return seen


def ask(model: str, prompt: str = "Hello", **fields: Any) -> wire.GenerateRequest:
    """A greedy bus request (from "Hello" the random Llamas write no end token)."""
    return wire.GenerateRequest(
        request_id=wire.new_request_id(), model=model, prompt=prompt, temperature=0.0, **fields
    )


# ----------------------------------------------------------------------- --threads, --device


@pytest.mark.asyncio(loop_scope="module")
async def test_threads_and_device_flags_reach_the_engine(
    bus: tuple[str, Client], cloud_long_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/cloud.md, "Running them": `--threads N` is the engine's torch threads on CPU
    (said at load), `--device cpu` the device it runs on (in the heartbeat; a check that
    decides where CUDA is present, the default there; without it, see the next test)."""
    import os

    threads = (os.cpu_count() or 1) + 1  # not the default (all cores)
    settings = parse_worker(
        "--threads", str(threads), "--device", "cpu", "--node-id", "cloud-flags",
        "--model", "hg-flags", "--model-dir", str(cloud_long_model),
    )  # fmt: skip
    url, nc = bus
    beats = await collected(nc, subjects.telemetry("cloud", "cloud-flags"), wire.Heartbeat)
    with caplog.at_level(logging.INFO, logger="cloud.engine"):
        async with running_worker(url, **{**settings.model_dump(), "cache_tokens": 4096}):
            loaded = [r.getMessage() for r in caplog.records if r.name == "cloud.engine"]
            said = rf" on cpu \(torch\.\w+, {threads} threads\)$"
            assert any(re.search(said, m) for m in loaded), loaded
            beat = await eventually(lambda: beats[:1], "the worker's first heartbeat")
            assert beat[0].extra["device"] == "cpu"


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: --device cuda would run")
async def test_device_cuda_is_tried_where_there_is_no_cuda(
    bus: tuple[str, Client], cloud_long_model: Path
) -> None:
    """docs/cloud.md, "Running them": `--device cuda` reaches the engine. Where there is no
    CUDA the worker does not quietly run on the CPU: loading the model on CUDA fails."""
    settings = parse_worker("--device", "cuda")
    with pytest.raises((AssertionError, RuntimeError), match=r"(?i)cuda|nvidia"):
        async with running_worker(bus[0], cloud_long_model, device=settings.device):
            pass


# ------------------------------------------------------------------------------ heartbeat


@pytest.mark.asyncio(loop_scope="module")
async def test_heartbeat_counts_failures_tokens_and_the_latency_of_what_was_served(
    bus: tuple[str, Client], cloud_long_model: Path
) -> None:
    """docs/cloud.md, "Running them": the heartbeat's errors, tokens/s and p50/p95.

    Two requests fail (an empty prompt, one past the window), then one is served with 8
    tokens. Errors: exactly 2; before the served one, no latency at all (failures have
    none); after it, tokens/s over requests/s (one window, one span) is 8 tokens over 3
    requests, and p50 and p95 are both that one request's latency, at least the time the
    worker measured for it from its admission (its `request` event's `total_ms`)."""
    url, nc = bus
    async with running_worker(url, cloud_long_model, model="hg-beat", heartbeat_s=0.1) as worker:
        beats = await collected(nc, subjects.telemetry("cloud", worker.node_id), wire.Heartbeat)
        events = await collected(nc, subjects.events("cloud", worker.node_id), wire.Event)
        with pytest.raises(BadRequest):
            async with request_stream(nc, ask("hg-beat", "")):
                pass
        with pytest.raises(ContextLengthExceeded):
            async with request_stream(nc, ask("hg-beat", max_tokens=LONG_CACHE_TOKENS)):
                pass
        failed = await eventually(
            lambda: [b for b in beats if b.errors == 2], "a heartbeat with the 2 failures"
        )
        assert (failed[0].latency_p50_ms, failed[0].latency_p95_ms) == (None, None)
        assert (failed[0].tokens_per_s, failed[0].in_flight, failed[0].queue_depth) == (0, 0, 0)

        served = ask("hg-beat", max_tokens=8)
        async with request_stream(nc, served) as stream:
            _, done = await stream.collect()
        assert done.usage.completion_tokens == 8

        # In flight drops to 0 in the same step as the request is counted: a beat idle
        # again with its 8 tokens out was built after it.
        def settled() -> list[wire.Heartbeat]:
            return [b for b in beats if b.in_flight == 0 and b.extra["tokens_out_total"] == 8]

        beat = (await eventually(settled, "a heartbeat after the served request"))[0]
        assert (beat.errors, beat.queue_depth) == (2, 0)
        assert beat.tokens_per_s / beat.rps == pytest.approx(8 / 3, rel=1e-9)
        event = (await eventually(lambda: [e for e in events if e.kind == "request"]))[0]
        assert event.request_id == served.request_id
        assert beat.latency_p50_ms == beat.latency_p95_ms
        assert beat.latency_p50_ms is not None
        assert beat.latency_p50_ms >= event.data["total_ms"]


@pytest.mark.asyncio(loop_scope="module")
async def test_heartbeat_queue_depth_counts_the_request_waiting_for_a_row(
    bus: tuple[str, Client], cloud_long_model: Path
) -> None:
    """docs/cloud.md: the heartbeat's queue depth and in-flight. With one row per step, a
    request admitted while another is generating waits: in flight 2, queue depth 1, and
    the admitted tokens are both requests' prompt + max_tokens."""
    url, nc = bus
    async with running_worker(
        url, cloud_long_model, model="hg-queue", heartbeat_s=0.1, max_batch_requests=1,
        cache_tokens=LONG_CACHE_TOKENS,
    ) as worker:  # fmt: skip
        assert worker.engine is not None
        beats = await collected(nc, subjects.telemetry("cloud", worker.node_id), wire.Heartbeat)
        prompt = len(worker.engine.encode("Hello"))
        running = ask("hg-queue", max_tokens=8000)  # runs for many seconds
        async with request_stream(nc, running) as first:
            async for chunk in first:
                if chunk.token_ids:  # it is generating: no longer waiting
                    break
            async with request_stream(nc, ask("hg-queue", max_tokens=4)):  # admitted
                both = await eventually(
                    lambda: [b for b in beats if b.in_flight == 2], "both requests in flight"
                )
        assert both[0].queue_depth == 1
        assert both[0].extra["admitted_tokens"] == (prompt + 8000) + (prompt + 4)


# ------------------------------------------------------------ "Calling the cloud API"

#: Window of the small model served as `SMALL`: a chat prompt and its answer must share it.
SMALL_CONTEXT = 96
SMALL = "hg-small"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cloud_api(
    bus: tuple[str, Client], cloud_long_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """The cloud API in front of two workers: `hg-cloud` on the long-window model and
    `hg-small` on a model whose window is `SMALL_CONTEXT` tokens; its base URL."""
    from models.lab.random_model import make_random_llama

    small = make_random_llama(tmp_path_factory.mktemp("small_window"), context_length=SMALL_CONTEXT)
    url, _ = bus
    async with (
        running_worker(url, cloud_long_model, model=MODEL, cache_tokens=LONG_CACHE_TOKENS),
        running_worker(url, small, model=SMALL),
        serve_cloud_api(url, models=[MODEL, SMALL]) as api,
    ):
        yield api


def sse_chunks(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON chunks of a stream's `data:` lines, which must end with `[DONE]`."""
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


async def stream_of(api: str, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """POST a streamed chat: (its X-Request-Id header, its chunks)."""
    async with (
        httpx.AsyncClient(base_url=api, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as answer,
    ):
        assert answer.status_code == 200, await answer.aread()
        lines = [line async for line in answer.aiter_lines() if line.startswith("data: ")]
        return answer.headers["x-request-id"], sse_chunks(lines)


HELLO = [{"role": "user", "content": "Hello"}]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("usage", [False, True], ids=["plain", "include_usage"])
async def test_a_streams_last_chunk_carries_the_request_id_of_its_header(
    cloud_api: str, usage: bool
) -> None:
    """docs/cloud.md, "Calling the cloud API": `request_id`, also in the `X-Request-Id`
    header and in the last chunk of a stream (the usage chunk, when asked for, is last)."""
    body: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "temperature": 0}
    if usage:
        body["stream_options"] = {"include_usage": True}
    header, chunks = await stream_of(cloud_api, body)
    assert re.fullmatch(r"[0-9A-Za-z_-]+", header)
    assert chunks[-1]["request_id"] == header
    assert (chunks[-1]["choices"] == []) is usage  # the last is the usage chunk when asked
    assert {c["id"] for c in chunks} == {f"chatcmpl-{header}"}


@pytest.mark.asyncio(loop_scope="module")
async def test_a_chat_without_max_tokens_stops_at_the_cap(cloud_api: str) -> None:
    """docs/cloud.md: without `max_tokens` an answer runs until the model stops or the
    context is full, at most `--max-tokens-cap` (`MAX_TOKENS_CAP`, 1024): greedy, the
    long-window model writes no end token, so exactly the cap, cut by it."""
    async with httpx.AsyncClient(base_url=cloud_api, timeout=60) as http:
        answer = await http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "temperature": 0}
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == MAX_TOKENS_CAP == 1024


@pytest.mark.asyncio(loop_scope="module")
async def test_a_chat_without_max_tokens_stops_at_the_end_of_the_window(cloud_api: str) -> None:
    """docs/cloud.md: without `max_tokens` the answer ends where the context is full: on a
    model whose window is smaller than the cap, a chat makes what the window leaves after
    its prompt, no error."""
    async with httpx.AsyncClient(base_url=cloud_api, timeout=60) as http:
        answer = await http.post(
            "/v1/chat/completions", json={"model": SMALL, "messages": HELLO, "temperature": 0}
        )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    usage = body["usage"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert usage["completion_tokens"] == SMALL_CONTEXT - usage["prompt_tokens"]
    assert 0 < usage["completion_tokens"] < MAX_TOKENS_CAP
