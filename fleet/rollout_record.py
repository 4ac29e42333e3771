"""The record of the last model-set roll-out, kept in the fleet config (`hg_config`).

The roll-out engine (`fleet.rollout`), driven by `hybridgen fleet rollout|rollback` and by
the console's roll-out screen, writes it after every swap, so that a roll back from any
machine (the CLI or a console) can put every node the roll-out changed back on the version
it ran before. Key `rollout.last`, a JSON object:

    {"version": "v2", "state": "running|done|halted|rolled_back|partly_rolled_back",
     "nodes": {"edge-a": "v1", ...}, "by": "cli-host-1a2b", "ts": 1700000000.0,
     "message": "..."}

`nodes` holds the nodes the roll-out changed and not rolled back since, each with its
previous version (None: it ran a bare model folder, which cannot be restored by version).
A roll back that leaves some of them (a failed reload, `--nodes`) writes
`partly_rolled_back`, one that leaves none `rolled_back`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nats.aio.client import Client

from broker.store import FleetConfig

#: The `hg_config` key of the last roll-out.
ROLLOUT_KEY = "rollout.last"

#: A roll-out's states, as written: swapping, every node swapped, stopped at a failed swap
#: or a regression, every changed node back, some of them back.
RUNNING, DONE, HALTED = "running", "done", "halted"
ROLLED_BACK, PARTLY_ROLLED_BACK = "rolled_back", "partly_rolled_back"


@dataclass
class RolloutRecord:
    """The last roll-out: its target version, state and the nodes it changed."""

    version: str
    state: str = RUNNING
    #: node id -> the version it ran before (None: a bare model folder).
    nodes: dict[str, str | None] = field(default_factory=dict)
    #: Who ran it (a console id or `cli-<host>-<hex>`).
    by: str = ""
    ts: float = field(default_factory=time.time)
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        """The record as stored."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutRecord:
        """A record read back (unknown keys ignored, wrong types made strings)."""
        nodes = data.get("nodes") or {}
        return cls(
            version=str(data.get("version", "")),
            state=str(data.get("state", "")),
            nodes={str(k): None if v is None else str(v) for k, v in dict(nodes).items()},
            by=str(data.get("by", "")),
            ts=float(data.get("ts", 0.0)),
            message=str(data.get("message", "")),
        )


async def load_record(nc: Client) -> RolloutRecord | None:
    """The last roll-out's record, or None when there is none.

    Raises:
        Unavailable: JetStream is not reachable.
    """
    config = await FleetConfig.open(nc)
    data = await config.get(ROLLOUT_KEY)
    return None if data is None else RolloutRecord.from_json(data)


async def save_record(nc: Client, record: RolloutRecord) -> None:
    """Write `record` as the last roll-out (stamped now).

    Raises:
        Unavailable: JetStream is not reachable.
    """
    record.ts = time.time()
    config = await FleetConfig.open(nc)
    await config.put(ROLLOUT_KEY, record.to_json())
