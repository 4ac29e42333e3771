"""Edge sites isolated from one another on the hub: each site's leaf node logs in with its
own credentials, bound to what its own edges may send and receive.

A leaf node that logs in as a user of the hub's top-level `authorization` block gets that
user's permissions on its link, and the hub enforces them itself (checked on nats-server
2.15 with a hand-written leaf connection that ignores what the hub tells it): it does not
forward down the link what the user may not subscribe to, and it closes a link that
publishes outside the user's publish rights. The directions are the leaf's: `publish` is
what the site may send into the hub, `subscribe` what the hub may send to the site. A
leaf link has no `allow_responses`: replies to the operators' requests are allowed by name.
(A `leafnodes { authorization { users } }` entry takes no permissions in nats-server.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from broker import subjects
from broker.config import ServerConfig
from broker.permissions import Permissions, inbox_prefix, permissions_for


@dataclass(frozen=True)
class LeafSite:
    """An edge site's own login on the hub: its leaf node authenticates as `name`, and the
    link carries only what the site's edges may send and receive (`leaf_site_permissions`).

    Attributes:
        name: the leaf node's user on the hub (its `--leaf-user`).
        password: its password.
        edges: each edge of the site as (its user on the site's leaf node, its node id).
    """

    name: str
    password: str
    edges: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, spec: str) -> LeafSite:
        """Parse `NAME:PASSWORD:EDGE_USER=NODE_ID[,EDGE_USER=NODE_ID...]` (the CLI's
        `--leaf-site`); a bare `NODE_ID` is an edge whose user has the node's name."""
        parts = spec.split(":")
        if len(parts) != 3 or not all(parts):
            raise ValueError(
                f"leaf site {spec.partition(':')[0]!r}: expected "
                "NAME:PASSWORD:EDGE_USER=NODE_ID[,EDGE_USER=NODE_ID...]"
            )
        edges = []
        for item in parts[2].split(","):
            user, _, node = item.strip().rpartition("=")
            edges.append((user or node, node))
        return cls(parts[0], parts[1], tuple(edges))


def leaf_site_permissions(
    site: LeafSite, js_domain: str | None, requesters: Sequence[str] = ()
) -> Permissions:
    """What a site's leaf link may carry, enforced by the hub (verified on nats-server
    2.15: the hub drops what the leaf may not receive, and closes a link that publishes
    outside its rights, whatever the leaf node's own config says).

    `publish`: what the link may bring in, the union of its edges' rights (generation
    requests, their own telemetry, events and fleet-config reads) plus replies to
    `requesters`' inboxes (the operators' control and discovery requests: a leaf link has
    no `allow_responses`). `subscribe`: what the hub may send down it, the union of its
    edges' (their own inboxes and control subjects, discovery). Nothing of another site's
    nodes, no `hg.gen.>`, no other user's inbox.
    """
    publish: dict[str, None] = {}
    subscribe: dict[str, None] = {}
    for user, node in site.edges:
        perms = permissions_for("edge", node, js_domain, subjects.token(user, what="edge user"))
        publish.update(dict.fromkeys(perms.publish))
        subscribe.update(dict.fromkeys(perms.subscribe))
    publish.update(dict.fromkeys(f"{inbox_prefix(name)}.>" for name in requesters))
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe))


def check_sites(config: ServerConfig) -> None:
    """Refuse leaf sites that could act as one another or as a client user.

    Raises:
        ValueError: sites on a server that is no hub, next to a shared `leaf_user`, on a
            hub with no client users, or a login, edge user or node id declared twice.
    """
    if config.topology != "hub" and not (
        config.topology == "cluster" and config.leaf_port is not None
    ):
        raise ValueError("leaf sites are declared on a hub (or a cluster with a leaf port)")
    if config.leaf_user:
        raise ValueError(
            "give either one leaf login shared by every site (leaf_user) or a login per site"
        )
    if not config.users:
        raise ValueError("leaf sites log in as users: the hub's clients need users too")
    logins = [u.name for u in config.users] + [s.name for s in config.leaf_sites]
    edge_users = [user for s in config.leaf_sites for user, _ in s.edges]
    nodes = [node for s in config.leaf_sites for _, node in s.edges]
    # Inboxes are per user: two sites' edges with one name would read each other's replies.
    for what, names in (
        ("login", logins),
        ("edge user", edge_users + [u.name for u in config.users]),
        ("node id", nodes),
    ):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"leaf sites: {what} {', '.join(twice)} declared twice")
        for name in names:
            subjects.token(name, what=what)
