"""The multi-machine drill, on loopback: a real NATS cluster with TLS and role users.

Layout (docs/deploy.md, on one machine): a 3-node cloud cluster whose nodes are also leaf
hubs (JetStream domain `hub`), two edge sites each with a leaf node and one edge, two cloud
workers on different cluster nodes, and the cloud API. Every server config is rendered by
`hybridgen broker config` (the CLI a deployer runs); every client logs in as its role's user
over TLS verified against a private CA.

The drill then checks that requests from both edges reach both workers, that stopping a
cluster node loses no request and its clients reconnect, and that a leaf cut off from the
hub keeps its edge answering locally (`cloud_unavailable`) until the link returns. Site 2's
link runs through a TCP relay in the test, so the link alone can be cut and restored (the
hubs do not advertise their other leaf URLs, `--leaf-no-advertise`, or the leaf node would
dial around the cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
import ssl
import subprocess
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from nats.aio.client import Client

from broker import subjects, wire
from broker.bus import connect
from broker.cli import config_main
from broker.config import self_signed_tls
from broker.server import NatsServer, find_nats_server, free_port
from broker.store import FleetConfig
from edge.settings import EdgeSettings
from models.registry import ModelSet
from tests.fixtures_edge import LiveEdge, serve_edge

PASSWORDS = {"cloud": "cloud-pw", "api": "api-pw", "ops": "ops-pw", "edge": "edge-pw"}
LEAF = ("leaf", "leaf-pw")
ROUTE = ("route", "route-pw")
EDGES = ("site1-edge", "site2-edge")
WORKERS = ("worker-a", "worker-b")
#: The fleet policy the operator writes to the hub's KV; the edges read it across their leaf.
FLEET_POLICY = {"request_timeout_ms": 60_000.0}
#: Upper bound of every wait in the drill (polling stops as soon as the condition holds).
WAIT_S = 30.0


async def until(check: Callable[[], Any], what: str, within: float = WAIT_S) -> None:
    """Poll `check` (sync or async) until true; fail naming `what` after `within` s."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"drill: {what} did not happen within {within:g} s")
        await asyncio.sleep(0.1)


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
        await until(lambda: server.started or task.done(), "the cloud API start")
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
    `--leaf-no-advertise` keeps leaf nodes on their configured remotes."""
    args = ["--role", "cluster", "--routes", "n1,n2,n3", "--node-index", "2"]
    args += ["--store-dir", str(tmp_path / "js"), "--user", "e:pw:edge"]
    plain = render(tmp_path / "plain.conf", *args).read_text()
    assert "leafnodes" not in plain and "domain" not in plain
    hub = render(
        tmp_path / "hub.conf", *args, "--leaf-port", "7422", "--leaf-user", "leaf",
        "--leaf-password", "pw", "--leaf-no-advertise",
    ).read_text()  # fmt: skip
    assert 'domain: "hub"' in hub and "leafnodes {" in hub and "port: 7422" in hub
    assert '"leaf"' in hub.split("leafnodes {")[1] and "no_advertise: true" in hub
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
    server_tls = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
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
                *("--leaf-user", LEAF[0], "--leaf-password", LEAF[1], "--leaf-no-advertise"),
                *("--leaf-tls-cert", str(tls.cert), "--leaf-tls-key", str(tls.key)),
                *server_tls,
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
        monkeypatch.setenv("HG_NATS_USER", "edge")
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

        await until(open_config, "the clustered fleet config (KV)")
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
            conf = render(
                tmp_path / f"leaf-{site}.conf",
                *("--role", "leaf", "--host", "127.0.0.1", "--port", "-1"),
                *(f"--remote=tls://127.0.0.1:{port}" for port in remotes),
                *("--leaf-user", LEAF[0], "--leaf-password", LEAF[1]),
                *("--leaf-tls-ca", str(tls.ca)),
                f"--user=edge:{PASSWORDS['edge']}:edge:{EDGES[site - 1]}",
                *server_tls,
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
            edges.append(await stack.enter_async_context(serve_edge(settings)))
        await until(
            lambda: all(e.node.bus_connected and e.node.cloud_available() for e in edges),
            "both edges on the bus",
        )
        # Their fleet config comes from the hub's JetStream (domain `hub`) across the leaf.
        await until(
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
            await until(functools.partial(both_workers, edge), f"{edge.node_id} -> both workers")
        await ask_api(api_url)

        # 2. Stop cluster node 1 (worker A's) under load: every request is answered.
        answered: list[dict[str, Any]] = []
        stop = asyncio.Event()

        async def load(edge: LiveEdge) -> None:
            while not stop.is_set():
                answered.append(await ask(edge))

        loaders = [asyncio.create_task(load(edge)) for edge in edges]
        try:
            await until(lambda: len(answered) >= 4, "load before the stop")
            await hub[0].shutdown()
            marks = {edge.node_id: len(events[edge.node_id]) for edge in edges}
            # Worker A reconnects to another node; both workers serve both edges again.
            for edge in edges:
                await until(
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
        await until(lambda: _local(ask(edges[1])), "site 2 answering locally (cloud_unavailable)")
        body = await ask(edges[0])  # site 1 is unaffected
        assert body["served_by"] == "cloud", body
        await relay.restore()
        await until(lambda: _cloud(ask(edges[1])), "site 2 back on the cloud")
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
