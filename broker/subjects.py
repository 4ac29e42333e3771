"""Every NATS subject, queue group, KV bucket and object store name hybridgen uses.

No other module spells a subject by hand: import the function or constant from here.
"""

from __future__ import annotations

import re

PREFIX = "hg"

#: Subject tokens (model names, node ids, request ids) must be one NATS token. Matched
#: whole (`fullmatch`): a `$` anchor would also admit a trailing newline.
_TOKEN = re.compile(r"[A-Za-z0-9_\-]+")

GEN_ALL = f"{PREFIX}.gen.>"
CANCEL_ALL = f"{PREFIX}.cancel.>"
TELEMETRY_ALL = f"{PREFIX}.telemetry.>"
EVENTS_ALL = f"{PREFIX}.events.>"
CONTROL_ALL = f"{PREFIX}.ctl.>"
#: nats.micro discovery: `$SRV.PING|INFO|STATS[.<service>[.<id>]]`.
DISCOVERY_ALL = "$SRV.>"

#: A reply inbox: `_INBOX.<id>...` or a user's own `_INBOX_<user>.<id>...` (no wildcards).
_INBOX = re.compile(r"_INBOX(?:_[A-Za-z0-9_\-]+)?(?:\.[^.\s*>]+)+")

#: Verbs answered on `hg.ctl.<node_id>.<verb>`.
CONTROL_VERBS = ("drain", "resume", "reload-model", "set-policy")

#: JetStream key-value bucket holding fleet configuration (routing policy, ...).
CONFIG_BUCKET = "hg_config"
#: JetStream object store holding model artifacts and their manifests.
MODELS_BUCKET = "hg_models"
#: KV key of the fleet-wide routing policy; per-node overrides use `policy_key(node_id)`.
POLICY_DEFAULT_KEY = "policy.default"


def is_token(name: str) -> bool:
    """True when `name` is usable as one subject token (no dots, spaces or wildcards)."""
    return isinstance(name, str) and _TOKEN.fullmatch(name) is not None


def is_inbox(subject: str) -> bool:
    """True when `subject` is a reply inbox (`_INBOX.…`, `_INBOX_<user>.…`).

    A service answers only these: a reply subject is chosen by whoever sends the request,
    and nats-server lets a responder publish to it past any deny list, so a request naming
    `$KV.…` or `$O.…` as its reply would make the service write there.
    """
    return _INBOX.fullmatch(subject) is not None


def token(name: str, *, what: str = "name") -> str:
    """Return `name` if it is a valid subject token, else raise `ValueError` naming it."""
    if not is_token(name):
        raise ValueError(
            f"{what} {name!r} is not a valid subject token: use letters, digits, '-' or '_'"
        )
    return name


def gen(model: str) -> str:
    """Subject a generation request for `model` is published on."""
    return f"{PREFIX}.gen.{token(model, what='model')}"


def queue_group(model: str) -> str:
    """Queue group cloud workers serving `model` share."""
    return f"cloud.{token(model, what='model')}"


def cancel(request_id: str) -> str:
    """Subject that cancels one in-flight generation."""
    return f"{PREFIX}.cancel.{token(request_id, what='request_id')}"


def telemetry(role: str, node_id: str) -> str:
    """Subject a node's heartbeat is published on every second."""
    return f"{PREFIX}.telemetry.{token(role, what='role')}.{token(node_id, what='node_id')}"


def telemetry_of_role(role: str) -> str:
    """Wildcard matching every heartbeat of one role."""
    return f"{PREFIX}.telemetry.{token(role, what='role')}.*"


def events(role: str, node_id: str) -> str:
    """Subject a node's events (fallback, error, drain, ...) are published on."""
    return f"{PREFIX}.events.{token(role, what='role')}.{token(node_id, what='node_id')}"


def events_of_role(role: str) -> str:
    """Wildcard matching every event of one role."""
    return f"{PREFIX}.events.{token(role, what='role')}.*"


def discovery_info(service: str) -> str:
    """nats.micro's INFO request for every instance of one service."""
    return f"$SRV.INFO.{token(service, what='service')}"


def control(node_id: str, verb: str) -> str:
    """Request-reply subject of one control verb of one node."""
    if verb not in CONTROL_VERBS:
        raise ValueError(f"unknown control verb {verb!r}; one of {', '.join(CONTROL_VERBS)}")
    return f"{PREFIX}.ctl.{token(node_id, what='node_id')}.{verb}"


def control_of_node(node_id: str) -> str:
    """Wildcard matching every control verb of one node."""
    return f"{PREFIX}.ctl.{token(node_id, what='node_id')}.*"


def policy_key(node_id: str | None = None) -> str:
    """KV key of the routing policy: the fleet default, or one node's override."""
    if node_id is None:
        return POLICY_DEFAULT_KEY
    return f"policy.node.{token(node_id, what='node_id')}"
