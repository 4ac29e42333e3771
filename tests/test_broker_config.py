"""Rendered configs: accepted by nats-server, leaf-to-hub routing, per-role permissions."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client

from broker import errors, subjects, wire
from broker.bus import GenerationService, Responder, connect
from broker.cli import config_main
from broker.config import ServerConfig, TLSFiles, User, render, self_signed_tls
from broker.server import NatsServer, find_nats_server, free_port
from broker.sites import LeafSite, leaf_site_permissions
from broker.store import ArtifactStore, FleetConfig
from broker.streaming import request_stream
from broker.tls import host_certificate
from tests.waits import BOUND_S, eventually

MODEL = "hg-cloud"
SITES = [
    LeafSite("site1", "site1-pw", (("site1-edge", "edge-s1"),)),
    LeafSite("site2", "site2-pw", (("site2-edge", "edge-s2"), ("site2-kiosk", "kiosk-s2"))),
]
USERS = [
    User("edge1", "edge-pw", "edge", node_id="edge-1"),
    User("cloud1", "cloud-pw", "cloud"),
    User("api", "api-pw", "api"),
    User("ops", "ops-pw", "operator"),
]


def cluster_texts(hosts: list[str], **common: Any) -> list[str]:
    """Each node's config of a cluster on `hosts`, routes to every node on port 6222, as
    `hybridgen broker config --role cluster --routes ... --node-index i` renders it."""
    routes = [f"nats-route://{host}:6222" for host in hosts]
    return [
        render(ServerConfig(topology="cluster", name=f"hg-{index}", routes=routes, **common))
        for index in range(1, len(hosts) + 1)
    ]


def check_config(path: Path) -> None:
    result = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, (path.read_text(), result.stdout, result.stderr)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    folder = tmp_path_factory.mktemp("certs")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return TLSFiles(cert=folder / "cert.pem", key=folder / "key.pem", ca=folder / "cert.pem")


def test_every_topology_passes_nats_server_check(tmp_path: Path, certs: TLSFiles) -> None:
    configs = {
        "standalone": ServerConfig(
            store_dir=tmp_path / "s", users=USERS, tls=certs, http_port=8222
        ),
        "hub": ServerConfig(
            topology="hub",
            store_dir=tmp_path / "h",
            users=USERS,
            leaf_user="leaf",
            leaf_password="leaf-pw",
            leaf_tls=certs,
        ),
        "hub-sites": ServerConfig(
            topology="hub",
            store_dir=tmp_path / "hs",
            js_domain="hub",
            users=USERS,
            leaf_sites=SITES,
            leaf_tls=certs,
        ),
        "leaf": ServerConfig(
            topology="leaf",
            users=USERS[:1],
            remotes=["tls://hub.example.com:7422"],
            leaf_user="leaf",
            leaf_password="leaf-pw",
            leaf_tls=TLSFiles(cert=certs.cert, key=certs.key, ca=certs.ca),
        ),
    }
    for name, config in configs.items():
        path = tmp_path / f"{name}.conf"
        path.write_text(render(config))
        check_config(path)
    texts = cluster_texts(
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        store_dir=tmp_path / "c",
        users=USERS,
        cluster_user="route",
        cluster_password="route-pw",
        cluster_tls=certs,
        leaf_port=7422,
        leaf_sites=SITES,
    )
    assert len(texts) == 3 and 'server_name: "hg-3"' in texts[2]
    for index, text in enumerate(texts):
        path = tmp_path / f"cluster-{index}.conf"
        path.write_text(text)
        check_config(path)


def test_render_refuses_inconsistent_configs() -> None:
    with pytest.raises(ValueError, match="remote"):
        render(ServerConfig(topology="leaf"))
    with pytest.raises(ValueError, match="route URLs"):
        render(ServerConfig(topology="cluster"))
    routes = ["nats-route://n1:6222", "nats-route://n2:6222"]
    with pytest.raises(ValueError, match="cluster routes carry prompts"):
        render(ServerConfig(topology="cluster", routes=routes))
    no_ca = TLSFiles(Path("c.pem"), Path("k.pem"))
    with pytest.raises(ValueError, match="CA"):
        render(ServerConfig(topology="cluster", routes=routes, cluster_tls=no_ca))
    hub = {"topology": "hub", "users": USERS}
    for sites, match in (
        ([SITES[0], LeafSite("site3", "pw", (("site1-edge", "edge-s3"),))], "edge user"),
        ([SITES[0], LeafSite("site3", "pw", (("e3", "edge-s1"),))], "node id"),
        ([SITES[0], LeafSite("ops", "pw", (("e3", "edge-s3"),))], "login ops"),
        ([LeafSite("site3", "pw", (("api", "edge-s3"),))], "edge user api"),
        ([LeafSite("site3", "pw", (("e3", "edge-s3\n"),))], "not a valid subject token"),
    ):
        with pytest.raises(ValueError, match=match):
            render(ServerConfig(**hub, leaf_sites=sites))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="either one leaf login"):
        render(ServerConfig(**hub, leaf_sites=SITES, leaf_user="leaf"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on a hub"):
        render(ServerConfig(topology="leaf", remotes=["nats-leaf://h"], leaf_sites=SITES))
    with pytest.raises(ValueError, match="EDGE_USER=NODE_ID"):
        LeafSite.parse("site1:pw")
    assert LeafSite.parse("s:pw:e1=n1,n2") == LeafSite("s", "pw", (("e1", "n1"), ("n2", "n2")))
    with pytest.raises(ValueError, match="role"):
        User.parse("a:b:wizard")
    assert User.parse("e:pw:edge:edge-7") == User("e", "pw", "edge", "edge-7")


async def echo(request: wire.GenerateRequest, responder: Responder) -> None:
    for word in (request.prompt or "").split():
        await responder.chunk(word)
    await responder.done("stop", wire.Usage(prompt_tokens=1, completion_tokens=1))


async def test_leaf_client_reaches_hub_responder(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    hub_conf = tmp_path / "hub.conf"
    hub_conf.write_text(
        render(ServerConfig(topology="hub", host="127.0.0.1", port=-1, leaf_port=-1,
                            store_dir=tmp_path / "hub-store", leaf_user="leaf", js_domain="hub",
                            leaf_password="pw"))
    )  # fmt: skip
    hub: NatsServer = await start_nats("hub", config_file=hub_conf)
    assert hub.leafnode_port
    leaf_conf = tmp_path / "leaf.conf"
    leaf_conf.write_text(
        render(ServerConfig(topology="leaf", host="127.0.0.1", port=-1,
                            remotes=[f"nats-leaf://127.0.0.1:{hub.leafnode_port}"],
                            leaf_user="leaf", leaf_password="pw"))
    )  # fmt: skip
    leaf: NatsServer = await start_nats("leaf", config_file=leaf_conf, jetstream=False)
    worker = await connect(hub.client_url, name="hub-worker")
    client = await connect(leaf.client_url, name="leaf-client")
    try:
        async with GenerationService(worker, model=MODEL, handler=echo, node_id="cloud-hub"):

            async def across_the_leaf() -> tuple[str, wire.Done] | None:
                # The leaf link and the interest take a moment to propagate.
                request = wire.GenerateRequest(
                    request_id=wire.new_request_id(), model=MODEL, prompt="via the leaf"
                )
                try:
                    async with request_stream(
                        client, request, accept_timeout=BOUND_S, idle_timeout=BOUND_S
                    ) as stream:
                        return await stream.collect()
                except errors.NoResponders:
                    return None

            text, done = await eventually(across_the_leaf, "a request served across the leaf")
        assert (text, done.served_by) == ("viatheleaf", "cloud-hub")
        # JetStream lives on the hub (domain "hub"); the leaf's clients read it across the
        # link: config gets and watches, artifact pulls.
        await (await FleetConfig.open(worker)).put("policy.default", {"x": 1})
        await (await ArtifactStore.open(worker)).put_bytes("blob", b"y" * 300_000)
        config = await FleetConfig.open(client, domain="hub")
        assert await config.get("policy.default") == {"x": 1}
        async for key, value in config.watch("policy.default"):
            assert (key, value) == ("policy.default", {"x": 1})
            break
        store = await ArtifactStore.open(client, domain="hub")
        assert await store.get_bytes("blob") == b"y" * 300_000
    finally:
        await client.close()
        await worker.close()


@pytest.fixture
async def secured(tmp_path: Path, start_nats) -> NatsServer:  # type: ignore[no-untyped-def]
    conf = tmp_path / "secure.conf"
    conf.write_text(
        render(ServerConfig(host="127.0.0.1", port=-1, users=USERS, store_dir=tmp_path / "js"))
    )
    server: NatsServer = await start_nats("secure", config_file=conf)
    return server


async def connect_as(url: str, user: str, password: str, seen: list[Exception]) -> Client:
    async def on_error(exc: Exception) -> None:
        seen.append(exc)

    return await connect(url, name=user, user=user, password=password, error_cb=on_error)


async def wait_for_violation(seen: list[Exception], fragment: str) -> str:
    def violation() -> str | None:
        for exc in seen:
            if "permissions violation" in str(exc).lower() and fragment.lower() in str(exc).lower():
                return str(exc)
        return None

    found: str = await eventually(violation, f"a permissions violation for {fragment!r}")
    return found


async def test_role_permissions(secured: NatsServer) -> None:
    url = secured.client_url
    seen: list[Exception] = []
    ops = await connect_as(url, "ops", "ops-pw", seen)
    cloud = await connect_as(url, "cloud1", "cloud-pw", seen)
    edge = await connect_as(url, "edge1", "edge-pw", seen)
    try:
        # Operator manages the buckets; the edge reads them.
        config = await FleetConfig.open(ops)
        await config.put("policy.default", {"threshold": 2})
        store = await ArtifactStore.open(ops)
        await store.put_bytes("m/manifest.json", b"{}" * 100_000)

        async with GenerationService(cloud, model=MODEL, handler=echo, node_id="cloud-a"):
            # The edge streams from the cloud worker (many replies on one inbox).
            request = wire.GenerateRequest(
                request_id=wire.new_request_id(), model=MODEL, prompt="a b c d e f g h"
            )
            async with request_stream(
                edge, request, accept_timeout=BOUND_S, idle_timeout=BOUND_S
            ) as stream:
                text, _ = await stream.collect()
            assert text == "abcdefgh"

            # A cloud worker may not send generation requests.
            await cloud.publish(subjects.gen(MODEL), b"")
            message = await wait_for_violation(seen, "hg.gen.hg-cloud")
            assert "publish" in message.lower()
            # An edge may not serve generation.
            await edge.subscribe(subjects.GEN_ALL)
            await wait_for_violation(seen, "hg.gen.>")
            # Nor read replies meant for others: only its own inboxes.
            await edge.subscribe("_INBOX.>")
            await wait_for_violation(seen, "_INBOX.>")
            await edge.subscribe("_INBOX_api.>")
            await wait_for_violation(seen, "_INBOX_api.>")
            # An edge may not publish another node's telemetry.
            await edge.publish(subjects.telemetry("edge", "edge-2"), b"")
            await wait_for_violation(seen, "hg.telemetry.edge.edge-2")

        edge_config = await FleetConfig.open(edge)
        assert await edge_config.get("policy.default") == {"threshold": 2}
        edge_store = await ArtifactStore.open(edge)
        assert await edge_store.get_bytes("m/manifest.json") == b"{}" * 100_000
    finally:
        for client in (edge, cloud, ops):
            await client.close()


async def test_bad_credentials_unauthorized(secured: NatsServer) -> None:
    """A refused login fails the connect on the server's refusal: a connect that waited for
    its connect timeout (one no test waits out) would hit the test's bound instead."""
    with pytest.raises(errors.HybridgenError) as info:
        async with asyncio.timeout(BOUND_S):
            await connect(
                secured.client_url,
                name="x",
                user="edge1",
                password="wrong",
                connect_timeout=10 * BOUND_S,
            )
    assert type(info.value) is errors.Unauthorized
    assert info.value.message == (
        f"NATS {secured.client_url}: authorization refused for user 'edge1' — run "
        "`hybridgen context use NAME` (see `hybridgen context list`) or set "
        "HG_NATS_USER/HG_NATS_PASSWORD_FILE"
    )


