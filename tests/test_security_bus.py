"""The bus's attack catalogue, one test per attack, on a real nats-server run with the
config `broker.config.render` writes (users per role, the `bus` fixture of
tests/fixtures_secure_bus.py):

- reply-subject injection: a request whose reply subject is the fleet policy key
  (`$KV.hg_config.policy.default`) or an artifact's metadata (`$O.hg_models.M.…`) makes the
  service that answers write there (nats-server lets a reply through any deny list), via a
  generation request, a `$SRV.INFO` request and a control request;
- a node credential publishing as another node (the users `hybridgen up` makes);
- heartbeat spoofing at the console, and key collection through a forged `api_url`;
- a fake worker (an edge credential) answering discovery and the cloud API's readiness probe;
- the api role reading control.

"Nothing was written" is checked with a marker: after the attack, the operator publishes
one message to the same stream, which must get the next sequence number.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from nats.aio.client import Client
from nats.aio.msg import Msg
from textual.widgets import DataTable

from broker import subjects, wire
from broker.bus import GenerationService, connect_settings, send_control
from broker.control import serve_control
from broker.store import ArtifactStore, FleetConfig
from broker.streaming import request_stream
from cloud.api import create_app as create_cloud_api
from cloud.settings import ApiSettings
from hybridgen.up.children import default_children
from hybridgen.up.supervisor import Launcher
from tests.fixtures_secure_bus import MODEL, Bus, echo, generate
from tests.fixtures_tui import until
from tests.live import serve_app
from tests.waits import eventually
from tui.app import HybridgenConsole
from tui.event_log import EventLog
from tui.prompt import PromptScreen
from tui.state import FleetState

KV_STREAM = f"KV_{subjects.CONFIG_BUCKET}"
OBJ_STREAM = f"OBJ_{subjects.MODELS_BUCKET}"
#: The reply subjects an attacker names, and the stream each lands in: the fleet policy key
#: and the metadata of the artifact `v1/manifest.json` (its name in base64url).
TARGETS = {
    "kv": (f"$KV.{subjects.CONFIG_BUCKET}.{subjects.policy_key()}", KV_STREAM),
    "obj": (f"$O.{subjects.MODELS_BUCKET}.M.djEvbWFuaWZlc3QuanNvbg==", OBJ_STREAM),
}
MARKERS = {
    KV_STREAM: f"$KV.{subjects.CONFIG_BUCKET}.marker",
    OBJ_STREAM: f"$O.{subjects.MODELS_BUCKET}.C.marker",
}
FLEET_POLICY = {"perplexity_threshold": 42.0}


async def stores(bus: Bus) -> tuple[Client, FleetConfig]:
    """The operator's connection, with the fleet policy set and both buckets made."""
    ops = await bus.connect("ops")
    config = await FleetConfig.open(ops)
    await config.put(subjects.policy_key(), FLEET_POLICY)
    await ArtifactStore.open(ops)
    return ops, config


async def last_seq(ops: Client, stream: str) -> int:
    return int((await ops.jetstream().stream_info(stream)).state.last_seq)


async def assert_untouched(ops: Client, config: FleetConfig, stream: str, before: int) -> None:
    """Nothing reached `stream` since `before`: the operator's marker is the next message
    (anything the attack wrote was queued to the stream before it)."""
    ack = await ops.jetstream().publish(MARKERS[stream], b"marker")
    assert (ack.stream, ack.seq) == (stream, before + 1)
    assert await config.get(subjects.policy_key()) == FLEET_POLICY


# -------------------------------------------------------------------- reply-subject injection


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("attacker", ["edge1", "api"])
async def test_a_generation_reply_never_goes_to_the_config_or_the_models(
    bus: Bus, attacker: str, target: str
) -> None:
    ops, config = await stores(bus)
    cloud, client = await bus.connect("cloud1"), await bus.connect(attacker)
    reply, stream = TARGETS[target]
    async with GenerationService(cloud, model=MODEL, handler=echo, node_id="cloud-a"):
        before = await last_seq(ops, stream)
        await client.publish(
            subjects.gen(MODEL), wire.encode(generate("hijacked policy")), reply=reply
        )
        async with request_stream(client, generate("marker")) as stream_:  # served after it
            assert (await stream_.collect())[0] == "marker"
    await assert_untouched(ops, config, stream, before)
    bus.no_violation(attacker)  # the request itself is allowed: the worker refused the reply


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("attacker", ["api", "ops"])
async def test_a_discovery_reply_never_goes_to_the_config_or_the_models(
    bus: Bus, attacker: str, target: str
) -> None:
    ops, config = await stores(bus)
    cloud, edge = await bus.connect("cloud1"), await bus.connect("edge1")
    client = ops if attacker == "ops" else await bus.connect(attacker)
    reply, stream = TARGETS[target]
    # The api may ask the workers only; an operator asks every service, with each verb.
    verbs = ("$SRV.PING", "$SRV.INFO", "$SRV.STATS")
    asks = verbs if attacker == "ops" else (subjects.discovery_info("hybridgen-cloud"),)
    answering = {"hybridgen-cloud", "hybridgen-edge"} if attacker == "ops" else {"hybridgen-cloud"}
    control = await serve_control(
        edge, node_id="edge-1", role="edge", handlers={}, name="hybridgen-edge"
    )
    try:
        async with GenerationService(cloud, model=MODEL, handler=echo, node_id="cloud-a"):
            before = await last_seq(ops, stream)
            inbox = client.new_inbox()
            sub = await client.subscribe(inbox)
            for ask in asks:
                await client.publish(ask, b"", reply=reply)
                # The marker: the same question to the same subscriptions, answered after it.
                await client.publish(ask, b"", reply=inbox)
                answers = [json.loads((await sub.next_msg(timeout=5)).data) for _ in answering]
                assert {answer["name"] for answer in answers} == answering
    finally:
        await control.stop()
    await assert_untouched(ops, config, stream, before)


