"""An edge node's link to the bus: connection (and reconnection), live policy, telemetry,
control verbs.

The node serves locally whether or not the bus is there: when no NATS server answers at
start, the link retries in the background every `reconnect_s` and the node answers with
`route_reason: cloud_unavailable` meanwhile. Once connected, nats-py reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from nats.aio.client import Client
from pydantic import ValidationError

from broker import subjects, wire
from broker.bus import bounded, close_bounded, connect_settings, serve_control
from broker.control import ControlHandler
from broker.errors import BadRequest, HybridgenError
from broker.permissions import EDGE_SERVICE
from broker.telemetry import Telemetry
from edge.node import EdgeNode
from edge.route.rules import PolicySettings, merge_policy
from fleet.experiment import EXPERIMENT_KEY
from fleet.policy import policy_sources
from fleet.routes import CLOUD_ROUTE_REASONS
from serving.limits import Limits

logger = logging.getLogger(__name__)

ReloadModel = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
ApplyExperiment = Callable[[dict[str, Any] | None], Awaitable[None]]

#: Longest wait for one step on the bus while closing (the watch tasks, the control
#: endpoints, the connection): a broker gone or frozen never answers.
CLOSE_STEP_S = 0.5


class BusLink:
    """Connects an `EdgeNode` to the bus and keeps it connected. Async context manager.

    Args:
        node: the node to serve.
        reload_model: `async (args) -> info` doing the `reload-model` verb.
        software_version: reported in heartbeats.
        apply_experiment: `async (value) -> None` putting the `experiment` key of
            `hg_config` in force (None: deleted); without it the value is ignored.
    """

    def __init__(
        self,
        node: EdgeNode,
        *,
        reload_model: ReloadModel,
        software_version: str = "",
        apply_experiment: ApplyExperiment | None = None,
    ) -> None:
        self.node = node
        self.settings = node.settings
        self.reload_model = reload_model
        self.apply_experiment = apply_experiment
        self.software_version = software_version
        self.nc: Client | None = None
        self.telemetry: Telemetry | None = None
        self.fleet_policy: dict[str, Any] | None = None
        self.node_policy: dict[str, Any] | None = None
        self._control: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.policy_updates = 0
        #: The API's key limits: the fleet config's `limits` is put in force on them, and
        #: their usage goes in heartbeats (None: no API).
        self.key_limits: Limits | None = None
        self._connect_failures = 0
        #: The (settings, fleet, node) policy layers the node runs with (the last valid ones).
        self._applied_layers: tuple[dict[str, Any] | None, ...] = (
            self.settings.policy,
            None,
            None,
        )

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect now if possible, else keep trying in the background."""
        if self.settings.no_cloud:
            logger.info("no_cloud: the bus is not used")
            return
        if not await self._try_connect():
            self._spawn(self._reconnect_loop(), "hg-edge-reconnect")

    async def close(self) -> None:
        """Stop everything (idempotent), within about `4 * CLOSE_STEP_S` broker or not."""
        if self._closed:
            return
        self._closed = True
        self.node.nc = None
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # a KV watch can swallow its cancel while the broker is away
            done, _ = await asyncio.wait(self._tasks, timeout=CLOSE_STEP_S)
            for task in done:  # retrieved: a watch that failed on its way out is no news
                _ = task.cancelled() or task.exception()
        self._tasks.clear()
        if self.telemetry is not None:
            await self.telemetry.close()
        if self._control is not None:
            await bounded(self._control.stop(), CLOSE_STEP_S, "edge control endpoints: stop")
        await close_bounded(self.nc, 2 * CLOSE_STEP_S)
        self.nc = None

    async def __aenter__(self) -> BusLink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _reconnect_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.settings.reconnect_s)
            if await self._try_connect():
                return

    async def _try_connect(self) -> bool:
        try:
            nc = await connect_settings(self.settings.bus(), name=f"hybridgen-{self.node.node_id}")
        except HybridgenError as exc:
            level = logging.DEBUG if self._connect_failures else logging.WARNING
            self._connect_failures += 1
            logger.log(level, "bus unavailable (%s); serving locally, retrying", exc.message)
            return False
        self.nc = nc
        self.node.nc = nc
        logger.info("connected to the bus at %s", nc.connected_url)
        await self._start_services(nc)
        return True

    async def _start_services(self, nc: Client) -> None:
        node_id = self.node.node_id
        self.telemetry = Telemetry(
            nc,
            role="edge",
            node_id=node_id,
            build_heartbeat=self.heartbeat,
            interval=self.settings.telemetry_interval_s,
        )
        await self.telemetry.start()
        self.node.set_event_sink(self._publish_event)
        handlers: dict[str, ControlHandler] = {
            "drain": self._on_drain,
            "resume": self._on_resume,
            "reload-model": self._on_reload,
            "set-policy": self._on_set_policy,
        }
        try:
            self._control = await serve_control(
                nc, node_id=node_id, role="edge", handlers=handlers, name=EDGE_SERVICE
            )
        except Exception as exc:
            logger.warning("control endpoints not registered: %s", exc)
        self._spawn(self._watch_policy(nc), "hg-edge-policy")
        if self.key_limits is not None:
            self._spawn(self.key_limits.watch(nc, self.settings.reconnect_s), "hg-edge-limits")
        if self.apply_experiment is not None:
            self._spawn(self._watch_experiment(nc, self.apply_experiment), "hg-edge-experiment")

    # -------------------------------------------------------------------- policy

    async def _watch_policy(self, nc: Client) -> None:
        """Apply the fleet and node policy from the KV bucket, now and on every change."""
        from broker.store import FleetConfig

        while not self._closed:
            try:
                config = await FleetConfig.open(nc)
                for key in (subjects.policy_key(), subjects.policy_key(self.node.node_id)):
                    with contextlib.suppress(BadRequest):  # not JSON: the watch skips it too
                        self._set_layer(key, await config.get(key))
                async for key, value in config.watch("policy.>"):
                    self._set_layer(key, value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("policy watch failed (%s); retrying", exc)
            await asyncio.sleep(self.settings.reconnect_s)

    async def _watch_experiment(self, nc: Client, apply: ApplyExperiment) -> None:
        """Put the A/B experiment of the KV bucket in force, now and on every change."""
        from broker.store import FleetConfig

        while not self._closed:
            try:
                config = await FleetConfig.open(nc)
                await apply(await config.get(EXPERIMENT_KEY))
                async for _key, value in config.watch(EXPERIMENT_KEY):
                    await apply(value)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("experiment watch failed (%s); retrying", exc)
            await asyncio.sleep(self.settings.reconnect_s)

    def effective_policy(self, extra: dict[str, Any] | None = None) -> PolicySettings:
        return merge_policy(self.settings.policy, self.fleet_policy, self.node_policy, extra)

    def _set_layer(self, key: str, value: dict[str, Any] | None) -> None:
        """Put a KV key's value in force: the fleet's, or this node's override (not others)."""
        if key == subjects.policy_key():
            self.fleet_policy = value
        elif key == subjects.policy_key(self.node.node_id):
            self.node_policy = value
        else:
            return
        self._apply_policy()

    def _apply_policy(self) -> None:
        """Put the fleet and node layers in force. A layer that makes the policy invalid is
        refused and keeps its last valid value: a bad KV value must not take the node down,
        nor block the other key's later changes."""
        try:
            policy = self.effective_policy()
        except Exception as exc:
            logger.error("ignoring invalid routing policy from the KV bucket: %s", exc)
            _, self.fleet_policy, self.node_policy = self._applied_layers
            return
        self.policy_updates += 1
        self._applied_layers = (self.settings.policy, self.fleet_policy, self.node_policy)
        self.node.set_policy(policy)

    # ------------------------------------------------------------------ telemetry

    def heartbeat(self) -> wire.Heartbeat:
        node = self.node
        runtime = node.runtime
        snapshot = node.counters.stats.snapshot()
        total = sum(node.counters.by_reason.values()) or 1
        cloud_reasons = {
            reason: count / total
            for reason, count in node.counters.by_reason.items()
            if reason in CLOUD_ROUTE_REASONS
        }
        status = "draining" if node.draining else "ready"
        if node.breaker.state != "closed" and status == "ready":
            status = "degraded"
        return wire.Heartbeat(
            role="edge",
            node_id=node.node_id,
            version=self.software_version,
            status=status,  # type: ignore[arg-type]
            model=node.settings.edge_model_name,
            model_version=runtime.version,
            queue_depth=runtime.queue_depth,
            in_flight=runtime.in_flight,
            rps=float(snapshot.get("rps", 0.0)),
            latency_p50_ms=snapshot.get("latency_p50_ms"),
            latency_p95_ms=snapshot.get("latency_p95_ms"),
            tokens_per_s=float(snapshot.get("tokens_per_s", 0.0)),
            fallback_ratio=cloud_reasons,
            errors=int(snapshot.get("errors", 0)) + node.counters.errors,
            extra={
                "breaker": node.breaker.state,
                "api_url": node.settings.advertise_url,
                "routes": dict(node.counters.by_reason),
                "cloud_failures": node.counters.cloud_failures,
                "mid_stream_recoveries": node.counters.mid_stream_recoveries,
                "predicted_wait_ms": round(runtime.estimate_wait_s() * 1e3, 3),
                "per_token_ms": round(runtime.per_token_s * 1e3, 4),
                "draft_tokens": runtime.draft_tokens,
                "accepted_tokens": runtime.accepted_tokens,
                "draft_acceptance": runtime.draft_acceptance,
                "perplexity_threshold": node.perplexity_threshold,
                "perplexity_threshold_source": node.threshold_source,
                "calibrated_threshold": node.calibrated_threshold,
                "policy": self.policy_in_force(),
                # Usage by key name and model since start (`serving.usage`).
                "usage": {} if self.key_limits is None else self.key_limits.usage.snapshot(),
                # The A/B experiment in force and each variant's figures (edge.route.experiments).
                **node.experiments.snapshot(),
            },
        )

    def policy_in_force(self) -> dict[str, dict[str, Any]]:
        """Each routing value in force and its source (`fleet.policy.policy_sources`).

        The perplexity threshold is the one requests are routed with: the model set's
        calibrated one (source `model_set`) when no layer sets it; `inf` means off. With
        the model set's threshold in force, `routing_signal` names the calibrated signal it
        applies (`EdgeNode.routing_signal`; a length-normalised signal's threshold is
        shown at its reference length).
        """
        sources = policy_sources(*self._applied_layers)
        node = self.node
        threshold = sources["perplexity_threshold"]
        threshold["value"] = node.perplexity_threshold
        if node.threshold_source == "model_set":
            threshold["source"] = "model_set"
            signal = node.routing_signal
            if signal is not None:
                sources["routing_signal"] = {"value": signal, "source": "model_set"}
        return sources

    def _publish_event(self, kind: str, message: str, request_id: str | None, **data: Any) -> None:
        if self.telemetry is None:
            return
        task = asyncio.ensure_future(
            self.telemetry.publish_event(kind, message, request_id=request_id, **data)
        )
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    # -------------------------------------------------------------------- control

    async def _on_drain(self, request: wire.ControlRequest) -> wire.ControlReply:
        self.node.draining = True
        self._publish_event("drain", "draining: new requests are refused", None)
        return wire.ControlReply(ok=True, message="draining", data=self._state())

    async def _on_resume(self, request: wire.ControlRequest) -> wire.ControlReply:
        self.node.draining = False
        self._publish_event("resume", "taking requests again", None)
        return wire.ControlReply(ok=True, message="resumed", data=self._state())

    async def _on_reload(self, request: wire.ControlRequest) -> wire.ControlReply:
        info = await self.reload_model(dict(request.args))
        self._publish_event("rollout", f"model now {info.get('model_version')}", None, **info)
        return wire.ControlReply(ok=True, message="model swapped", data=info)

    async def _on_set_policy(self, request: wire.ControlRequest) -> wire.ControlReply:
        """Check `args` and apply them over this node's override, in memory.

        The node never writes the fleet config: the operator side stores the override
        (`policy.node.<node_id>`, `hybridgen fleet set-policy`), and the watch applies it.
        The reply's `override` is the override now in force.
        """
        args = dict(request.args)
        merged_override = {**(self.node_policy or {}), **args}
        try:
            policy = self.effective_policy(args)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            field = ".".join(str(part) for part in first["loc"])
            raise BadRequest(f"invalid policy: {field}: {first['msg']}", param=field) from None
        self.node_policy = merged_override
        self._apply_policy()
        data = {
            **policy.model_dump(),
            "effective_perplexity_threshold": self.node.perplexity_threshold,
            "perplexity_threshold_source": self.node.threshold_source,
            "override": merged_override,
        }
        return wire.ControlReply(ok=True, message="policy set", data=data)

    def _state(self) -> dict[str, Any]:
        return {
            "draining": self.node.draining,
            "in_flight": self.node.runtime.in_flight,
            "model_version": self.node.runtime.version,
        }
