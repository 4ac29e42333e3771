"""The bus-input rows of the fault catalogue: a real worker on a real nats-server is sent
broken requests on its generation subject. Each gets a coded `bad_request` reply, compared
whole (code, message, param, the request id echoed when the request carried one), and the
worker keeps serving the next, valid, request.

The edge's side of the catalogue (worker replies, control messages, KV policy values) is in
`test_catalogue_bus_edge_*.py`."""

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
from tests.waits import BOUND_S

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


#: The request id of `GOOD`, echoed by a refusal of a request that carries one.
RID = GOOD["request_id"]

#: (case, payload, the refusal's message, its `param`, the request id it echoes)
CASES: list[tuple[str, bytes, str, str | None, str | None]] = [
    (
        "malformed msgpack",
        b"\xc1\xff\x00not msgpack",
        "malformed msgpack (FormatError: )",
        None,
        None,
    ),
    (
        "not a map",
        pack(["generate", "Hello"]),
        "message must be a msgpack map, got list",
        None,
        None,
    ),
    ("a number", pack(42), "message must be a msgpack map, got int", None, None),
    (
        "another message type",
        pack({**GOOD, "type": "chunk"}),
        "expected a 'generate' message, got 'chunk'",
        "type",
        RID,
    ),
    (
        "wrong type of field",
        pack({**GOOD, "max_tokens": "many"}),
        "invalid field 'max_tokens': Input should be a valid integer",
        "max_tokens",
        RID,
    ),
    (
        "missing request id",
        pack(without("request_id")),
        "missing field 'request_id'",
        "request_id",
        None,
    ),
    ("missing model", pack(without("model")), "missing field 'model'", "model", RID),
    (
        "neither prompt nor messages",
        pack(without("prompt")),
        "exactly one of 'messages' and 'prompt' must be set",
        None,
        RID,
    ),
    (
        "unknown version",
        pack({**GOOD, "v": 99}),
        "unsupported message version 99 (this node speaks v3)",
        "v",
        RID,
    ),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.lab.random_model import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("catalogue_model"), context_length=256)


@pytest.fixture
def make_worker(start_cloud_worker: Callable[..., Any], model_dir: Path) -> Callable[..., Any]:
    return functools.partial(start_cloud_worker, model_dir)


@pytest.mark.parametrize(
    ("case", "payload", "message", "param", "request_id"), CASES, ids=[c[0] for c in CASES]
)
async def test_bad_bus_input_is_a_coded_reply_and_the_worker_keeps_serving(
    make_worker: Callable[..., Any],
    nats_url: str,
    nc: Client,
    case: str,
    payload: bytes,
    message: str,
    param: str | None,
    request_id: str | None,
) -> None:
    await make_worker(node_id="cloud-catalogue")
    await expect_bad_request(nc, payload, message, param, request_id)
    await expect_served(nc)


async def expect_bad_request(
    nc: Client, payload: bytes, message: str, param: str | None, request_id: str | None
) -> None:
    """The worker's whole reply is the coded refusal: `bad_request` with exactly these."""
    reply = await nc.request(subjects.gen(MODEL), payload, timeout=BOUND_S)
    assert wire.decode_reply(reply.data) == wire.Error(
        code="bad_request", message=message, param=param, request_id=request_id
    )


async def expect_served(nc: Client) -> None:
    """The worker is still there and serves a valid request."""
    request = wire.GenerateRequest.model_validate({**GOOD, "request_id": "req-after"})
    async with request_stream(nc, request, accept_timeout=BOUND_S, idle_timeout=BOUND_S) as stream:
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
        await expect_bad_request(
            client,
            payload,
            f"message of {len(payload)} bytes exceeds the limit of {wire.MAX_MESSAGE_BYTES} bytes",
            None,
            RID,  # read from the message's head, so the caller can match the refusal
        )
        await expect_served(client)
    finally:
        await worker.close()
        await worker_nc.close()
        await client.close()
