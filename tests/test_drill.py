"""The multi-machine drill, on loopback: a real NATS cluster with TLS and role users.

Layout (docs/deploy.md, on one machine): a 3-node cloud cluster whose nodes are also leaf
hubs (JetStream domain `hub`), two edge sites each with a leaf node and one edge, two cloud
workers on different cluster nodes, and the cloud API. Every server config is rendered by
`hybridgen broker config` (the CLI a deployer runs); every host has its own certificate from
one private CA; routes run over TLS verified at both ends; each site logs in to the hub
with its own credentials (`--leaf-site`), and every client as its role's user over TLS.

The drill then checks that requests from both edges reach both workers, that stopping a
cluster node loses no request and its clients reconnect, and that a leaf cut off from the
hub keeps its edge answering locally (`cloud_unavailable`) until the link returns. Site 2's
link runs through a TCP relay in the test, so the link alone can be cut and restored (the
hubs do not advertise their other leaf URLs, `--leaf-no-advertise`, or the leaf node would
dial around the cut).

`test_compromised_site_cannot_read_other_sites_or_steer_them` (fast, no TLS) is the attack
on that layout: a site that speaks the leaf protocol by hand with its own login.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import shutil
import ssl
import subprocess
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from nats.aio.client import Client

from broker import errors, subjects, wire
from broker.bus import GenerationService, Responder, connect
from broker.cli import config_main
from broker.config import self_signed_tls
from broker.control import ControlHandler, send_control, serve_control
from broker.server import NatsServer, find_nats_server, free_port
from broker.store import FleetConfig
from broker.streaming import request_stream
from broker.tls import host_certificate
from edge.settings import EdgeSettings
from models.registry import ModelSet
from tests.fixtures_edge import LiveEdge, serve_edge
from tests.waits import eventually

PASSWORDS = {"cloud": "cloud-pw", "api": "api-pw", "ops": "ops-pw", "edge": "edge-pw"}
#: Each site's own login on the hub (`--leaf-site`): (login, password, its edge's user).
SITE_LOGINS = (("site1", "site1-pw", "site1-user"), ("site2", "site2-pw", "site2-user"))
ROUTE = ("route", "route-pw")
EDGES = ("site1-edge", "site2-edge")
WORKERS = ("worker-a", "worker-b")
#: The fleet policy the operator writes to the hub's KV; the edges read it across their leaf.
FLEET_POLICY = {"request_timeout_ms": 60_000.0}
#: Bound of one HTTP request in the drill.
WAIT_S = 30.0


def render(path: Path, *args: str) -> Path:
    """Write a config with the CLI (`hybridgen broker config ... -o path`)."""
    assert config_main([*args, "-o", str(path)]) == 0, args
    return path


def tls_url(server: NatsServer) -> str:
    return server.client_url.replace("nats://", "tls://")


class Relay:
    """A TCP relay on a fixed loopback port to `target`; `cut()` severs it, `restore()`
    listens again (a leaf node's link to its hub runs through one)."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def restore(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in self.writers:
            writer.close()
        self.writers.clear()
        for task in list(self.tasks):
            task.cancel()


@contextlib.asynccontextmanager
async def cloud_api(nc: Client) -> AsyncIterator[str]:
    """The cloud HTTP API on `nc` (its `api` user's connection); yields its base URL."""
    from cloud.api import create_app
    from cloud.settings import ApiSettings

    settings = ApiSettings(port=0, models=["hg-cloud"], idle_timeout_s=5.0, accept_timeout_s=5.0)
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, nc=nc), host="127.0.0.1", port=0, log_level="warning")
    )
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done(), "the cloud API start")
        if task.done():
            task.result()
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def ask_api(api_url: str) -> None:
    """One completion through the cloud API (answered by a worker)."""
    async with httpx.AsyncClient(base_url=api_url, timeout=WAIT_S) as client:
        response = await client.post(
            "/v1/completions", json={"model": "hg-cloud", "prompt": "hi", "max_tokens": 4}
        )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


async def ask(edge: LiveEdge, route: str = "cloud") -> dict[str, Any]:
    """One chat request to an edge; its body (checked to be a complete answer)."""
    async with httpx.AsyncClient(base_url=edge.url, timeout=WAIT_S) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": "hg-edge",
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 4,
                "temperature": 0,
                "route": route,
            },
        )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["choices"][0]["finish_reason"] in ("stop", "length"), body
    return body