@pytest.mark.parametrize("target", sorted(TARGETS))
async def test_a_control_reply_never_goes_to_the_config_or_the_models(
    bus: Bus, target: str
) -> None:
    ops, config = await stores(bus)  # only operators send control
    edge = await bus.connect("edge1")
    reply, stream = TARGETS[target]
    drained: list[str] = []

    async def drain(request: wire.ControlRequest) -> wire.ControlReply:
        drained.append(str(request.args.get("by")))
        return wire.ControlReply(ok=True, message="draining")

    service = await serve_control(edge, node_id="edge-1", role="edge", handlers={"drain": drain})
    try:
        before = await last_seq(ops, stream)
        attack = wire.ControlRequest(verb="drain", args={"by": "attack"})
        await ops.publish(subjects.control("edge-1", "drain"), wire.encode(attack), reply=reply)
        assert (await send_control(ops, "edge-1", "drain", {"by": "marker"})).ok
    finally:
        await service.stop()
    assert drained == ["marker"]  # the injected request was dropped unread
    await assert_untouched(ops, config, stream, before)


# ---------------------------------------------------------------- node-bound credentials


async def test_every_child_of_up_publishes_only_as_its_own_node(tmp_path: Path) -> None:
    args = argparse.Namespace(
        workers=1, edges=1, api_port=8500, edge_port=8000, http_host="127.0.0.1"
    )
    launcher = Launcher(home=tmp_path, children=default_children(args), port=-1)
    violations: list[str] = []

    async def on_error(exc: Exception) -> None:
        violations.append(str(exc).lower())

    try:
        await launcher.start_broker()
        watcher = await connect_settings(launcher.bus_settings(), name="watcher")
        beats = await watcher.subscribe(subjects.TELEMETRY_ALL)
        await watcher.flush()
        clients: list[Client] = []
        for spec in launcher.children:
            assert spec.role is not None and spec.node_id, spec  # a user bound to its node
            client = await connect_settings(
                launcher.bus_settings(spec.nats_user), name=spec.name, error_cb=on_error
            )
            clients.append(client)
            await client.publish(subjects.telemetry(spec.role, "someone-else"), b"forged")
            await client.publish(subjects.events(spec.role, "someone-else"), b"forged")
            await client.publish(subjects.telemetry(spec.role, spec.node_id), b"own")
            await client.flush()
        own = [(await beats.next_msg(timeout=5)).subject for _ in launcher.children]
        assert own == [subjects.telemetry(s.role or "", s.node_id or "") for s in launcher.children]
        await watcher.flush()
        assert beats.pending_msgs == 0  # no forged heartbeat came through
        for spec in launcher.children:
            for subject in (
                subjects.telemetry(spec.role or "", "someone-else"),
                subjects.events(spec.role or "", "someone-else"),
            ):
                await eventually(
                    lambda s=subject: any(
                        s in v and "permissions violation" in v for v in violations
                    )  # type: ignore[misc]
                )
        for client in (*clients, watcher):
            await client.close()
    finally:
        await launcher.stop()


# ------------------------------------------------------------------------- the console


def console(bus: Bus, *, edge_api_key: str | None = None) -> HybridgenConsole:
    app = HybridgenConsole(
        bus.settings("ops"), fleet=FleetState(stale_after=60, gone_after=120), events=EventLog()
    )
    app.edge_api_key = edge_api_key
    return app


async def beat(client: Client, subject: str, role: str, node_id: str, **fields: object) -> None:
    heartbeat = wire.Heartbeat(role=role, node_id=node_id, **fields)  # type: ignore[arg-type]
    await client.publish(subject, wire.encode(heartbeat))
    await client.flush()


