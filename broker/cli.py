"""`hybridgen broker`: run a nats-server in the foreground, or print a deployment config.

hybridgen broker [--host H] [--port P] [--store-dir DIR] [--config FILE]
hybridgen broker config --role standalone|hub|leaf|cluster [...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from broker.config import ServerConfig, TLSFiles, User, render, write_secret
from broker.errors import HybridgenError
from broker.server import NatsServer
from broker.settings import hg_home
from broker.sites import LeafSite

log = logging.getLogger(__name__)


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen broker",
        description="Run a nats-server (JetStream on) in the foreground until Ctrl-C/SIGTERM. "
        "`hybridgen broker config --help` prints deployment configs instead.",
    )
    parser.add_argument(
        "--host", default=None, help="listen address (default 127.0.0.1, or the config's)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="client port; -1 picks a free one (default 4222)"
    )
    parser.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="JetStream store and log directory (default $HG_HOME/nats)",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="a nats-server config file; flags override it"
    )
    parser.add_argument("--http-port", type=int, default=None, help="monitoring port (/healthz)")
    parser.add_argument("--no-jetstream", action="store_true", help="run without JetStream")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridgen broker config",
        description="Print a nats-server config file for a deployment. Roles: standalone (one "
        "server), hub (cloud side, with a leaf-node listener), leaf (an edge site, dialing the "
        "hub), cluster (one node of a 3+ node cloud cluster; run once per node with "
        "--node-index). Check a file with `nats-server -t -c FILE`.",
    )
    add = parser.add_argument
    add("--role", required=True, choices=["standalone", "hub", "leaf", "cluster"])
    add("--name", help="server_name (default: none; hg-<index> for cluster nodes)")
    add("--host", default="0.0.0.0", help="client listen address (default 0.0.0.0)")
    add("--port", type=int, default=4222, help="client port (default 4222)")
    add("--http-port", type=int, default=None, help="monitoring port (default off)")
    add(
        "--store-dir",
        type=Path,
        default=None,
        help="JetStream store (default $HG_HOME/nats; leaf: JetStream off unless given)",
    )
    add("--max-payload", type=int, default=None, help="largest message in bytes")
    add(
        "--user",
        action="append",
        default=[],
        metavar="NAME:PASSWORD:ROLE[:NODE_ID]",
        help="a client user; ROLE is edge, cloud, api or operator; NODE_ID limits it to one "
        "node's telemetry/events/control subjects (repeat the flag)",
    )
    add("--tls-cert", type=Path, help="server certificate (PEM) for clients")
    add("--tls-key", type=Path, help="its private key")
    add("--tls-ca", type=Path, help="CA bundle to verify peers")
    add("--tls-verify", action="store_true", help="require client certificates")
    add(
        "--leaf-port",
        type=int,
        default=None,
        help="hub: leaf-node listener port (default 7422); cluster: give one to make every "
        "node a hub that edge sites' leaf nodes dial (default none)",
    )
    add(
        "--leaf-no-advertise",
        action="store_true",
        help="hub/cluster: do not tell leaf nodes the other nodes' leaf URLs (they dial "
        "only their --remote URLs; for hubs behind NAT or a load balancer)",
    )
    add(
        "--leaf-site",
        action="append",
        default=[],
        metavar="NAME:PASSWORD:EDGE_USER=NODE_ID[,EDGE_USER=NODE_ID...]",
        help="hub/cluster: an edge site's own login (its leaf node's --leaf-user and "
        "--leaf-password), allowed only what its edges (each its user on the site's leaf "
        "node and its node id) may send and receive; repeat per site. Instead of --leaf-user",
    )
    add(
        "--leaf-user",
        help="leaf: the site's login on the hub (its --leaf-site NAME); hub: one login "
        "shared by every site, with no permissions (prefer --leaf-site)",
    )
    add("--leaf-password", help="password of --leaf-user")
    add(
        "--leaf-tls-cert",
        type=Path,
        help="hub: leaf listener certificate; leaf: the certificate it shows the hub "
        "(with --leaf-tls-verify)",
    )
    add("--leaf-tls-key", type=Path, help="its key")
    add(
        "--leaf-tls-ca",
        type=Path,
        help="leaf: CA that signed the hub's certificate; hub: CA that signed the leaf "
        "nodes' (with --leaf-tls-verify)",
    )
    add(
        "--leaf-tls-verify",
        action="store_true",
        help="hub: leaf nodes must show a certificate signed by --leaf-tls-ca; leaf: show "
        "--leaf-tls-cert to the hub (each site its own certificate, besides its login)",
    )
    add(
        "--remote",
        action="append",
        default=[],
        metavar="URL",
        help="leaf: the hub's leaf-node URL, e.g. nats-leaf://hub.example.com:7422 or "
        "tls://hub.example.com:7422 (repeat for several hub nodes)",
    )
    add(
        "--js-domain",
        default=None,
        help="JetStream domain (default 'hub' for hub and leaf roles, and for cluster "
        "nodes with --leaf-port): leaf clients reach "
        "the hub's JetStream with HG_NATS_JS_DOMAIN=<domain>",
    )
    add("--cluster-name", default="hybridgen", help="cluster name (default hybridgen)")
    add("--cluster-port", type=int, default=6222, help="route port (default 6222)")
    add(
        "--routes",
        default="",
        help="cluster: every node's host[:port], comma-separated, in node order",
    )
    add("--node-index", type=int, default=None, help="cluster: this node's 1-based index")
    add("--cluster-user", help="route authentication user")
    add("--cluster-password", help="route authentication password")
    add(
        "--cluster-tls-cert",
        type=Path,
        help="cluster: this node's certificate for its routes, good for serverAuth and "
        "clientAuth (default: --tls-cert)",
    )
    add("--cluster-tls-key", type=Path, help="its key (default: --tls-key)")
    add(
        "--cluster-tls-ca",
        type=Path,
        help="the CA that signed every node's certificate (default: --tls-ca); both ends "
        "of a route are verified",
    )
    add(
        "--cluster-insecure",
        action="store_true",
        help="cluster: routes in clear, carrying prompts and credentials (only on a private "
        "network you trust)",
    )
    add(
        "-o",
        "--output",
        type=Path,
        help="write to this file (mode 0600: it holds passwords) instead of stdout",
    )
    return parser


def _tls(cert: Path | None, key: Path | None, ca: Path | None, verify: bool) -> TLSFiles | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both a certificate and a key")
    return TLSFiles(cert=cert, key=key, ca=ca, verify=verify)


def _cluster_tls(args: argparse.Namespace) -> TLSFiles | None:
    """The routes' TLS: the `--cluster-tls-*` files, each defaulting to its `--tls-*`."""
    cert = args.cluster_tls_cert or args.tls_cert
    key = args.cluster_tls_key or args.tls_key
    if cert is None and key is None:
        return None
    tls = _tls(cert, key, args.cluster_tls_ca or args.tls_ca, True)
    if tls is not None and tls.ca is None:
        raise ValueError("route TLS needs --cluster-tls-ca (or --tls-ca): both ends verify")
    return tls