def test_cluster_nodes_render_as_leaf_hubs(tmp_path: Path) -> None:
    """`--leaf-port` on a cluster node adds a leaf-node listener and the JetStream domain
    `hub` (edge sites dial any node); without it a cluster node has neither.
    `--leaf-no-advertise` keeps leaf nodes on their configured remotes. Routes use TLS
    (the `--tls-*` files unless `--cluster-tls-*` are given), verified at both ends; a
    cluster without it is refused. Each `--leaf-site` is a user bound to its edges."""
    if shutil.which("openssl") is None:
        pytest.skip("route TLS needs openssl")
    self_signed_tls(tmp_path / "tls")
    cert = host_certificate(tmp_path / "tls", "n2", ["n2"])
    assert cert.ca is not None
    args = ["--role", "cluster", "--routes", "n1,n2,n3", "--node-index", "2"]
    args += ["--store-dir", str(tmp_path / "js"), "--user", "e:pw:edge"]
    assert config_main([*args, "-o", str(tmp_path / "clear.conf")]) == 2  # no route TLS
    args += ["--tls-cert", str(cert.cert), "--tls-key", str(cert.key), "--tls-ca", str(cert.ca)]
    plain = render(tmp_path / "plain.conf", *args).read_text()
    assert "leafnodes" not in plain and "domain" not in plain
    route_tls = plain.split("cluster {")[1].split("routes:")[0]
    assert f'cert_file: "{cert.cert}"' in route_tls and "verify: true" in route_tls
    hub = render(
        tmp_path / "hub.conf", *args, "--leaf-port", "7422", "--leaf-no-advertise",
        "--leaf-site", "site1:pw1:site1-edge=edge-site1", "--leaf-site", "site2:pw2:edge-site2",
    ).read_text()  # fmt: skip
    assert 'domain: "hub"' in hub and "leafnodes {" in hub and "port: 7422" in hub
    assert "no_advertise: true" in hub and "authorization" not in hub.split("leafnodes {")[1]
    site1 = hub.split('user: "site1"')[1].split("}\n    }")[0]
    assert "hg.ctl.edge-site1.*" in site1 and "_INBOX_site1-edge.>" in site1
    assert "edge-site2" not in site1 and "allow_responses" not in site1
    assert "$JS.hub.API.INFO" in hub  # the edge user may reach the hub's domain
    for name in ("plain.conf", "hub.conf"):
        result = subprocess.run(
            [str(find_nats_server()), "-t", "-c", str(tmp_path / name)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr


@pytest.mark.slow
async def test_drill_cluster_leaves_edges_workers(
    tmp_path: Path, tiny_models: ModelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the drill's TLS needs openssl")
    tls = self_signed_tls(tmp_path / "tls", ["127.0.0.1"])
    assert tls.ca is not None

    def host_tls(name: str) -> list[str]:
        """Flags giving one host its own certificate: for its clients, its routes, and both
        ends of a leaf link (a hub verifies each leaf node's, a leaf node the hub's)."""
        cert = host_certificate(tmp_path / "tls", name, ["127.0.0.1", "localhost"])
        files = ["--tls-cert", str(cert.cert), "--tls-key", str(cert.key), "--tls-ca", str(tls.ca)]
        files += ["--leaf-tls-cert", str(cert.cert), "--leaf-tls-key", str(cert.key)]
        return [*files, "--leaf-tls-ca", str(tls.ca), "--leaf-tls-verify"]

    sites = [
        f"--leaf-site={login}:{password}:{user}={node}"
        for (login, password, user), node in zip(SITE_LOGINS, EDGES, strict=True)
    ]
    route_ports = [free_port() for _ in range(3)]
    routes = ",".join(f"127.0.0.1:{port}" for port in route_ports)
    users = [f"--user=cloud:{PASSWORDS['cloud']}:cloud", f"--user=api:{PASSWORDS['api']}:api"]
    users.append(f"--user=ops:{PASSWORDS['ops']}:operator")

    servers: list[NatsServer] = []
    clients: list[Client] = []
    stack = contextlib.AsyncExitStack()
    relay: Relay | None = None
    try:
        # -- the cloud: a 3-node cluster, each node a hub for leaf nodes ----------------
        for index in (1, 2, 3):
            conf = render(
                tmp_path / f"hg-{index}.conf",
                *("--role", "cluster", "--routes", routes, "--node-index", str(index)),
                *("--host", "127.0.0.1", "--port", "-1", "--leaf-port", "-1"),
                *("--store-dir", str(tmp_path / f"js-{index}")),
                *("--cluster-user", ROUTE[0], "--cluster-password", ROUTE[1]),
                *("--leaf-no-advertise", *sites),
                *host_tls(f"hg-{index}"),
                *users,
            )
            server = NatsServer(store_dir=tmp_path / f"hg-{index}", config_file=conf)
            servers.append(server)
            await server.start()
        hub = servers
        # Clients list every node; the operator and the API start on node 3.
        cluster_url = ",".join(tls_url(s) for s in (hub[2], hub[0], hub[1]))
        leaf_ports = [s.leafnode_port for s in hub]
        assert all(leaf_ports), "every cluster node listens for leaf nodes"

        async def login(url: str, user: str, name: str) -> Client:
            nc = await connect(
                url,
                name=name,
                user=user,
                password=PASSWORDS[user],
                tls=ssl_context,
                dont_randomize=True,
            )
            clients.append(nc)
            return nc

        ssl_context = ssl.create_default_context(cafile=str(tls.ca))
        # The edges read their env like any service: role user, CA, the hub's JS domain.
        monkeypatch.setenv("HG_NATS_PASSWORD", PASSWORDS["edge"])
        monkeypatch.setenv("HG_NATS_TLS_CA", str(tls.ca))
        monkeypatch.setenv("HG_NATS_JS_DOMAIN", "hub")

        ops = await login(cluster_url, "ops", "drill-ops")
        # Clustered JetStream elects its meta leader first: the fleet config then works.
        config: FleetConfig | None = None

        async def open_config() -> bool:
            nonlocal config
            with contextlib.suppress(Exception):
                config = await FleetConfig.open(ops)
                await config.put(subjects.policy_key(), FLEET_POLICY)
                return True
            return False

        await eventually(open_config, "the clustered fleet config (KV)")
        events: dict[str, list[wire.Event]] = defaultdict(list)

        async def on_event(msg: Any) -> None:
            event = wire.decode(msg.data, wire.Event)
            if event.kind == "request":
                events[event.node_id].append(event)

        await ops.subscribe(subjects.events_of_role("edge"), cb=on_event)

        # -- two edge sites: a leaf node each; site 2's link runs through a relay -------
        relay = Relay(int(leaf_ports[2] or 0))
        await relay.restore()
        leaves = []
        for site, remotes in ((1, leaf_ports[2:] + leaf_ports[:1]), (2, [relay.port])):
            site_login, password, edge_user = SITE_LOGINS[site - 1]
            conf = render(
                tmp_path / f"leaf-{site}.conf",
                *("--role", "leaf", "--host", "127.0.0.1", "--port", "-1"),
                *(f"--remote=tls://127.0.0.1:{port}" for port in remotes),
                *("--leaf-user", site_login, "--leaf-password", password),
                f"--user={edge_user}:{PASSWORDS['edge']}:edge:{EDGES[site - 1]}",
                *host_tls(f"leaf-{site}"),
            )
            leaf = NatsServer(store_dir=tmp_path / f"leaf-{site}", config_file=conf)
            servers.append(leaf)
            await leaf.start()
            leaves.append(leaf)

        # -- two workers on different cluster nodes (listing every node, theirs first) ---
        from cloud.settings import WorkerSettings
        from cloud.worker import CloudWorker

        worker_ncs: dict[str, Client] = {}
        for worker_id, node in zip(WORKERS, (0, 1), strict=True):
            urls = [tls_url(hub[node]), *(tls_url(s) for s in hub if s is not hub[node])]
            nc = worker_ncs[worker_id] = await login(",".join(urls), "cloud", worker_id)
            worker = CloudWorker(
                nc,
                WorkerSettings(
                    model_dir=tiny_models.cloud_dir,
                    node_id=worker_id,
                    threads=1,
                    cache_tokens=2048,
                    max_batch_tokens=256,
                ),
            )
            await worker.start()
            stack.push_async_callback(worker.close)

        # -- the cloud API, on the third node ------------------------------------------
        api_url = await stack.enter_async_context(
            cloud_api(await login(cluster_url, "api", "drill-api"))
        )

        # -- one edge per site ---------------------------------------------------------
        edges: list[LiveEdge] = []
        for site, leaf in enumerate(leaves):
            settings = EdgeSettings(
                model_dir=tiny_models.edge_dir("int4"),
                nats_url=tls_url(leaf),
                node_id=EDGES[site],
                threads=1,
                reconnect_s=0.2,
                policy={"breaker": {"failure_threshold": 1, "open_seconds": 0.3}},
            )
            # Each site's edge logs in to its leaf as its own user (read from the env once
            # connected, so the next edge's user is set after this one is on the bus).
            monkeypatch.setenv("HG_NATS_USER", SITE_LOGINS[site][2])
            edges.append(await stack.enter_async_context(serve_edge(settings)))
            await eventually(lambda: edges[-1].node.bus_connected, f"{EDGES[site]} on its leaf")
        await eventually(
            lambda: all(e.node.bus_connected and e.node.cloud_available() for e in edges),
            "both edges on the bus",
        )
        # Their fleet config comes from the hub's JetStream (domain `hub`) across the leaf.
        await eventually(
            lambda: all(e.node.routing_policy.request_timeout_ms == 60_000.0 for e in edges),
            "both edges applying the fleet policy from the hub's KV",
        )

        def served_by_both(edge_id: str, since: int = 0) -> bool:
            """Whether the edge's `request` events since `since` name both workers."""
            return {str(e.data.get("worker")) for e in events[edge_id][since:]} >= set(WORKERS)

        async def both_workers(edge: LiveEdge, since: int = 0) -> bool:
            body = await ask(edge)
            assert body["served_by"] in ("cloud", "edge"), body
            return served_by_both(edge.node_id, since)

        # 1. Requests from both edges reach both workers (across leaf links and routes).
        for edge in edges:
            await eventually(
                functools.partial(both_workers, edge), f"{edge.node_id} -> both workers"
            )
        await ask_api(api_url)

        # 2. Stop cluster node 1 (worker A's) under load: every request is answered.
        answered: list[dict[str, Any]] = []
        stop = asyncio.Event()

        async def load(edge: LiveEdge) -> None:
            while not stop.is_set():
                answered.append(await ask(edge))

        loaders = [asyncio.create_task(load(edge)) for edge in edges]
        try:
            await eventually(lambda: len(answered) >= 4, "load before the stop")
            await hub[0].shutdown()
            marks = {edge.node_id: len(events[edge.node_id]) for edge in edges}
            # Worker A reconnects to another node; both workers serve both edges again.
            for edge in edges:
                await eventually(
                    functools.partial(served_by_both, edge.node_id, marks[edge.node_id]),
                    f"{edge.node_id} -> both workers after node 1 stopped",
                )
        finally:
            stop.set()
            results = await asyncio.gather(*loaders, return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert len(answered) > 4
        moved = worker_ncs[WORKERS[0]]
        assert moved.is_connected and moved.connected_url is not None
        assert moved.connected_url.port != urlport(hub[0]), "worker A reconnected elsewhere"
        await ask_api(api_url)  # the API, on node 3, kept serving

        # 3. Site 2 loses its hub link: its edge answers locally, then recovers.
        await relay.cut()
        await eventually(
            lambda: _local(ask(edges[1])), "site 2 answering locally (cloud_unavailable)"
        )
        body = await ask(edges[0])  # site 1 is unaffected
        assert body["served_by"] == "cloud", body
        await relay.restore()
        await eventually(lambda: _cloud(ask(edges[1])), "site 2 back on the cloud")
    finally:
        await stack.aclose()
        if relay is not None:
            await relay.cut()
        for nc in clients:
            with contextlib.suppress(Exception):
                await nc.close()
        for server in reversed(servers):
            await server.shutdown()


def urlport(server: NatsServer) -> int | None:
    """The client port of a server."""
    return urlsplit(server.client_url).port


async def _local(answer: Any) -> bool:
    body = await answer
    return bool(body["served_by"] == "edge" and body["route_reason"] == "cloud_unavailable")


async def _cloud(answer: Any) -> bool:
    body = await answer
    return bool(body["served_by"] == "cloud")


# -- a compromised site ------------------------------------------------------------------------


class FakeLeaf:
    """A compromised site's leaf node, speaking the leaf-node protocol by hand with the
    site's own (valid) login: it ignores every permission the hub tells it, so only the
    hub's own checks stand between it and the other sites."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.messages: list[tuple[str, bytes]] = []
        self.errors: list[str] = []
        self.pongs = 0
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def login(cls, port: int, user: str, password: str) -> FakeLeaf:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"INFO ")
        hello = {"user": user, "pass": password, "headers": True, "protocol": 3,
                 "remote_account": "$G", "name": f"evil-{user}", "server_id": "EVIL"}  # fmt: skip
        writer.write(f"CONNECT {json.dumps(hello)}\r\n".encode())
        leaf = cls(reader, writer)
        await leaf.sync()
        return leaf

    async def _read(self) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while line := (await self.reader.readline()).rstrip(b"\r\n"):
                if line.startswith((b"LMSG ", b"HMSG ")):
                    parts = line.split()  # LMSG subject [reply] [header size] size
                    payload = await self.reader.readexactly(int(parts[-1]) + 2)
                    self.messages.append((parts[1].decode(), payload[:-2]))
                elif line == b"PING":
                    self.writer.write(b"PONG\r\n")
                elif line == b"PONG":
                    self.pongs += 1
                elif line.startswith(b"-ERR"):
                    self.errors.append(line.decode())

    async def send(self, *lines: str) -> None:
        self.writer.write("".join(f"{line}\r\n" for line in lines).encode())
        await self.writer.drain()

    async def sync(self) -> None:
        """PING and wait for the PONG: the hub has handled everything sent before."""
        pongs = self.pongs
        await self.send("PING")
        await eventually(lambda: self.pongs > pongs or self.task.done(), "the hub's PONG")
        assert self.pongs > pongs, f"the hub closed the link: {self.errors}"

    async def close(self) -> None:
        self.writer.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


SITES = {"site1": ("site1-pw", "site1-edge", "edge-site1"),
         "site2": ("site2-pw", "site2-edge", "edge-site2")}  # fmt: skip


async def echo(request: wire.GenerateRequest, responder: Responder) -> None:
    await responder.chunk(request.prompt or "")
    await responder.done("stop", wire.Usage(prompt_tokens=1, completion_tokens=1))


async def test_compromised_site_cannot_read_other_sites_or_steer_them(tmp_path: Path) -> None:
    """Each site logs in to the hub with its own credentials (`--leaf-site`), bound to its
    own edges. Site 2, compromised, dials the hub with its login and no leaf-side checks:
    it subscribes to every prompt (`hg.gen.>`, as a worker's queue group too), to site 1's
    and the operator's inboxes, to site 1's control and to `>`, and receives none of it;
    it publishes site 1's `drain` verb, site 1's heartbeat and the fleet policy, and the hub
    closes its link each time; site 1 is served and steered as before."""
    hub_args = ["--role", "hub", "--host", "127.0.0.1", "--port", "-1", "--leaf-port", "-1"]
    hub_args += ["--store-dir", str(tmp_path / "hub-js"), "--leaf-no-advertise"]
    hub_args += [
        f"--user=ops:{PASSWORDS['ops']}:operator",
        f"--user=cloud:{PASSWORDS['cloud']}:cloud",
    ]
    for site, (password, edge_user, node) in SITES.items():
        hub_args.append(f"--leaf-site={site}:{password}:{edge_user}={node}")
    hub = NatsServer(
        store_dir=tmp_path / "hub", config_file=render(tmp_path / "hub.conf", *hub_args)
    )
    servers, clients = [hub], []
    attackers: list[FakeLeaf] = []
    try:
        await hub.start()
        leaf_port = int(hub.leafnode_port or 0)
        password, edge_user, node = SITES["site1"]
        leaf = NatsServer(
            store_dir=tmp_path / "leaf-1",
            jetstream=False,
            config_file=render(
                tmp_path / "leaf-1.conf",
                *("--role", "leaf", "--host", "127.0.0.1", "--port", "-1"),
                f"--remote=nats-leaf://127.0.0.1:{leaf_port}",
                *("--leaf-user", "site1", "--leaf-password", password),
                f"--user={edge_user}:edge-pw:edge:{node}",
            ),
        )
        servers.append(leaf)
        await leaf.start()
        ops = await connect(hub.client_url, name="ops", user="ops", password=PASSWORDS["ops"])
        cloud = await connect(hub.client_url, name="w", user="cloud", password=PASSWORDS["cloud"])
        edge = await connect(leaf.client_url, name=node, user=edge_user, password="edge-pw")
        clients += [ops, cloud, edge]
        verbs: list[str] = []

        async def on_control(request: wire.ControlRequest) -> wire.ControlReply:
            verbs.append(request.verb)
            return wire.ControlReply(ok=True)

        handlers: dict[str, ControlHandler] = {"drain": on_control, "resume": on_control}
        control = await serve_control(edge, node_id=node, role="edge", handlers=handlers)
        service = GenerationService(cloud, model="hg-cloud", handler=echo, node_id="worker-1")
        await service.start()

        async def ask(prompt: str) -> tuple[str, wire.Done]:
            request = wire.GenerateRequest(
                request_id=wire.new_request_id(), model="hg-cloud", prompt=prompt
            )
            async with request_stream(edge, request) as stream:
                return await stream.collect()

        async def site1_served() -> bool:
            with contextlib.suppress(errors.NoResponders):
                return (await ask("warm up"))[0] == "warm up"
            return False

        await eventually(site1_served, "site 1 reaching the worker across its leaf link")
        assert (await send_control(ops, node, "resume")).ok  # the operator's reply crosses too

        # Site 2 joins the workers' queue group: the hub closes its link.
        thief = await FakeLeaf.login(leaf_port, "site2", SITES["site2"][0])
        attackers.append(thief)
        await thief.send(f"LS+ {subjects.gen('hg-cloud')} {subjects.queue_group('hg-cloud')} 1")
        await eventually(lambda: thief.task.done(), "the hub closing the link of a queue thief")
        assert any('Subscription to "hg.gen.hg-cloud"' in e for e in thief.errors), thief.errors
        # Site 2 listens for everything it may not see: the hub sends none of it.
        evil = await FakeLeaf.login(leaf_port, "site2", SITES["site2"][0])
        attackers.append(evil)
        stolen = ["hg.gen.>", "_INBOX_site1-edge.>", "_INBOX_ops.>", "hg.ctl.edge-site1.*",
                  "hg.telemetry.>", "$KV.>", ">", "hg.ctl.edge-site2.*"]  # fmt: skip
        await evil.send(*(f"LS+ {sub}" for sub in stolen))
        await evil.sync()
        text, done = await ask("the secret prompt of site one")
        assert (text, done.served_by) == ("the secret prompt of site one", "worker-1")
        # A marker site 2 may receive, sent after: whatever leaked would have come first.
        marker = subjects.control("edge-site2", "drain")
        await ops.publish(marker, b"marker")
        await eventually(lambda: evil.messages, "the marker at site 2")
        assert evil.messages == [(marker, b"marker")], evil.messages

        # Site 2 publishes as site 1 and as the operator: the hub closes its link.
        forbidden = [(subjects.control(node, "drain"), "_INBOX_site2-edge.x1"),
                     (subjects.telemetry("edge", node), ""),
                     (f"$KV.{subjects.CONFIG_BUCKET}.{subjects.policy_key()}", "")]  # fmt: skip
        for subject, reply in forbidden:
            liar = await FakeLeaf.login(leaf_port, "site2", SITES["site2"][0])
            attackers.append(liar)
            await liar.send(f"LMSG {subject} {reply} 4".replace("  ", " "), "evil")
            await eventually(liar.task.done, f"the hub closing site 2's link after {subject}")
            assert any(
                "Permissions Violation for Publish" in e and subject in e for e in liar.errors
            ), evil.errors
        assert (await send_control(ops, node, "resume")).ok
        assert verbs == ["resume", "resume"]  # site 2's drain never reached site 1
        assert (await ask("still served"))[0] == "still served"
        await control.stop()
        await service.close()
    finally:
        for attacker in attackers:
            await attacker.close()
        for nc in clients:
            with contextlib.suppress(Exception):
                await nc.close()
        for server in reversed(servers):
            await server.shutdown()
