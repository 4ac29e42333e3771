"""Render nats-server configuration files for real deployments.

Topologies:

- **standalone**: one server (JetStream on), what `hybridgen up` runs.
- **cluster**: three (or more) servers in the cloud, one file per node, routes between
  them, clustered JetStream. Cloud workers scale by joining the queue group anywhere.
- **hub**: a server (or cluster node) with a leaf-node listener that edge sites dial.
- **leaf**: a server at an edge site with a remote to the hub: edge nodes talk to their
  local leaf; queue groups prefer local subscribers, everything else crosses the link.

Users carry a role, and each role gets the subject permissions of `broker.permissions`.
A hub's edge sites each log in with their own user bound to their edges (`broker.sites`),
and a cluster's routes run over TLS verified at both ends (`cluster_tls`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from broker.permissions import RESPONSE_EXPIRES, ROLES, Role, permissions_for

if TYPE_CHECKING:
    from broker.sites import LeafSite

Topology = Literal["standalone", "hub", "leaf", "cluster"]


@dataclass(frozen=True)
class User:
    """A client user: name, password, role, and optionally the one node it may speak for."""

    name: str
    password: str
    role: Role
    node_id: str | None = None

    @classmethod
    def parse(cls, spec: str) -> User:
        """Parse `name:password:role[:node_id]` (the CLI's `--user`)."""
        parts = spec.split(":")
        if len(parts) not in (3, 4) or not all(parts[:3]):
            raise ValueError(f"user {spec!r}: expected NAME:PASSWORD:ROLE[:NODE_ID]")
        role = parts[2]
        if role not in ROLES:
            raise ValueError(f"user {parts[0]!r}: unknown role {role!r}; one of {', '.join(ROLES)}")
        return cls(parts[0], parts[1], role, parts[3] if len(parts) == 4 and parts[3] else None)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TLSFiles:
    """A TLS block: certificate, key, the CA that verifies peers, and whether to verify."""

    cert: Path
    key: Path
    ca: Path | None = None
    verify: bool = False


@dataclass
class ServerConfig:
    """Everything one server's config file says.

    Attributes:
        topology: standalone, hub, leaf or cluster.
        name: `server_name` (must be unique in a cluster / across leaf links with JetStream).
        host: client listen address.
        port: client port (-1: random).
        http_port: monitoring port (`/varz`, `/healthz`); None: off.
        store_dir: JetStream store directory; None leaves JetStream off.
        js_domain: JetStream domain. A hub serves it (so clients of leaf nodes, which run
            no JetStream, reach the hub's with `nc.jetstream(domain=...)`); on a leaf it
            only widens the users' permissions to that domain's API subjects.
        max_payload: largest message in bytes (None: nats-server's 1 MiB).
        users: client users (none: no authentication).
        tls: client TLS.
        leaf_port: hub's leaf-node listener port (-1: random). A cluster node with one
            also listens for leaf nodes (every node of a cloud cluster can be a hub).
        leaf_user: user leaf nodes authenticate as on the hub (with `leaf_password`): one
            login shared by every site, with no permissions. On a leaf: its site's login.
        leaf_password: its password.
        leaf_sites: a hub's edge sites, each with its own login bound to its edges
            (`LeafSite`); instead of `leaf_user`.
        leaf_advertise: whether the leaf-node listener tells leaf nodes the leaf URLs of the
            other cluster nodes (nats-server's default). Off (`no_advertise`), a leaf node
            only ever dials its configured remotes: for hubs behind NAT or a load balancer,
            or to cut a site off by its configured link alone (the drill).
        leaf_tls: TLS of the leaf-node listener (hub) or of the remote (leaf; only `ca` used
            unless the hub verifies client certificates).
        remotes: hub URLs a leaf dials (`nats-leaf://host:7422`; credentials are added from
            `leaf_user`/`leaf_password`).
        cluster_name: name shared by every node of a cluster.
        cluster_host: route listen address.
        cluster_port: route port.
        routes: every node's route URL (`nats-route://host:6222`); a node's own is harmless.
        cluster_user: route authentication user (with `cluster_password`).
        cluster_password: its password.
        cluster_tls: the routes' TLS (certificate, key and the CA; both ends verified).
            Routes carry prompts and credentials: a cluster without it is refused unless
            `cluster_insecure`.
        cluster_insecure: routes in clear (a private network you trust, or a test).
    """

    topology: Topology = "standalone"
    name: str | None = None
    host: str = "0.0.0.0"
    port: int = 4222
    http_port: int | None = None
    store_dir: Path | None = None
    js_domain: str | None = None
    max_payload: int | None = None
    users: list[User] = field(default_factory=list)
    tls: TLSFiles | None = None
    leaf_port: int | None = None
    leaf_user: str | None = None
    leaf_password: str | None = None
    leaf_advertise: bool = True
    leaf_tls: TLSFiles | None = None
    remotes: list[str] = field(default_factory=list)
    cluster_name: str = "hybridgen"
    cluster_host: str = "0.0.0.0"
    cluster_port: int = 6222
    routes: list[str] = field(default_factory=list)
    cluster_user: str | None = None
    cluster_password: str | None = None
    leaf_sites: list[LeafSite] = field(default_factory=list)
    cluster_tls: TLSFiles | None = None
    cluster_insecure: bool = False


def _q(value: object) -> str:
    """A quoted config string (JSON string syntax is valid nats-server config)."""
    return json.dumps(str(value))


def _list(values: Sequence[str]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


def _tls_block(tls: TLSFiles, indent: str, *, remote: bool = False) -> list[str]:
    lines = [f"{indent}tls {{"]
    if not remote or tls.verify:
        lines += [f"{indent}  cert_file: {_q(tls.cert)}", f"{indent}  key_file: {_q(tls.key)}"]
    if tls.ca is not None:
        lines.append(f"{indent}  ca_file: {_q(tls.ca)}")
    if tls.verify and not remote:
        lines.append(f"{indent}  verify: true")
    lines.append(f"{indent}  timeout: 2")
    return [*lines, f"{indent}}}"]


def _users_block(
    users: Sequence[User], js_domain: str | None, sites: Sequence[LeafSite] = ()
) -> list[str]:
    lines = ["authorization {", "  users: ["]
    requesters = [u.name for u in users if u.role in ("operator", "launcher")]
    entries = [
        (
            u.name,
            u.password,
            permissions_for(u.role, u.node_id, js_domain, u.name),
            f"role: {u.role}" + (f", node: {u.node_id}" if u.node_id else ""),
        )
        for u in users
    ]
    if sites:
        from broker.sites import leaf_site_permissions  # broker.sites builds on this module

        entries += [
            (s.name, s.password, leaf_site_permissions(s, js_domain, requesters),
             "leaf site: " + ", ".join(node for _, node in s.edges))
            for s in sites
        ]  # fmt: skip
    for name, password, perms, comment in entries:
        lines += [
            f"    {{  # {comment}",
            f"      user: {_q(name)}",
            f"      password: {_q(password)}",
            "      permissions: {",
            f"        publish: {{ allow: {_list(perms.publish)} }}",
            f"        subscribe: {{ allow: {_list(perms.subscribe)} }}",
        ]
        if perms.allow_responses:
            lines.append(
                f"        allow_responses: {{ max: {perms.max_responses}, "
                f"expires: {_q(RESPONSE_EXPIRES)} }}"
            )
        lines += ["      }", "    }"]
    return [*lines, "  ]", "}"]


def _with_credentials(url: str, user: str | None, password: str | None) -> str:
    if not user or "@" in url:
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "nats-leaf", url
    return f"{scheme}://{user}:{password or ''}@{rest}"


def _leafnodes_block(config: ServerConfig) -> list[str]:
    """A hub's leaf-node listener (sites log in as the users of `leaf_sites`), or a leaf
    node's remote (its site's login in the URLs)."""
    if config.topology == "leaf":
        urls = [
            _with_credentials(u, config.leaf_user, config.leaf_password) for u in config.remotes
        ]
        lines = ["leafnodes {", "  remotes: [", "    {", f"      urls: {_list(urls)}"]
        if config.leaf_tls is not None:
            lines += _tls_block(config.leaf_tls, "      ", remote=True)
        return [*lines, "    }", "  ]", "}"]
    lines = [
        "leafnodes {",
        f"  host: {_q(config.host)}",
        f"  port: {config.leaf_port if config.leaf_port is not None else 7422}",
    ]
    if not config.leaf_advertise:
        lines.append("  no_advertise: true")
    if config.leaf_user:
        lines += [
            "  authorization {",
            f"    user: {_q(config.leaf_user)}",
            f"    password: {_q(config.leaf_password or '')}",
            "  }",
        ]
    # With no authorization here, a leaf node logs in as a user of the top-level block
    # (a `leaf_sites` entry), and that user's permissions bound the link.
    if config.leaf_tls is not None:
        lines += _tls_block(config.leaf_tls, "  ")
    return [*lines, "}"]


def _cluster_block(config: ServerConfig) -> list[str]:
    """A cluster node's routes: authenticated, and over TLS verified at both ends."""
    if config.cluster_tls is None and not config.cluster_insecure:
        raise ValueError(
            "cluster routes carry prompts and credentials: give them TLS (a certificate, "
            "its key and the CA), or mark them insecure for a private network you trust"
        )
    lines = [
        "cluster {",
        f"  name: {_q(config.cluster_name)}",
        f"  host: {_q(config.cluster_host)}",
        f"  port: {config.cluster_port}",
    ]
    if config.cluster_user:
        lines += [
            "  authorization {",
            f"    user: {_q(config.cluster_user)}",
            f"    password: {_q(config.cluster_password or '')}",
            "  }",
        ]
    if config.cluster_tls is not None:
        if config.cluster_tls.ca is None:
            raise ValueError("route TLS needs the CA that signed every node's certificate")
        lines += _tls_block(
            TLSFiles(config.cluster_tls.cert, config.cluster_tls.key, config.cluster_tls.ca, True),
            "  ",
        )
    routes = [
        _with_credentials(r, config.cluster_user, config.cluster_password) for r in config.routes
    ]
    return [*lines, f"  routes: {_list(routes)}", "}"]


def render(config: ServerConfig) -> str:
    """The text of one nats-server config file.

    Raises:
        ValueError: an inconsistent configuration (a leaf without remotes, a cluster without
            route TLS, two leaf sites sharing an edge, ...).
    """
    if config.topology == "leaf" and not config.remotes:
        raise ValueError("a leaf node needs at least one remote (the hub's leaf-node URL)")
    if config.topology == "cluster" and not config.routes:
        raise ValueError("a cluster node needs the route URLs of its peers")
    if config.leaf_sites:
        from broker.sites import check_sites  # broker.sites builds on this module

        check_sites(config)
    lines = [f"# hybridgen nats-server config: {config.topology}"]
    if config.name:
        lines.append(f"server_name: {_q(config.name)}")
    lines += [f"host: {_q(config.host)}", f"port: {config.port}"]
    if config.http_port is not None:
        lines.append(f"http_port: {config.http_port}")
    if config.max_payload is not None:
        lines.append(f"max_payload: {config.max_payload}")
    if config.store_dir is not None:
        domain = f"domain: {_q(config.js_domain)}, " if config.js_domain else ""
        lines.append(f"jetstream {{ {domain}store_dir: {_q(config.store_dir)} }}")
    if config.tls is not None:
        lines += _tls_block(config.tls, "")
    if config.users or config.leaf_sites:
        lines += _users_block(config.users, config.js_domain, config.leaf_sites)
    # A cluster node with a `leaf_port` is also a hub: edge sites' leaf nodes dial it.
    if config.topology in ("hub", "leaf") or (
        config.topology == "cluster" and config.leaf_port is not None
    ):
        lines += _leafnodes_block(config)
    if config.topology == "cluster":
        lines += _cluster_block(config)
    return "\n".join(lines) + "\n"


# -- secrets on disk --------------------------------------------------------------------------

#: Mode of the secrets directory and of each file in it: the owner only.
SECRETS_DIR_MODE = 0o700
SECRET_FILE_MODE = 0o600


def ensure_secrets_dir(folder: Path) -> Path:
    """Create `folder` (and parents) if needed, and make it owner-only (0700)."""
    folder.mkdir(parents=True, exist_ok=True, mode=SECRETS_DIR_MODE)
    folder.chmod(SECRETS_DIR_MODE)
    return folder


def write_secret(path: Path, text: str, *, private_folder: bool = True) -> None:
    """Write `text` to `path` with mode 0600 from the first byte (atomic replace).

    `private_folder`: make the folder owner-only (0700) too; off, a missing folder is
    made 0700 and an existing one keeps its mode (a config rendered into `/etc/...`).
    """
    if private_folder:
        ensure_secrets_dir(path.parent)
    elif not path.parent.is_dir():
        path.parent.mkdir(parents=True, mode=SECRETS_DIR_MODE)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, SECRET_FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def ensure_password(path: Path) -> str:
    """The password stored in `path`; a new random one (written with mode 0600) if none.

    Later calls return the same password, so services keep their credentials across
    restarts. A file whose mode lets others read it is tightened to 0600.
    """
    if path.is_file():
        path.chmod(SECRET_FILE_MODE)
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
    password = secrets.token_urlsafe(24)
    write_secret(path, password + "\n")
    return password


def self_signed_tls(folder: Path, hosts: Sequence[str] = ()) -> TLSFiles:
    """A private CA and a server certificate signed by it, in `folder`
    (`broker.tls.self_signed_tls`; `broker.tls.host_certificate` adds one per host).

    Raises:
        RuntimeError: `openssl` is not installed or failed (the message says what to do).
    """
    from broker import tls  # broker.tls builds on this module's files and modes

    return tls.self_signed_tls(folder, hosts)