def build_config(args: argparse.Namespace) -> str:
    """The config text the `config` sub-command prints for parsed `args`."""
    users = [User.parse(spec) for spec in args.user]
    sites = [LeafSite.parse(spec) for spec in args.leaf_site]
    store_dir = args.store_dir
    if store_dir is None and args.role != "leaf":
        store_dir = hg_home() / "nats"
    js_domain = args.js_domain
    # A cluster with a leaf-node listener is the hub of its edge sites.
    if js_domain is None and (
        args.role in ("hub", "leaf") or (args.role == "cluster" and args.leaf_port is not None)
    ):
        js_domain = "hub"
    leaf_tls = _tls(args.leaf_tls_cert, args.leaf_tls_key, args.leaf_tls_ca, args.leaf_tls_verify)
    if args.leaf_tls_verify and (leaf_tls is None or leaf_tls.ca is None):
        raise ValueError(
            "--leaf-tls-verify needs --leaf-tls-cert, --leaf-tls-key and --leaf-tls-ca"
        )
    if leaf_tls is None and args.leaf_tls_ca is not None:
        # A leaf only needs the CA to verify the hub.
        leaf_tls = TLSFiles(cert=Path(), key=Path(), ca=args.leaf_tls_ca)
    common = {
        "host": args.host,
        "http_port": args.http_port,
        "max_payload": args.max_payload,
        "users": users,
        "tls": _tls(args.tls_cert, args.tls_key, args.tls_ca, args.tls_verify),
        "js_domain": js_domain if store_dir is not None or args.role == "leaf" else None,
        "cluster_name": args.cluster_name,
        "cluster_user": args.cluster_user,
        "cluster_password": args.cluster_password,
        "leaf_sites": sites,
    }
    if args.role == "cluster":
        hosts = [h.strip() for h in args.routes.split(",") if h.strip()]
        if len(hosts) < 3:
            raise ValueError("--routes needs every node of the cluster (at least 3)")
        if args.node_index is None or not 1 <= args.node_index <= len(hosts):
            raise ValueError(f"--node-index must be 1..{len(hosts)}")
        if _cluster_tls(args) is None and not args.cluster_insecure:
            raise ValueError(
                "routes carry prompts and credentials: give them TLS with --tls-cert, "
                "--tls-key and --tls-ca (or --cluster-tls-*), or pass --cluster-insecure"
            )
        routes, own_port = [], args.cluster_port
        for index, host in enumerate(hosts, start=1):
            name, _, port = host.partition(":")
            routes.append(f"nats-route://{name}:{port or args.cluster_port}")
            if index == args.node_index and port:
                own_port = int(port)
        return render(
            ServerConfig(
                topology="cluster",
                cluster_tls=_cluster_tls(args),
                cluster_insecure=args.cluster_insecure,
                name=args.name or f"hg-{args.node_index}",
                port=args.port,
                store_dir=store_dir,
                cluster_port=own_port,
                routes=routes,
                leaf_port=args.leaf_port,
                leaf_user=args.leaf_user,
                leaf_password=args.leaf_password,
                leaf_advertise=not args.leaf_no_advertise,
                leaf_tls=leaf_tls,
                **common,  # type: ignore[arg-type]
            )
        )
    return render(
        ServerConfig(
            topology=args.role,
            name=args.name,
            port=args.port,
            store_dir=store_dir,
            leaf_port=args.leaf_port,
            leaf_user=args.leaf_user,
            leaf_password=args.leaf_password,
            leaf_advertise=not args.leaf_no_advertise,
            leaf_tls=leaf_tls,
            remotes=args.remote,
            cluster_port=args.cluster_port,
            **common,  # type: ignore[arg-type]
        )
    )