async def test_the_console_drops_a_heartbeat_that_names_another_node_or_role(bus: Bus) -> None:
    edge1 = await bus.connect("edge1")
    own = subjects.telemetry("edge", "edge-1")
    app = console(bus)
    async with app.run_test(size=(160, 40)) as pilot:
        await until(pilot, lambda: app.connected, "connected")
        await beat(edge1, own, "edge", "edge-2", model_version="forged")  # another node
        await beat(edge1, own, "cloud", "edge-1", model_version="forged")  # another role
        await beat(edge1, own, "edge", "edge-1", model_version="real")  # the marker
        await until(pilot, lambda: app.fleet.get("edge-1") is not None, "edge-1's own beat")
        assert app.fleet.get("edge-2") is None
        node = app.fleet.get("edge-1")
        assert node is not None
        assert (node.role, node.heartbeat.model_version, len(node.history.at)) == (
            "edge",
            "real",
            1,
        )


async def test_the_console_key_never_goes_to_a_forged_api_url(bus: Bus) -> None:
    collected: list[str] = []
    collector = FastAPI()

    @collector.api_route("/{path:path}", methods=["GET", "POST"])
    async def collect(request: Request, path: str) -> JSONResponse:
        collected.append(request.headers.get("authorization", ""))
        return JSONResponse({"error": {"message": "collected", "code": "x"}}, status_code=500)

    edge1 = await bus.connect("edge1")
    own = subjects.telemetry("edge", "edge-1")
    async with serve_app(collector) as (_, url):
        app = console(bus, edge_api_key="console-edge-key")
        async with app.run_test(size=(160, 40)) as pilot:
            await until(pilot, lambda: app.connected, "connected")
            # edge-1 poses as edge-2 with its own server as edge-2's API, then beats as itself.
            await beat(edge1, own, "edge", "edge-2", extra={"api_url": url})
            await beat(edge1, own, "edge", "edge-1", extra={"api_url": url})
            await until(pilot, lambda: app.fleet.get("edge-1") is not None, "edge-1's beat")
            app.refresh_fleet()
            await pilot.pause()
            assert app.fleet.get("edge-2") is None
            table = app.query_one("#fleet", DataTable)
            assert [str(row.key.value) for row in table.ordered_rows] == ["edge-1"]
            # edge-1 forged a heartbeat: its api_url gets no key either.
            table.move_cursor(row=table.get_row_index("edge-1"))
            await pilot.press("g")
            await pilot.pause()
            assert not isinstance(app.screen, PromptScreen)
        async with httpx.AsyncClient() as http:  # the collector works: the marker arrives
            await http.get(f"{url}/marker")
    assert collected == [""]


# ------------------------------------------------------------------- discovery and control


async def test_an_edge_cannot_answer_discovery_as_a_worker(bus: Bus) -> None:
    edge1, api, cloud = (
        await bus.connect("edge1"),
        await bus.connect("api"),
        await bus.connect("cloud1"),
    )
    fake = {
        "name": "hybridgen-cloud",
        "id": "fake",
        "version": "1.0.0",
        "metadata": {"node_id": "cloud-fake", "model": MODEL, "role": "cloud"},
        "endpoints": [{"name": "generate", "subject": subjects.gen(MODEL)}],
    }

    async def pose(msg: Msg) -> None:
        await msg.respond(json.dumps(fake).encode())

    wide = (subjects.DISCOVERY_ALL, "$SRV.INFO.*", "$SRV.*.*")  # an allowed `*` admits `>`
    for subject in (subjects.discovery_info("hybridgen-cloud"), *wide):
        await edge1.subscribe(subject, cb=pose)
        await bus.violation("edge1", subject)
    app = create_cloud_api(ApiSettings(models=[MODEL]), nc=api)
    async with serve_app(app) as (_, url), httpx.AsyncClient(base_url=url) as http:
        refused = await http.get("/readyz")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["message"] == f"no worker serves {subjects.gen(MODEL)}"
        async with GenerationService(cloud, model=MODEL, handler=echo, node_id="cloud-a"):

            async def ready_now() -> httpx.Response | None:
                answer = await http.get("/readyz")  # cached for 1 s: polled until it changes
                return answer if answer.status_code == 200 else None

            ready = await eventually(ready_now, "the API ready once a worker serves")
            assert ready.json() == {"status": "ready", "worker": "cloud-a"}


async def test_the_api_role_reads_no_control(bus: Bus) -> None:
    ops, api, edge1 = await bus.connect("ops"), await bus.connect("api"), await bus.connect("edge1")

    async def drain(request: wire.ControlRequest) -> wire.ControlReply:
        return wire.ControlReply(ok=True, message="draining")

    read = await api.subscribe(subjects.CONTROL_ALL)
    await bus.violation("api", subjects.CONTROL_ALL)
    own = await api.subscribe(subjects.control_of_node("api-1"))  # not even its own node's
    await bus.violation("api", subjects.control_of_node("api-1"))
    service = await serve_control(edge1, node_id="edge-1", role="edge", handlers={"drain": drain})
    try:
        assert (await send_control(ops, "edge-1", "drain")).ok
    finally:
        await service.stop()
    await api.flush()  # anything sent to it arrived before this round trip ends
    assert (read.pending_msgs, own.pending_msgs) == (0, 0)
