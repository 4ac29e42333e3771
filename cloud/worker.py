"""The cloud generation worker: an `Engine` served on `hg.gen.<model>` over NATS.

Several workers (processes or machines) share the queue group `cloud.<model>` with no other
coordination. Each one:

* admits a request only when its bounded queue has room, by requests and by tokens
  (prompt + max_tokens); otherwise it answers `overloaded` at once — before the accept
  chunk — so the caller can go elsewhere;
* streams `Chunk`s as tokens come out of the running batch, then `Done`;
* honours the request's deadline (`timeout_ms`, counted from when the worker received it): a
  request whose deadline passed before admission is refused with `timeout`; one running when
  it passes is stopped (an `Error` coded `timeout`, reported as an `error` event; the engine
  frees the sequence); `hg.cancel.<request_id>` stops it likewise, unreported;
* publishes a heartbeat every second, a `request` event per served request and an `error`
  event per failed one;
* on SIGTERM stops taking requests, lets in-flight ones finish within `drain_timeout_s`,
  then exits at most 5 s later, whether or not the broker answers (each step on the
  bus is bounded: `broker.bus.bounded`). A crash inside one request answers it `internal`;
  the worker stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from nats.aio.client import Client

from broker import wire
from broker.bus import GenerationService, Responder, bounded, close_bounded, serve_control
from broker.errors import (
    HybridgenError,
    Overloaded,
    Timeout,
    Unavailable,
)
from broker.service import SOFTWARE_VERSION
from broker.telemetry import Telemetry, default_node_id
from cloud.engine import Delta, Engine, EngineConfig
from cloud.prompts import input_field, prompt_ids_of
from cloud.settings import WorkerSettings
from cloud.spans import WorkerSpans
from serving import tracing
from serving.context import settle_max_tokens
from serving.drafts import DraftSettings
from serving.grammar import Grammar
from serving.sampling import SamplingParams

logger = logging.getLogger(__name__)

ROLE = "cloud"
#: Longest wait for one step on the bus while stopping (leaving the queue group, stopping
#: the control endpoints, closing the connection): a broker gone or frozen never answers.
BUS_STEP_S = 0.5


def resolve_model_dir(settings: WorkerSettings) -> tuple[Path, Path | None, str | None]:
    """(checkpoint dir, tokenizer dir or None, model version) to load.

    Raises:
        NotFound: no model set is installed and no `model_dir` was given.
    """
    if settings.model_dir is not None:
        return Path(settings.model_dir), None, Path(settings.model_dir).name
    from models.registry import resolve

    model_set = resolve(settings.model_set)
    return model_set.cloud_dir, None, model_set.version


class CloudWorker:
    """One worker process's serving state. Async context manager; `close()` is idempotent.

    Args:
        nc: a connected NATS client.
        settings: the worker's settings.
        engine: an already loaded engine (tests share one); loaded from settings otherwise.
    """

    def __init__(self, nc: Client, settings: WorkerSettings, engine: Engine | None = None) -> None:
        self.nc = nc
        self.settings = settings
        self.node_id = settings.node_id or default_node_id(ROLE)
        self.engine = engine
        self._own_engine = engine is None
        self.model_version: str | None = None
        self.service: GenerationService | None = None
        self.telemetry: Telemetry | None = None
        self._control: Any = None
        self.status: wire.NodeStatus = "starting"
        self.admitted = 0
        self.admitted_tokens = 0
        self.queued = 0
        self.tokens_out = 0
        self._tracing = False
        self._closed = False

    # ----------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load the model (in a thread), start batching, then serve and publish telemetry."""
        self.status = "loading"
        self._tracing = tracing.start(tracing.WORKER, self.node_id)  # OTLP export, when set
        if self.engine is None:
            model_dir, tokenizer_dir, self.model_version = resolve_model_dir(self.settings)
            config = EngineConfig(
                max_batch_requests=self.settings.max_batch_requests,
                max_batch_tokens=self.settings.max_batch_tokens,
                cache_tokens=self.settings.cache_tokens,
                threads=self.settings.threads,
                device=self.settings.device,
                drafting=DraftSettings(
                    tokens=self.settings.draft_tokens if self.settings.speculative else 0,
                    min_match=self.settings.draft_min_match,
                ),
                verify_tokens=self.settings.verify_tokens,
            )
            self.engine = await asyncio.to_thread(
                Engine.load, model_dir, tokenizer_dir=tokenizer_dir, config=config
            )
        elif self.engine.model_dir is not None:
            self.model_version = self.engine.model_dir.name
        self.engine.start()
        self.telemetry = Telemetry(
            self.nc,
            role=ROLE,
            node_id=self.node_id,
            build_heartbeat=self.heartbeat,
            interval=self.settings.heartbeat_s,
        )
        self.service = GenerationService(
            self.nc,
            model=self.settings.model,
            handler=self.handle,
            node_id=self.node_id,
            metadata={"role": ROLE, "model_version": self.model_version or ""},
            auto_accept=False,
        )
        await self.service.start()
        self._control = await serve_control(
            self.nc,
            node_id=self.node_id,
            role=ROLE,
            handlers={"drain": self._on_drain, "resume": self._on_resume},
        )
        self.status = "ready"
        await self.telemetry.start()
        logger.info(
            "cloud worker %s ready: model %s (%s) on %s",
            self.node_id,
            self.settings.model,
            self.model_version,
            self.engine.device,
        )

    async def drain(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Stop taking requests and wait up to `timeout` s for in-flight ones; True if idle."""
        timeout = self.settings.drain_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.status = "draining"
        if self.telemetry is not None:
            await self.telemetry.publish_event("drain", f"{self.node_id} draining")
            await self.telemetry.publish_heartbeat()
        if self.service is None:
            return True
        # Leaving the queue group flushes, and counts in the drain bound. A broker that
        # answers lets it finish (cut short, the group could still route requests here that
        # no one answers); one gone or frozen costs the bound at most.
        await bounded(
            self.service.stop_accepting(),
            max(BUS_STEP_S, deadline - time.monotonic()),
            f"{self.node_id}: stop accepting",
        )
        idle = await self.service.wait_idle(max(0.0, deadline - time.monotonic()))
        if not idle:
            logger.warning("drain: %d requests still in flight after %gs", self.admitted, timeout)
        return idle

    async def close(self) -> None:
        """Stop serving, cancel what is left, stop the engine. Idempotent.

        Each step on the bus waits `BUS_STEP_S` at most: with the broker gone the worker
        still stops (the connection itself is the caller's, see `run_worker`).
        """
        if self._closed:
            return
        self._closed = True
        self.status = "stopped"
        if self.telemetry is not None:
            await self.telemetry.publish_heartbeat()
            await self.telemetry.close()
        if self._control is not None:
            await bounded(self._control.stop(), BUS_STEP_S, f"{self.node_id}: stop control")
        if self.service is not None:
            if self.service.accepting:
                await bounded(
                    self.service.stop_accepting(), BUS_STEP_S, f"{self.node_id}: stop accepting"
                )
            await bounded(self.service.close(), BUS_STEP_S, f"{self.node_id}: stop serving")
        if self.engine is not None and self._own_engine:
            await asyncio.to_thread(self.engine.close)
        if self._tracing:  # the last spans, within `tracing.FLUSH_BOUND_S`
            await tracing.stop(tracing.WORKER)

    async def __aenter__(self) -> CloudWorker:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _on_drain(self, request: wire.ControlRequest) -> wire.ControlReply:
        timeout = float(request.args.get("timeout_s", self.settings.drain_timeout_s))
        idle = await self.drain(timeout)
        return wire.ControlReply(ok=True, message="drained" if idle else "draining",
                                 data={"in_flight": self.admitted})  # fmt: skip

    async def _on_resume(self, request: wire.ControlRequest) -> wire.ControlReply:
        if self.service is not None:
            await self.service.resume()
        self.status = "ready"
        return wire.ControlReply(ok=True, message="resumed")

    # ------------------------------------------------------------------------ serving

    def _admit(self, cost: int) -> None:
        settings = self.settings
        if self.admitted >= settings.max_queue_requests:
            raise Overloaded(
                f"{self.node_id}: queue full ({self.admitted} requests)",
                retry_after=settings.retry_after_s,
            )
        if self.admitted and self.admitted_tokens + cost > settings.max_queue_tokens:
            raise Overloaded(
                f"{self.node_id}: queue full ({self.admitted_tokens} tokens admitted)",
                retry_after=settings.retry_after_s,
            )
        self.admitted += 1
        self.admitted_tokens += cost
        self.queued += 1

    async def handle(self, request: wire.GenerateRequest, responder: Responder) -> None:
        """Serve one `GenerateRequest` (the service calls it in its own task), in its spans
        (`cloud.spans`)."""
        spans = WorkerSpans(request, responder, self.node_id)
        with tracing.ending(spans.span):
            try:
                await self._serve(request, responder, spans)
            finally:
                spans.close()

    async def _serve(
        self, request: wire.GenerateRequest, responder: Responder, spans: WorkerSpans
    ) -> None:
        engine = self.engine
        if engine is None or not engine.healthy:
            # Leave the queue group so the other workers take the traffic.
            self.status = "degraded"
            if self.service is not None and self.service.accepting:
                asyncio.get_running_loop().create_task(self.service.stop_accepting())
            raise Unavailable(f"{self.node_id}: the generation engine is not running")
        try:
            await self._handle_until_deadline(engine, request, responder, spans)
        except HybridgenError as exc:
            if self.telemetry is not None and exc.code.value not in ("overloaded", "cancelled"):
                await self.telemetry.publish_event(
                    "error", exc.message, request_id=request.request_id, code=exc.code.value
                )
            raise
        except Exception as exc:
            if self.telemetry is not None:
                await self.telemetry.publish_event(
                    "error", f"{type(exc).__name__}: {exc}", request_id=request.request_id,
                    code="internal",
                )  # fmt: skip
            raise

    async def _handle_until_deadline(
        self, engine: Engine, request: wire.GenerateRequest, responder: Responder,
        spans: WorkerSpans,
    ) -> None:  # fmt: skip
        """`_handle` within the request's deadline, counted from when it arrived. Past it the
        request fails with `timeout`, a failure like any other (its `error` event is
        published), not a silent cancel."""
        if request.timeout_ms is None:
            await self._handle(engine, request, responder, spans)
            return
        loop = asyncio.get_running_loop()
        left_s = responder.received_at + request.timeout_ms / 1e3 - time.monotonic()
        deadline = asyncio.timeout_at(loop.time() + left_s)
        try:
            async with deadline:
                await self._handle(engine, request, responder, spans)
        except (TimeoutError, asyncio.CancelledError):
            # Past the deadline it timed out, even when another cancel came in the same
            # tick (the service's own backstop at about the same time, say).
            if not deadline.expired():
                raise  # the refusal before admission, a timeout of its own, a cancel
            raise Timeout(
                f"request {request.request_id} exceeded its timeout of {request.timeout_ms} ms"
            ) from None

    async def _handle(
        self, engine: Engine, request: wire.GenerateRequest, responder: Responder,
        spans: WorkerSpans,
    ) -> None:  # fmt: skip
        grammar = Grammar.from_wire(request.grammar)
        if grammar is not None:
            # Checked before admission (off the loop: compiling costs time): a bus client
            # need not have passed the HTTP checks, and a grammar llguidance refuses must be
            # a `bad_request`, not a failure inside a batch.
            await asyncio.to_thread(grammar.check, "grammar")
        prompt_ids = prompt_ids_of(engine, request)
        window, field = engine.context_length, input_field(request)
        cap = self.settings.max_tokens_cap
        max_tokens = settle_max_tokens(
            request.max_tokens, len(prompt_ids), window, cap=cap, input_field=field
        )
        _check_deadline(request, responder)
        cost = len(prompt_ids) + max_tokens
        self._admit(cost)
        admitted = time.monotonic()
        ttft_ms: float | None = None
        waiting = True
        try:
            await responder.accept()
            sampling = SamplingParams.from_wire(request, max_tokens)
            async for delta in engine.generate(
                request.request_id, prompt_ids, sampling, grammar=grammar,
                timeline=spans.submitted(),
            ):  # fmt: skip
                if waiting:
                    waiting = False
                    spans.first_token()
                    self.queued -= 1
                    ttft_ms = (time.monotonic() - admitted) * 1e3
                    logger.debug("%s: first token after %.1f ms", request.request_id, ttft_ms)
                self.tokens_out += len(delta.token_ids)
                if delta.text or delta.token_ids:
                    await _send_chunk(responder, delta)
                if delta.finish_reason is not None:
                    spans.finished(delta.finish_reason, delta.prompt_tokens,
                                   delta.completion_tokens)  # fmt: skip
                    await responder.done(
                        delta.finish_reason,
                        wire.Usage(
                            prompt_tokens=delta.prompt_tokens,
                            completion_tokens=delta.completion_tokens,
                            draft_tokens=delta.draft_tokens,
                            accepted_tokens=delta.accepted_tokens,
                        ),
                        model_version=self.model_version,
                    )
                    await self._publish_request(
                        request, delta, ttft_ms, (time.monotonic() - admitted) * 1e3,
                        spans.trace_id,
                    )  # fmt: skip
                    return
        finally:
            if waiting:
                self.queued -= 1
            self.admitted -= 1
            self.admitted_tokens -= cost

    async def _publish_request(
        self,
        request: wire.GenerateRequest,
        last: Delta,
        ttft_ms: float | None,
        total_ms: float,
        trace_id: str | None = None,
    ) -> None:
        """Log a served request at INFO and publish it as a `request` event: who asked,
        timings, tokens, the OpenTelemetry `trace_id` (when it has one), never the text.
        Timings count from admission: `ttft_ms` to the first output (queue + prefill + first
        token), `total_ms` to the `Done`.
        """
        logger.info(
            "request %s from %s served: %d prompt + %d completion tokens, %s, %.0f ms",
            request.request_id, request.origin or "an unnamed caller", last.prompt_tokens,
            last.completion_tokens, last.finish_reason, total_ms,
        )  # fmt: skip
        if self.telemetry is None:
            return
        await self.telemetry.publish_event(
            "request",
            f"served for {request.origin or 'an unnamed caller'}: {last.finish_reason}, "
            f"{total_ms:.0f} ms",
            request_id=request.request_id,
            origin=request.origin,
            model=request.model,
            model_version=self.model_version,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason,
            ttft_ms=None if ttft_ms is None else round(ttft_ms, 3),
            total_ms=round(total_ms, 3),
            **({} if trace_id is None else {"trace_id": trace_id}),
        )

    def heartbeat(self) -> wire.Heartbeat:
        """This worker's current heartbeat."""
        stats = self.service.stats.snapshot() if self.service is not None else {}
        engine = self.engine
        if self.status == "ready" and engine is not None and not engine.healthy:
            self.status = "degraded"
        return wire.Heartbeat(
            role=ROLE,
            node_id=self.node_id,
            version=SOFTWARE_VERSION,
            status=self.status,
            model=self.settings.model,
            model_version=self.model_version,
            queue_depth=self.queued,
            in_flight=self.admitted,
            rps=stats.get("rps", 0.0),
            latency_p50_ms=stats.get("latency_p50_ms"),
            latency_p95_ms=stats.get("latency_p95_ms"),
            tokens_per_s=stats.get("tokens_per_s", 0.0),
            errors=stats.get("errors", 0),
            extra={
                "device": str(engine.device) if engine is not None else None,
                "context_length": engine.context_length if engine is not None else None,
                "admitted_tokens": self.admitted_tokens,
                "max_queue_requests": self.settings.max_queue_requests,
                "max_queue_tokens": self.settings.max_queue_tokens,
                "tokens_out_total": self.tokens_out,
            },
        )


async def run_worker(settings: WorkerSettings, nats_url: str | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT, then drain and exit (the CLI's entry).

    After the signal it exits within `drain_timeout_s` + 5 s, broker or no broker (or is
    ended by a watchdog with status 1, `serving.stopping`).
    """
    import signal

    from broker.bus import connect_settings
    from broker.settings import BusSettings
    from serving.stopping import CLOSE_BOUND_S, start_exit_watchdog

    # `--nats URL` replaces only the URL: credentials and TLS still come from HG_NATS_*.
    bus = BusSettings(url=nats_url) if nats_url else BusSettings()
    nc = await connect_settings(bus, name="hybridgen-cloud-worker")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with CloudWorker(nc, settings) as worker:
            await stop.wait()
            logger.info("signal received: draining (up to %gs)", settings.drain_timeout_s)
            start_exit_watchdog("cloud worker", settings.drain_timeout_s + CLOSE_BOUND_S)
            await worker.drain()
    finally:
        await close_bounded(nc, 2 * BUS_STEP_S)
    return 0


def _check_deadline(request: wire.GenerateRequest, responder: Responder) -> None:
    """Raise `Timeout` when the request's deadline passed while it waited for admission."""
    if request.timeout_ms is None:
        return
    waited_ms = (time.monotonic() - responder.received_at) * 1e3
    if waited_ms >= request.timeout_ms:
        raise Timeout(
            f"request {request.request_id} reached its deadline of "
            f"{request.timeout_ms} ms before admission"
        )


async def _send_chunk(responder: Responder, delta: Delta) -> None:
    """One delta's text and tokens as a reply chunk (with their log-probabilities, if any)."""
    scored = delta.logprobs
    await responder.chunk(
        delta.text,
        delta.token_ids,
        None if scored is None else [lp for _, lp, _ in scored],
        tokens=None if scored is None else [t for t, _, _ in scored],
        top_logprobs=None if scored is None else [top for _, _, top in scored],
    )
