"""What the console believes of a heartbeat: the subject, not the payload.

The bus binds each node's credential to its own subjects (`broker.permissions.permissions_for`):
an edge may publish `hg.telemetry.edge.<its id>` and nothing else. The payload is whatever
the sender wrote, so a heartbeat whose payload names another node or role than its subject
is forged: it is dropped, and the node that sent it (the subject's) is marked an impostor.
The console never sends its edge API key to an impostor's `api_url`.
"""

from __future__ import annotations

import logging

from broker import subjects, wire
from fleet.watch import sent_as
from tui.state import FleetState, Node

log = logging.getLogger(__name__)


def sender_of(subject: str) -> str | None:
    """The node id a heartbeat subject (`hg.telemetry.<role>.<node_id>`) names, or None."""
    parts = subject.split(".")
    try:
        own = len(parts) == 4 and subjects.telemetry(parts[2], parts[3]) == subject
    except ValueError:
        return None
    return parts[3] if own else None


def receive_heartbeat(fleet: FleetState, subject: str, heartbeat: wire.Heartbeat) -> Node | None:
    """Record a heartbeat received on `subject` if the subject names its node and role;
    else drop it, mark the subject's node an impostor (`fleet.impostors`) and return None."""
    if sent_as(subject, heartbeat):
        return fleet.apply_heartbeat(heartbeat)
    sender = sender_of(subject)
    if sender is not None and sender not in fleet.impostors:
        fleet.impostors.add(sender)
        log.warning(
            "console: %s sent a heartbeat as %s %s: dropped, its api_url is not trusted",
            subject,
            heartbeat.role,
            heartbeat.node_id,
        )
    return None
