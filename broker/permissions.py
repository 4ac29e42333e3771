"""Roles and their subject permissions on the bus: the least each kind of client needs.

Every user of a rendered config (`broker.config`) carries a role, and each role gets subject
permissions (`permissions_for`):

- `edge`: request `hg.gen.>` and cancel; publish its own telemetry/events; answer its
  control subjects and its own service's `$SRV` discovery (one reply each); read the fleet
  config (KV) and pull artifacts. It writes neither: the operator side stores a node's
  policy override, which the edge's `set-policy` verb only applies.
- `cloud`: subscribe `hg.gen.>`/`hg.cancel.>` and stream answers (`allow_responses`);
  publish its telemetry/events; answer control and its services' discovery. It cannot send
  generation requests.
- `api`: like an edge for requests (the cloud HTTP API), plus the workers' `$SRV.INFO`
  (its readiness probe) and reading the fleet config (its key limits); it answers nothing,
  receives no control, writes no KV and reads no artifacts.
- `operator`: read all telemetry/events, send control requests, discover services, and
  manage the fleet config and artifacts (JetStream API).
- `launcher`: an operator that also publishes `hg.events.launcher.*` (`hybridgen up`'s
  supervision events) and creates the buckets at start.

A user with a `node_id` is limited to that node's telemetry, events and control subjects.

The names of the services each serving role registers (`ROLE_SERVICES`) and the reply-inbox
prefix of a user (`inbox_prefix`) live here too: the permissions are written in their terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from broker import subjects

Role = Literal["edge", "cloud", "api", "operator", "launcher"]
ROLES: tuple[Role, ...] = ("edge", "cloud", "api", "operator", "launcher")

_KV_STREAM = f"KV_{subjects.CONFIG_BUCKET}"
_OBJ_STREAM = f"OBJ_{subjects.MODELS_BUCKET}"


def _stream_read_api(stream: str, domain: str | None = None) -> list[str]:
    """JetStream API subjects a client needs to read one stream (get, watch, pull)."""
    subjects_ = _stream_read_api_of("$JS.API", stream)
    if domain:
        subjects_ += _stream_read_api_of(f"$JS.{domain}.API", stream)
    return [*subjects_, f"$JS.FC.{stream}.>"]


def _stream_read_api_of(api: str, stream: str) -> list[str]:
    return [
        f"{api}.INFO",
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.>",
        f"{api}.CONSUMER.DELETE.{stream}.>",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.>",
    ]


#: A plain `allow_responses: true` allows ONE reply per request; a generation streams many
#: chunks to the same inbox, so a cloud worker gets a budget of replies instead. Every
#: responder's replies may come up to `RESPONSE_EXPIRES` late (a model reload takes minutes).
RESPONSE_MAX_MSGS = 100_000
RESPONSE_EXPIRES = "10m"


@dataclass(frozen=True)
class Permissions:
    """Subject permissions of one user.

    `allow_responses` lets it answer the requests it receives, `max_responses` replies to
    each (a generation streams many). nats-server lets such a reply through whatever the
    publish list denies, so services answer inboxes only (`broker.inbox_only`).
    """

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False
    max_responses: int = 1


def inbox_prefix(user: str | None) -> str:
    """The reply-inbox prefix of a user: `_INBOX_<user>` (plain `_INBOX` without one).

    Each user may only subscribe to its own inboxes, so no client can read the replies
    (generated text) meant for another. `broker.bus.connect` uses the same prefix.
    """
    if user and subjects.is_token(user):
        return f"_INBOX_{user}"
    return "_INBOX"


#: nats.micro service names: the cloud workers' generation service (the api's readiness
#: probe asks for it), the default control service (a worker's), an edge's control service.
WORKER_SERVICE = "hybridgen-cloud"
CONTROL_SERVICE = "hybridgen-control"
EDGE_SERVICE = "hybridgen-edge"
#: The services each serving role registers: it may answer discovery
#: (`$SRV.<verb>.<name>[.<id>]`) for these names only, so no edge can pose as a worker.
ROLE_SERVICES: dict[str, tuple[str, ...]] = {
    "edge": (EDGE_SERVICE,),
    "cloud": (WORKER_SERVICE, CONTROL_SERVICE),
}


def _discovery_of(role: str) -> tuple[str, ...]:
    """The `$SRV` subjects a serving role answers: the name-less PING/INFO/STATS (consoles
    list every service with them) and those of its own services.

    The name-less verbs are spelled out: an allowed `$SRV.*` would also let a client
    subscribe `$SRV.>` (nats-server matches the `>` token against the `*`), and so receive
    every service's discovery requests.
    """
    names = ROLE_SERVICES.get(role, ())
    verbs = ("PING", "INFO", "STATS")
    return (
        *(f"$SRV.{verb}" for verb in verbs),
        *(f"$SRV.*.{name}" for name in names),
        *(f"$SRV.*.{name}.*" for name in names),
    )


def permissions_for(
    role: Role,
    node_id: str | None = None,
    js_domain: str | None = None,
    user: str | None = None,
) -> Permissions:
    """The subject permissions of a role: the least each needs.

    - Only `operator` and `launcher` write the fleet config (KV `hg_config`) and the models
      (object store `hg_models`); an edge reads both, an edge's `set-policy` verb only
      applies what the operator side stores.
    - Only the roles that serve answer requests (`allow_responses`): `cloud` streams
      (`RESPONSE_MAX_MSGS` replies per request), `edge` sends one (control, discovery);
      `api` and the operators answer nothing.
    - Discovery: a serving role subscribes to the name-less `$SRV` verbs and its own
      services' subjects (`ROLE_SERVICES`), not `$SRV.>`; the api may ask only for the
      workers (`$SRV.INFO.hybridgen-cloud`, its readiness probe).
    - Control: an edge or cloud node subscribes to its own `hg.ctl.<node>.*` (with a
      `node_id`), the api to none; only the operators send control.

    Args:
        role: edge, cloud, api, operator or launcher.
        node_id: limit telemetry, events and control to this node's subjects.
        js_domain: also allow the JetStream API of this domain (clients of a leaf node).
        user: the user name: replies are limited to its own inboxes (`inbox_prefix`).
    """
    inbox = f"{inbox_prefix(user)}.>"
    node = subjects.token(node_id, what="node_id") if node_id else "*"
    own_telemetry = subjects.telemetry(role, node) if node_id else subjects.telemetry_of_role(role)
    own_events = subjects.events(role, node) if node_id else subjects.events_of_role(role)
    own_control = subjects.control_of_node(node) if node_id else subjects.CONTROL_ALL
    if role == "edge":
        return Permissions(
            publish=(
                subjects.GEN_ALL,
                subjects.CANCEL_ALL,
                own_telemetry,
                own_events,
                *dict.fromkeys(
                    _stream_read_api(_KV_STREAM, js_domain)
                    + _stream_read_api(_OBJ_STREAM, js_domain)
                ),
            ),
            subscribe=(inbox, own_control, *_discovery_of(role)),
            allow_responses=True,
        )
    if role == "cloud":
        return Permissions(
            publish=(own_telemetry, own_events),
            subscribe=(
                subjects.GEN_ALL,
                subjects.CANCEL_ALL,
                own_control,
                *_discovery_of(role),
                inbox,
            ),
            allow_responses=True,
            max_responses=RESPONSE_MAX_MSGS,
        )
    if role == "api":
        return Permissions(
            publish=(
                subjects.GEN_ALL,
                subjects.CANCEL_ALL,
                own_telemetry,
                own_events,
                subjects.discovery_info(WORKER_SERVICE),
                # It reads the fleet config (its `limits` key), as an edge does.
                *_stream_read_api(_KV_STREAM, js_domain),
            ),
            subscribe=(inbox,),
        )
    if role in ("operator", "launcher"):
        own_role_events = subjects.events_of_role(role)
        return Permissions(
            publish=(
                subjects.CONTROL_ALL,
                subjects.DISCOVERY_ALL,
                "$JS.API.>",
                *([f"$JS.{js_domain}.API.>"] if js_domain else []),
                f"$KV.{subjects.CONFIG_BUCKET}.>",
                f"$O.{subjects.MODELS_BUCKET}.>",
                "$JS.FC.>",
                "$JS.ACK.>",
                *dict.fromkeys([subjects.events_of_role("operator"), own_role_events]),
            ),
            subscribe=(subjects.TELEMETRY_ALL, subjects.EVENTS_ALL, inbox),
        )
    raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
