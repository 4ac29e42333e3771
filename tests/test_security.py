"""Secure by default: each role's NATS rights on a real nats-server run with the rendered
config, credentials from password files, TLS end to end, the loopback rule of the edge, and
API keys (constant-time check, `/metrics` protection)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from broker import errors, subjects
from broker.bus import GenerationService, connect, connect_settings
from broker.config import ServerConfig, User, ensure_password, render, self_signed_tls
from broker.control import send_control, serve_control
from broker.server import NatsServer
from broker.settings import BusSettings
from broker.store import FleetConfig
from broker.streaming import request_stream
from cloud.api import create_app as create_cloud_api
from cloud.settings import ApiSettings
from edge.cli import build_app as build_edge_app
from edge.settings import EdgeSettings
from hybridgen.up.supervisor import Launcher
from tests.fixtures_secure_bus import MODEL, Bus, drain, echo, generate, kv_put_fails
from tests.waits import eventually

REPO = Path(__file__).resolve().parent.parent


# The secured bus (`bus` fixture) and its helpers: tests/fixtures_secure_bus.py.
async def test_edge_cannot_write_config_send_control_or_read_other_replies(bus: Bus) -> None:
    ops, edge1, edge2 = (
        await bus.connect("ops"),
        await bus.connect("edge1"),
        await bus.connect("edge2"),
    )
    cloud = await bus.connect("cloud1")
    config = await FleetConfig.open(ops)
    await config.put(subjects.policy_key(), {"threshold": 2})

    # The fleet config: readable, not writable, not even its own override (the operator
    # side stores that: hybridgen.fleet_policy).
    await kv_put_fails(edge1, subjects.policy_key())
    await bus.violation("edge1", f"$KV.{subjects.CONFIG_BUCKET}.{subjects.policy_key()}")
    for node in ("edge-2", "edge-1"):
        await kv_put_fails(edge1, subjects.policy_key(node))
        await bus.violation("edge1", subjects.policy_key(node))
        assert await config.get(subjects.policy_key(node)) is None
    assert await config.get(subjects.policy_key()) == {"threshold": 2}
    edge_config = await FleetConfig.open(edge1)
    assert await edge_config.get(subjects.policy_key()) == {"threshold": 2}

    # No control verbs: not to another node, not even to itself.
    service = await serve_control(edge2, node_id="edge-2", role="edge", handlers={"drain": drain})
    try:
        with pytest.raises(errors.Timeout):
            await send_control(edge1, "edge-2", "drain", timeout=0.5)
        await bus.violation("edge1", subjects.control("edge-2", "drain"))
        await edge1.publish(subjects.control("edge-1", "drain"), b"")
        await bus.violation("edge1", subjects.control("edge-1", "drain"))
    finally:
        await service.stop()

    # Another node's replies: the subscription is refused and nothing arrives.
    stolen: list[Msg] = []

    async def steal(msg: Msg) -> None:
        stolen.append(msg)

    await edge2.subscribe("_INBOX_edge1.>", cb=steal)
    await bus.violation("edge2", "_INBOX_edge1.>")
    async with (
        GenerationService(cloud, model=MODEL, handler=echo, node_id="cloud-a"),
        request_stream(edge1, generate("secret words here")) as stream,
    ):
        text, _ = await stream.collect()
    assert text == "secretwordshere"
    await edge2.flush()
    assert stolen == []


async def test_api_requests_generation_but_writes_no_config_and_sends_no_control(bus: Bus) -> None:
    ops, api, cloud = (
        await bus.connect("ops"),
        await bus.connect("api"),
        await bus.connect("cloud1"),
    )
    await FleetConfig.open(ops)
    async with GenerationService(cloud, model=MODEL, handler=echo, node_id="cloud-a"):
        async with request_stream(api, generate("through the api")) as stream:
            text, done = await stream.collect()
        assert text == "throughtheapi" and done.served_by == "cloud-a"
        # Its readiness probe: which workers serve (nats.micro discovery).
        info = await api.request(subjects.discovery_info("hybridgen-cloud"), b"", timeout=2)
        assert json.loads(info.data)["metadata"]["node_id"] == "cloud-a"
    bus.no_violation("api")
    bus.no_violation("cloud1")

    await kv_put_fails(api, subjects.policy_key())
    await bus.violation("api", f"$KV.{subjects.CONFIG_BUCKET}")
    await api.publish(subjects.control("edge-1", "drain"), b"")
    await bus.violation("api", subjects.control("edge-1", "drain"))


async def test_operator_controls_and_writes_policy(bus: Bus) -> None:
    ops, edge1 = await bus.connect("ops"), await bus.connect("edge1")
    config = await FleetConfig.open(ops)
    await config.put(subjects.policy_key(), {"threshold": 7})
    await config.put(subjects.policy_key("edge-1"), {"threshold": 8})
    assert await config.get(subjects.policy_key()) == {"threshold": 7}
    service = await serve_control(edge1, node_id="edge-1", role="edge", handlers={"drain": drain})
    try:
        reply = await send_control(ops, "edge-1", "drain")
        assert reply.ok and reply.message == "draining"
    finally:
        await service.stop()
    bus.no_violation("ops")
    bus.no_violation("edge1")
    # Operators read; they do not pose as a service.
    await ops.publish(subjects.telemetry("edge", "edge-1"), b"")
    await bus.violation("ops", subjects.telemetry("edge", "edge-1"))


async def test_cloud_serves_its_queue_group_and_publishes_its_telemetry(bus: Bus) -> None:
    ops, cloud, edge1 = (
        await bus.connect("ops"),
        await bus.connect("cloud1"),
        await bus.connect("edge1"),
    )
    beats: list[str] = []

    async def on_beat(msg: Msg) -> None:
        beats.append(msg.subject)

    await ops.subscribe(subjects.TELEMETRY_ALL, cb=on_beat)
    await ops.flush()
    raw = await cloud.subscribe(subjects.gen(MODEL), queue=subjects.queue_group(MODEL))
    await raw.unsubscribe()  # the subscription was allowed (no violation below)
    await cloud.publish(subjects.telemetry("cloud", "cloud-a"), b"beat")
    await cloud.publish(subjects.events("cloud", "cloud-a"), b"event")
    async with (
        GenerationService(cloud, model=MODEL, handler=echo, node_id="cloud-a"),
        request_stream(edge1, generate("a b")) as stream,
    ):
        assert (await stream.collect())[0] == "ab"
    await eventually(lambda: beats, "the worker's heartbeat")
    assert beats == [subjects.telemetry("cloud", "cloud-a")]
    bus.no_violation("cloud1")
    # Not another node's telemetry, not a request of its own, not the config.
    await cloud.publish(subjects.telemetry("cloud", "cloud-b"), b"")
    await bus.violation("cloud1", subjects.telemetry("cloud", "cloud-b"))
    await cloud.publish(subjects.control("edge-1", "drain"), b"")
    await bus.violation("cloud1", subjects.control("edge-1", "drain"))


async def test_only_the_launcher_publishes_launcher_events(bus: Bus) -> None:
    ops, launcher = await bus.connect("ops"), await bus.connect("launcher")
    seen: list[str] = []
    arrived = asyncio.Event()

    async def on_event(msg: Msg) -> None:
        seen.append(msg.subject)
        arrived.set()

    await ops.subscribe(subjects.events_of_role("launcher"), cb=on_event)
    await ops.flush()
    await launcher.publish(subjects.events("launcher", "l1"), b"{}")
    # The launcher's event is delivered first (its own connection; wait for it), then the
    # operator's forged one is refused by the server, so it can never arrive later.
    await asyncio.wait_for(arrived.wait(), 10)
    await ops.publish(subjects.events("launcher", "fake"), b"{}")
    await bus.violation("ops", subjects.events("launcher", "fake"))
    assert seen == [subjects.events("launcher", "l1")]
    bus.no_violation("launcher")


async def test_password_file_and_refusals(bus: Bus, tmp_path: Path) -> None:
    client = await bus.connect("edge1")  # BusSettings.password_file
    assert client.is_connected
    with pytest.raises(errors.Unauthorized):
        await connect_settings(BusSettings(url=bus.server.client_url), name="anonymous")
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-it\n")
    with pytest.raises(errors.Unauthorized):
        await connect_settings(
            bus.settings("edge1").model_copy(update={"password_file": wrong}), name="wrong"
        )
    missing = bus.settings("edge1").model_copy(update={"password_file": tmp_path / "nope"})
    with pytest.raises(errors.Unavailable, match="password file"):
        await connect_settings(missing, name="missing")


def test_passwords_are_owner_only_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "svc.password"
    first = ensure_password(path)
    assert ensure_password(path) == first and len(first) >= 24
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    assert ensure_password(path) == first
    assert path.stat().st_mode & 0o777 == 0o600


async def test_tls_end_to_end_with_bus_settings(
    tmp_path: Path, start_nats: Callable[..., Awaitable[NatsServer]]
) -> None:
    tls = self_signed_tls(tmp_path / "tls", ["127.0.0.1"])
    password = ensure_password(tmp_path / "ops.password")
    conf = tmp_path / "tls.conf"
    conf.write_text(
        render(
            ServerConfig(
                host="127.0.0.1",
                port=-1,
                tls=tls,
                users=[User("ops", password, "operator")],
            )
        )
    )
    server = await start_nats("tls", config_file=conf, jetstream=False)
    url = server.client_url.replace("nats://", "tls://")
    settings = BusSettings(
        url=url, user="ops", password=None, password_file=tmp_path / "ops.password", tls_ca=tls.ca
    )
    client = await connect_settings(settings, name="tls-ops")
    try:
        sub = await client.subscribe(subjects.events("operator", "x"))
        await client.publish(subjects.events("operator", "x"), b"over tls")
        assert (await sub.next_msg(timeout=2)).data == b"over tls"
        assert client.connected_url is not None and client.connected_url.scheme == "tls"
    finally:
        await client.close()
    # A client that does not trust the private CA is refused.
    with pytest.raises(errors.Unavailable):
        await connect_settings(settings.model_copy(update={"tls_ca": None}), name="untrusting")


async def test_launcher_beyond_loopback_runs_tls_and_users(tmp_path: Path) -> None:
    async with Launcher(home=tmp_path, host="0.0.0.0", port=-1) as launcher:
        assert launcher.url.startswith("tls://") and launcher.tls is not None
        assert (tmp_path / "secrets" / "tls" / "ca.pem").is_file()
        client = await connect_settings(launcher.bus_settings("operator"), name="remote-op")
        await client.close()
        with pytest.raises(errors.Unavailable):  # plain TCP, no CA: refused
            await connect_settings(BusSettings(url=launcher.url), name="no-tls")
        trusting = ssl.create_default_context(cafile=str(launcher.tls.ca))
        with pytest.raises(errors.Unauthorized):  # TLS but no user
            await connect(launcher.url, name="no-user", tls=trusting)


# -- HTTP APIs --------------------------------------------------------------------------------


def test_edge_refuses_to_listen_beyond_loopback_without_a_key(tmp_path: Path) -> None:
    env = {**os.environ, "HG_HOME": str(tmp_path)}
    env.pop("HG_EDGE_API_KEYS", None)
    refused = subprocess.run(
        [sys.executable, "-m", "edge", "--host", "0.0.0.0", "--port", "0", "--no-cloud"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "HG_EDGE_API_KEYS" in refused.stderr and "--api-key" in refused.stderr
    assert "Traceback" not in refused.stderr
    EdgeSettings(host="0.0.0.0", api_keys=["k"]).check_exposure()
    EdgeSettings(host="127.0.0.1").check_exposure()
    EdgeSettings(host="0.0.0.0", allow_open=True).check_exposure()
    with pytest.raises(ValueError, match="API key"):
        EdgeSettings(host="192.0.2.7").check_exposure()
    with pytest.raises(ValueError, match="metrics_require_key"):
        EdgeSettings(metrics_require_key=True).check_exposure()


async def get(app: object, path: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return await client.get(path, headers=headers)


async def test_api_keys_right_wrong_missing(nc: Client) -> None:
    app = create_cloud_api(ApiSettings(api_keys=["k-one", "k-two"]), nc=nc)
    assert (await get(app, "/v1/models", "k-one")).status_code == 200
    assert (await get(app, "/v1/models", "k-two")).status_code == 200
    for key in ("k-on", "k-one-", "K-ONE", "", None):
        answer = await get(app, "/v1/models", key)
        assert answer.status_code == 401, (key, answer.text)
        assert answer.json()["error"]["code"] == "unauthorized"
    # /metrics is open by default (loopback); protected on request.
    assert (await get(app, "/metrics")).status_code == 200
    guarded = create_cloud_api(ApiSettings(api_keys=["k"], metrics_require_key=True), nc=nc)
    assert (await get(guarded, "/metrics")).status_code == 401
    assert (await get(guarded, "/metrics", "bad")).status_code == 401
    assert "hybridgen_cloud_api_http_requests" in (await get(guarded, "/metrics", "k")).text
    assert (await get(guarded, "/healthz")).status_code == 200


async def test_edge_metrics_can_require_the_key() -> None:
    settings = EdgeSettings(api_keys=["edge-key"], metrics_require_key=True, no_cloud=True)
    app = build_edge_app(settings)
    assert (await get(app, "/metrics")).status_code == 401
    assert (await get(app, "/metrics", "nope")).status_code == 401
    assert "hybridgen_edge_http" in (await get(app, "/metrics", "edge-key")).text
    open_app = build_edge_app(EdgeSettings(api_keys=["edge-key"], no_cloud=True))
    assert (await get(open_app, "/metrics")).status_code == 200
