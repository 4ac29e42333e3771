"""The bus-input rows of the fault catalogue: a real worker on a real nats-server is sent
broken requests on its generation subject. Each gets a coded `bad_request` reply, and the
worker keeps serving the next, valid, request."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from nats.aio.client import Client

from broker import subjects, wire
from broker.streaming import request_stream

MODEL = "hg-cloud"

GOOD: dict[str, Any] = {
    "v": wire.VERSION,
    "type": "generate",
    "request_id": "req-catalogue",
    "model": MODEL,
    "prompt": "Hello",
    "max_tokens": 2,
    "temperature": 0.0,
}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def without(name: str) -> dict[str, Any]:
    return {key: value for key, value in GOOD.items() if key != name}


#: (case, payload, the `param` the error names or None)
CASES: list[tuple[str, bytes, str | None]] = [
    ("malformed msgpack", b"\xc1\xff\x00not msgpack", None),
    ("not a map", pack(["generate", "Hello"]), None),
    ("a number", pack(42), None),
    ("another message type", pack({**GOOD, "type": "chunk"}), "type"),
    ("wrong type of field", pack({**GOOD, "max_tokens": "many"}), "max_tokens"),
    ("missing request id", pack(without("request_id")), "request_id"),
    ("missing model", pack(without("model")), "model"),
    ("neither prompt nor messages", pack(without("prompt")), None),
    ("unknown version", pack({**GOOD, "v": 99}), "v"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.random_model import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("catalogue_model"), context_length=256)


@pytest.fixture
def make_worker(start_cloud_worker: Callable[..., Any], model_dir: Path) -> Callable[..., Any]:
    return functools.partial(start_cloud_worker, model_dir)


@pytest.mark.parametrize(("case", "payload", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_bus_input_is_a_coded_reply_and_the_worker_keeps_serving(
    make_worker: Callable[..., Any],
    nats_url: str,
    nc: Client,
    case: str,
    payload: bytes,
    param: str | None,
) -> None:
    await make_worker(node_id="cloud-catalogue")
    await expect_bad_request(nc, case, payload, param)
    await expect_served(nc)


async def expect_bad_request(nc: Client, case: str, payload: bytes, param: str | None) -> None:
    reply = await nc.request(subjects.gen(MODEL), payload, timeout=5)
    error = wire.decode_reply(reply.data)
    assert isinstance(error, wire.Error), f"{case}: {error!r}"
    assert error.code == "bad_request", f"{case}: {error.code} {error.message}"
    assert error.message
    if param is not None:
        assert error.param == param, f"{case}: {error.param!r} in {error.message!r}"


async def expect_served(nc: Client) -> None:
    """The worker is still there and serves a valid request."""
    request = wire.GenerateRequest.model_validate({**GOOD, "request_id": "req-after"})
    async with request_stream(nc, request) as stream:
        chunks = [chunk async for chunk in stream]
    assert stream.done is not None and stream.done.served_by == "cloud-catalogue"
    assert sum(len(chunk.token_ids) for chunk in chunks) == 2


async def test_a_message_over_the_wire_limit_is_refused_by_the_worker(
    start_nats: Callable[..., Any], model_dir: Path, tmp_path: Path
) -> None:
    """A broker that allows bigger payloads than the wire limit: the worker refuses them."""
    from broker.bus import connect
    from cloud.settings import WorkerSettings
    from cloud.worker import CloudWorker

    config = tmp_path / "big.conf"
    config.write_text("max_payload: 4MB\n")
    server = await start_nats("big", extra_args=["-c", str(config)])
    client = await connect(server.client_url, name="test")
    worker_nc = await connect(server.client_url, name="test-worker")
    worker = CloudWorker(
        worker_nc, WorkerSettings(model_dir=model_dir, threads=1, node_id="cloud-catalogue")
    )
    await worker.start()
    try:
        assert client.max_payload > wire.MAX_MESSAGE_BYTES + 1024
        payload = pack({**GOOD, "prompt": "x" * (wire.MAX_MESSAGE_BYTES + 1)})
        await expect_bad_request(client, "oversized", payload, None)
        await expect_served(client)
    finally:
        await worker.close()
        await worker_nc.close()
        await client.close()