async def test_tls_client_connects(tmp_path: Path, certs: TLSFiles, start_nats) -> None:  # type: ignore[no-untyped-def]
    conf = tmp_path / "tls.conf"
    conf.write_text(render(ServerConfig(host="127.0.0.1", port=-1, tls=certs)))
    server: NatsServer = await start_nats("tls", config_file=conf, jetstream=False)
    url = server.client_url.replace("nats://", "tls://")
    context = ssl.create_default_context(cafile=str(certs.ca))
    client = await connect(url, name="tls-client", tls=context)
    try:
        sub = await client.subscribe("hg.test")
        await client.publish("hg.test", b"over tls")
        assert (await sub.next_msg(timeout=BOUND_S)).data == b"over tls"
    finally:
        await client.close()
    # Without trusting the CA the connection is refused, fast.
    with pytest.raises(errors.Unavailable):
        await connect(url, name="untrusting", tls=ssl.create_default_context())


def test_cluster_routes_render_with_verified_tls(certs: TLSFiles) -> None:
    """Every rendered cluster node's routes use TLS with the CA and `verify: true`; only an
    explicit `cluster_insecure` renders them in clear."""
    texts = cluster_texts(["n1", "n2", "n3"], cluster_tls=certs)
    for text in texts:
        cluster = text.split("cluster {", 1)[1]
        tls = cluster.split("tls {", 1)[1].split("}", 1)[0]
        assert f'cert_file: "{certs.cert}"' in tls and f'ca_file: "{certs.ca}"' in tls
        assert "verify: true" in tls
    insecure = cluster_texts(["n1", "n2", "n3"], cluster_insecure=True)
    assert "tls {" not in insecure[0]


