"""The policy screen: read and edit the routing policy in the fleet config (`hg_config`).

It shows the fleet default (`policy.default`) and one node's override
(`policy.node.<node_id>`), and edits one of them as JSON. An edit is validated with the
model the edge routes with (`fleet.policy.merge_policy`, the node override layered over the
fleet default) before the operator is asked to confirm; an invalid one is refused with
pydantic's message and nothing is written.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError
from pydantic import ValidationError
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TextArea

from broker import subjects
from broker.errors import HybridgenError
from broker.store import FleetConfig
from fleet.policy import merge_policy
from fleet.rollout import Recorder
from tui.screens import ConfirmScreen

log = logging.getLogger(__name__)

#: The target name of the fleet default in operator events.
FLEET = "fleet"


def parse_layer(text: str) -> dict[str, Any]:
    """The JSON object typed by the operator (empty text: `{}`).

    Raises:
        ValueError: not JSON, or not a JSON object.
    """
    if not text.strip():
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("the policy must be a JSON object")
    return value


def check_layer(
    layer: dict[str, Any], *, fleet: dict[str, Any] | None, node_level: bool
) -> str | None:
    """Why `layer` may not be written, or None when the edge would accept it.

    A node override is checked layered over the fleet default, as the edge merges them.
    """
    try:
        if node_level:
            merge_policy(fleet, layer)
        else:
            merge_policy(layer)
    except ValidationError as exc:
        return str(exc)
    return None


class PolicyScreen(Screen[None]):
    """The fleet default and a node's override; edit one as JSON and write it to KV.

    Args:
        nc: a connected client.
        node_id: the node whose override is shown (None: the fleet default only).
        record: called after every write attempt, to publish an operator event.
    """

    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("ctrl+s", "write", "write"),
        Binding("ctrl+t", "switch_layer", "fleet/node"),
    ]

    def __init__(self, nc: Client, node_id: str | None, record: Recorder) -> None:
        super().__init__()
        self.nc = nc
        self.node_id = node_id
        self.record = record
        self.config: FleetConfig | None = None
        self.fleet: dict[str, Any] | None = None
        self.node: dict[str, Any] | None = None
        #: Whether the editor holds the node override (else the fleet default).
        self.editing_node = node_id is not None
        self.loaded = False

    @property
    def key(self) -> str:
        """The KV key being edited."""
        return subjects.policy_key(self.node_id if self.editing_node else None)

    @property
    def target(self) -> str:
        """The node being edited, or `fleet`."""
        return self.node_id if self.editing_node and self.node_id else FLEET

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="policy-current")
        yield Static(id="policy-editing")
        yield TextArea(id="policy-editor")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#policy-current", Static).update(Text("loading hg_config ..."))
        self.load()

    @work(exclusive=True, group="policy-load")
    async def load(self) -> None:
        """Read both layers from KV and put the one being edited in the editor."""
        try:
            if self.config is None:
                self.config = await FleetConfig.open(self.nc)
            self.fleet = await self.config.get(subjects.policy_key())
            self.node = (
                await self.config.get(subjects.policy_key(self.node_id)) if self.node_id else None
            )
        except (HybridgenError, NatsError) as exc:
            self.notify(f"policy: {_why(exc)}", severity="error", markup=False)
            return
        self.loaded = True
        self.show()

    def show(self) -> None:
        """Draw both layers and load the edited one into the editor."""
        lines = [f"fleet default ({subjects.policy_key()}): {_dumps(self.fleet)}"]
        if self.node_id is not None:
            lines.append(
                f"node override ({subjects.policy_key(self.node_id)}): {_dumps(self.node)}"
            )
        self.query_one("#policy-current", Static).update(Text("\n".join(lines)))
        self.query_one("#policy-editing", Static).update(
            Text(f"editing {self.key} (ctrl+s writes, asks first)")
        )
        layer = self.node if self.editing_node else self.fleet
        text = json.dumps(layer or {}, indent=2, sort_keys=True)
        self.query_one("#policy-editor", TextArea).load_text(text)

    def action_switch_layer(self) -> None:
        """Edit the other layer (fleet default or the node's override)."""
        if self.node_id is None or not self.loaded:
            return
        self.editing_node = not self.editing_node
        self.show()

    def action_write(self) -> None:
        """Validate the editor's JSON, ask, then write it to KV."""
        if not self.loaded:
            self.notify("policy: not loaded yet", severity="warning")
            return
        key = self.key
        try:
            layer = parse_layer(self.query_one("#policy-editor", TextArea).text)
        except ValueError as exc:
            self.notify(f"{key}: refused, {exc}", severity="error", markup=False)
            return
        problem = check_layer(layer, fleet=self.fleet, node_level=self.editing_node)
        if problem is not None:
            self.notify(f"{key}: refused, {problem}", severity="error", markup=False)
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.write(key, self.target, layer)
            else:
                self.notify(f"{key}: cancelled, nothing written", markup=False)

        self.app.push_screen(ConfirmScreen(f"write {key}?\n{json.dumps(layer)}"), answered)

    @work(exclusive=True, group="policy-write")
    async def write(self, key: str, target: str, layer: dict[str, Any]) -> None:
        """Put `layer` under `key`, show the result and record it as an operator event."""
        assert self.config is not None  # loaded before any write
        try:
            revision = await self.config.put(key, layer)
        except (HybridgenError, NatsError) as exc:
            message = f"{key}: not written, {_why(exc)}"
            self.notify(message, severity="error", markup=False)
            await self.record("policy-write", target, False, message)
            return
        message = f"{key}: written (revision {revision})"
        self.notify(message, markup=False)
        if key == subjects.policy_key():
            self.fleet = layer
        else:
            self.node = layer
        self.show()
        await self.record("policy-write", target, True, message)


def _dumps(layer: dict[str, Any] | None) -> str:
    return "(none)" if layer is None else json.dumps(layer, sort_keys=True)


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, HybridgenError) else str(exc) or type(exc).__name__
