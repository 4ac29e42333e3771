"""The services `hybridgen up` runs by default, their drain bounds, and the console.

Cloud workers, the cloud API, then the edges, each with its own node id and bus role; the
operator console in the foreground when there is a terminal. The edges share the install's
admin key for users' data, and the cloud API has its own admin key for its usage (secret
files, passed in their environment).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from broker.config import ensure_password, ensure_secrets_dir
from broker.telemetry import default_node_id
from hybridgen.up.bus import OPERATOR_USER
from hybridgen.up.spec import ChildSpec, http_ready

#: Seconds the edge's HTTP server lets open requests finish on SIGTERM (`--drain-timeout-s`).
EDGE_DRAIN_S = 10.0
#: Seconds the cloud API lets open requests finish on SIGTERM (`--drain-timeout-s`).
API_DRAIN_S = 10.0
#: Seconds a cloud worker lets in-flight requests finish on SIGTERM (`--drain-timeout-s`).
WORKER_DRAIN_S = 30.0
#: Each child's SIGKILL comes this many seconds after its drain bound.
STOP_MARGIN_S = 10.0
#: The install's admin key of the edges' users (`KEY@*`), a file in the secrets folder.
EDGE_ADMIN_KEY = "edge-admin.key"
#: The install's admin key of the cloud API (`KEY@*`: it reads `/v1/usage`), a file there too.
CLOUD_ADMIN_KEY = "cloud-admin.key"


def default_children(args: argparse.Namespace) -> list[ChildSpec]:
    """The processes `hybridgen up` runs next to the broker, in start order.

    `args.workers` cloud workers, the cloud API, then `args.edges` edges (edge `i` on
    `args.edge_port + i`); every worker and edge has its own node id, kept across restarts.
    The cloud API is ready only once a worker answers it, so the edges start after the whole
    cloud path serves; an edge is ready once its model is loaded.
    """
    workers, edges = getattr(args, "workers", 1), getattr(args, "edges", 1)
    drain = getattr(args, "drain_timeout_s", None)  # one bound for all, else each role's
    worker_drain, api_drain, edge_drain = (
        (WORKER_DRAIN_S, API_DRAIN_S, EDGE_DRAIN_S) if drain is None else (drain, drain, drain)
    )
    return [
        *_workers(workers, worker_drain),
        _cloud_api(args, api_drain),
        *_edges(args, edges, edge_drain),
    ]


def _nth(base: str, i: int, count: int) -> str:
    """The `i`-th of `count` names: `base` alone, else `base-1`, `base-2`..."""
    return base if count == 1 else f"{base}-{i + 1}"


def _workers(count: int, drain: float) -> list[ChildSpec]:
    """The cloud workers, each its own node."""
    worker_id = default_node_id("cloud")
    return [
        ChildSpec(
            _nth("cloud-worker", i, count),
            [sys.executable, "-m", "cloud", "worker", "--node-id", _nth(worker_id, i, count),
             "--drain-timeout-s", f"{drain:g}"],
            stop_timeout=drain + STOP_MARGIN_S,
            role="cloud",
            node_id=_nth(worker_id, i, count),
        )
        for i in range(count)
    ]  # fmt: skip


def _cloud_api(args: argparse.Namespace, drain: float) -> ChildSpec:
    """The cloud API; ready once a worker answers it."""
    api_id = default_node_id("api")  # its user publishes only as this node
    api_url = f"http://127.0.0.1:{args.api_port}"
    return ChildSpec(
        "cloud-api",
        [sys.executable, "-m", "cloud", "api", "--host", args.http_host, "--port",
         str(args.api_port), "--drain-timeout-s", f"{drain:g}"],
        ready=http_ready(f"{api_url}/readyz"),
        stop_timeout=drain + STOP_MARGIN_S,
        url=api_url,
        role="api",
        node_id=api_id,
        env={"HG_CLOUD_NODE_ID": api_id},
    )  # fmt: skip


def _edges(args: argparse.Namespace, count: int, drain: float) -> list[ChildSpec]:
    """The edges, edge `i` on `args.edge_port + i`; each ready once its model is loaded."""
    edge_id = default_node_id("edge")
    children = []
    for i in range(count):
        url = f"http://127.0.0.1:{args.edge_port + i}"
        children.append(
            ChildSpec(
                _nth("edge", i, count),
                [sys.executable, "-m", "edge", "--host", args.http_host, "--port",
                 str(args.edge_port + i), "--node-id", _nth(edge_id, i, count),
                 "--drain-timeout-s", f"{drain:g}"],
                ready=http_ready(f"{url}/readyz"),
                # The edge's own bound: its drain, then 5 s to close (edge/cli.py).
                stop_timeout=drain + STOP_MARGIN_S,
                url=url,
                role="edge",
                node_id=_nth(edge_id, i, count),
            )
        )  # fmt: skip
    return children


def give_edges_an_admin_key(children: list[ChildSpec], secrets_dir: Path) -> Path:
    """Make (once, 0600) the install's edge admin key and add it to every edge's user keys.

    Users' data on an edge (the users API, a request's `user`) needs a key bound to the
    user; plain completions stay open on loopback. The key reaches the edges in their
    environment (`HG_EDGE_USER_KEYS`, after any the caller set), never on a command line or
    in a log. Returns the key file's path.
    """
    return _give_admin_key(children, secrets_dir / EDGE_ADMIN_KEY, "edge", "HG_EDGE_USER_KEYS")


def give_cloud_api_an_admin_key(children: list[ChildSpec], secrets_dir: Path) -> Path:
    """Make (once, 0600) the install's cloud API admin key and add it to the API's admin keys.

    It reads `GET /v1/usage`; as an admin key (`HG_CLOUD_ADMIN_KEYS`, not an API key) it
    leaves the API open on loopback, as it was. Passed as the edges' key is. Returns the key
    file's path.
    """
    return _give_admin_key(children, secrets_dir / CLOUD_ADMIN_KEY, "api", "HG_CLOUD_ADMIN_KEYS")


def _give_admin_key(children: list[ChildSpec], path: Path, role: str, variable: str) -> Path:
    """The key in `path` (made once, 0600, in a 0700 folder) as `KEY@*` in `variable` of each
    child of `role`, after any entries the caller's environment holds."""
    ensure_secrets_dir(path.parent)
    key = ensure_password(path)
    own = os.environ.get(variable, "").strip()
    for spec in children:
        if spec.role == role:
            spec.env[variable] = ",".join(filter(None, [own, f"{key}@*"]))
    return path


def console_child() -> ChildSpec:
    """The operator console, in the foreground: leaving it stops the network."""
    return ChildSpec(
        "console",
        [sys.executable, "-m", "tui"],
        foreground=True,
        role="operator",
        user=OPERATOR_USER,
    )


def wants_console(args: argparse.Namespace) -> bool:
    """Open the console unless told not to, or when there is no terminal to draw on."""
    return not (args.headless or args.broker_only) and sys.stdin.isatty() and sys.stdout.isatty()