def test_leaf_site_permissions_are_its_own_edges() -> None:
    perms = leaf_site_permissions(SITES[1], "hub", requesters=["ops"])
    assert set(perms.subscribe) >= {
        "_INBOX_site2-edge.>", "_INBOX_site2-kiosk.>", "hg.ctl.edge-s2.*", "hg.ctl.kiosk-s2.*"
    }  # fmt: skip
    assert not perms.allow_responses
    assert "hg.gen.>" in perms.publish and "_INBOX_ops.>" in perms.publish
    assert "hg.telemetry.edge.edge-s2" in perms.publish
    assert "$JS.hub.API.DIRECT.GET.KV_hg_config" in perms.publish
    # Nothing of site 1, of another user's inbox, of every prompt, or of the buckets.
    everything = " ".join(perms.publish + perms.subscribe)
    assert "edge-s1" not in everything and "_INBOX_api" not in everything
    assert "hg.gen.>" not in perms.subscribe and "hg.ctl.>" not in everything
    assert not any(p.startswith(("$KV.", "$O.", "$JS.API.>")) for p in perms.publish)


def test_config_output_is_owner_only(tmp_path: Path) -> None:
    """`hybridgen broker config -o FILE` holds passwords: the file is 0600 from its first
    byte, also when it replaces a world-readable one; an existing folder keeps its mode."""
    out = tmp_path / "nats.conf"
    out.write_text("old")
    out.chmod(0o644)
    tmp_path.chmod(0o755)
    assert config_main(["--role", "standalone", "--user", "e:secret-pw:edge", "-o", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600 and "secret-pw" in out.read_text()
    assert tmp_path.stat().st_mode & 0o777 == 0o755
    fresh = tmp_path / "new" / "nats.conf"
    assert config_main(["--role", "standalone", "-o", str(fresh)]) == 0
    assert fresh.stat().st_mode & 0o777 == 0o600 and fresh.parent.stat().st_mode & 0o777 == 0o700


async def test_cluster_routes_run_over_verified_tls(tmp_path: Path, start_nats) -> None:  # type: ignore[no-untyped-def]
    """Two nodes, each with its own certificate from one CA, route over TLS; a third node
    whose certificate another CA signed is refused by both (`verify: true`)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    self_signed_tls(tmp_path / "ca")
    self_signed_tls(tmp_path / "rogue-ca")
    ports = [free_port(), free_port()]
    routes = [f"nats-route://127.0.0.1:{port}" for port in ports]

    async def node(name: str, port: int, ca: Path) -> NatsServer:
        conf = tmp_path / f"{name}.conf"
        tls = host_certificate(ca, name, ["127.0.0.1"])
        conf.write_text(
            render(ServerConfig(topology="cluster", name=name, host="127.0.0.1", port=-1,
                                cluster_host="127.0.0.1", cluster_port=port, routes=routes,
                                cluster_user="route", cluster_password="pw", cluster_tls=tls))
        )  # fmt: skip
        server: NatsServer = await start_nats(name, config_file=conf, jetstream=False)
        return server

    one, two = [await node(f"n{i}", port, tmp_path / "ca") for i, port in enumerate(ports)]
    a = await connect(one.client_url, name="a")
    b = await connect(two.client_url, name="b")
    try:
        sub = await a.subscribe("hg.test")

        async def carried() -> bytes | None:
            # The routes take a moment to form and carry the interest: publish until one
            # arrives (a try that finds none ends on its short wait and publishes again).
            await b.publish("hg.test", b"across the route")
            try:
                return (await sub.next_msg(timeout=0.2)).data
            except nats.errors.TimeoutError:
                return None

        assert await eventually(carried, "a message across the route") == b"across the route"
        await node("rogue", free_port(), tmp_path / "rogue-ca")
        await eventually(
            lambda: "TLS route handshake error" in one.log_text() + two.log_text(),
            "the rogue node's route refused",
        )
    finally:
        await a.close()
        await b.close()