def config_main(argv: list[str]) -> int:
    """`hybridgen broker config ...`."""
    args = _config_parser().parse_args(argv)
    try:
        text = build_config(args)
    except ValueError as exc:
        print(f"hybridgen broker config: {exc}", file=sys.stderr)
        return 2
    if args.output:
        try:
            write_secret(args.output, text, private_folder=False)
        except OSError as exc:
            print(f"hybridgen broker config: cannot write {args.output}: {exc}", file=sys.stderr)
            return 2
        print(
            f"wrote {args.output}; check it with: nats-server -t -c {args.output}", file=sys.stderr
        )
    else:
        sys.stdout.write(text)
    return 0


class StopSignals:
    """SIGINT/SIGTERM set an event instead of raising, from creation until `close()`.

    Install it before announcing readiness, so a signal that comes right after is not
    lost to Python's default handler.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._installed: list[signal.Signals] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(sig, self.event.set)
                self._installed.append(sig)

    async def wait(self, *extra: asyncio.Future[Any]) -> None:
        """Wait for a signal, or for any of `extra` to finish."""
        waiter = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait({waiter, *extra}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    def close(self) -> None:
        for sig in self._installed:
            self._loop.remove_signal_handler(sig)
        self._installed.clear()


async def _run(args: argparse.Namespace) -> int:
    has_config = args.config is not None
    host = args.host if args.host is not None else (None if has_config else "127.0.0.1")
    port = args.port if args.port is not None else (None if has_config else 4222)
    extra = ["-m", str(args.http_port)] if args.http_port is not None else []
    server = NatsServer(
        store_dir=args.store_dir or hg_home() / "nats",
        host=host,
        port=port,
        config_file=args.config,
        jetstream=not args.no_jetstream,
        extra_args=extra,
    )
    signals = StopSignals()
    try:
        await server.start()
    except HybridgenError as exc:
        signals.close()
        print(f"hybridgen broker: {exc.message}", file=sys.stderr)
        return 1
    try:
        print(f"nats-server serving at {server.client_url}", flush=True)
        print(f"  store {server.store_dir}   log {server.log_path}", flush=True)
        print("  Ctrl-C stops it.", flush=True)
        exited = asyncio.ensure_future(server.wait())
        await signals.wait(exited)
        if exited.done():
            print(
                f"hybridgen broker: nats-server exited ({exited.result()}): {server.fatal_lines()}",
                file=sys.stderr,
            )
            return 1
        exited.cancel()
        return 0
    finally:
        await server.shutdown()
        signals.close()
        print("nats-server stopped", flush=True)


def main(argv: list[str]) -> int:
    """`hybridgen broker`: run a server, or `config` to print a deployment config."""
    if argv and argv[0] == "config":
        return config_main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = _run_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(_run(args))
