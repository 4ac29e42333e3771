"""The serving side of the bus: generation services and control endpoints (nats.micro).

`GenerationService` answers `hg.gen.<model>` in queue group `cloud.<model>`, so workers
scale by starting more of them; it registers with `nats.micro`, so `$SRV.PING/INFO/STATS`
list it. nats.micro runs a subscription's handler one message at a time, so each request
gets its own task. A request is answered with a coded `wire.Error` whatever goes wrong
(malformed input, handler failure, timeout); the service itself never stops on bad input.

Every service here is registered with `broker.inbox_only.add_service`: it answers only reply
subjects that are inboxes, its nats.micro `$SRV` discovery handlers included.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from types import TracebackType
from typing import Any

import msgpack
from nats import micro
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import Request

from broker import subjects, wire
from broker.errors import (
    BadRequest,
    Cancelled,
    HybridgenError,
    Internal,
    Overloaded,
    Timeout,
    Unavailable,
)
from broker.inbox_only import add_service, answerable, stop_service
from broker.permissions import WORKER_SERVICE
from broker.telemetry import RequestStats

log = logging.getLogger(__name__)


def _software_version() -> str:
    try:
        return package_version("hybridgen")
    except PackageNotFoundError:
        return "0.0.0"


SOFTWARE_VERSION = _software_version()


class Responder:
    """Sends the replies of one request, numbering them.

    The service sends the accept chunk (`seq` 0) before calling the handler (unless it was
    created with `auto_accept=False`), so the handler's first `chunk()` is `seq` 1.

    Attributes:
        request_id: the request's id.
        received_at: `time.monotonic()` when the request arrived.
        finished: True once `done()` or `error()` was sent.
        completion_tokens: token ids sent so far (counted from `chunk(token_ids=...)`).
        request_headers: the request message's NATS headers (the caller's trace context).
        reply_headers: headers sent with every reply from now on (the worker's trace context).
    """

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        request_id: str,
        *,
        node_id: str | None = None,
        received_at: float | None = None,
        request_headers: dict[str, str] | None = None,
    ) -> None:
        self._send = send
        self.request_id = request_id
        self.node_id = node_id
        self.received_at = time.monotonic() if received_at is None else received_at
        self.finished = False
        self.completion_tokens = 0
        self.request_headers = request_headers or {}
        self.reply_headers: dict[str, str] | None = None
        self._seq = 0

    @property
    def accepted(self) -> bool:
        return self._seq > 0

    def _check_open(self) -> None:
        if self.finished:
            raise RuntimeError(f"stream of request {self.request_id} already finished")

    async def accept(self) -> None:
        """Send the accept chunk (`seq` 0, no text) if nothing was sent yet."""
        if not self.accepted and not self.finished:
            await self.chunk()

    async def chunk(
        self,
        text: str = "",
        token_ids: Sequence[int] = (),
        logprobs: Sequence[float] | None = None,
        *,
        tokens: Sequence[str] | None = None,
        top_logprobs: Sequence[Sequence[tuple[str, float]]] | None = None,
    ) -> None:
        """Send the next `Chunk` (its `seq` is assigned here); `tokens` and `top_logprobs`:
        the scored tokens' texts and their steps' most likely (text, log-prob) pairs."""
        self._check_open()
        message = wire.Chunk(
            request_id=self.request_id,
            seq=self._seq,
            text=text,
            token_ids=list(token_ids),
            logprobs=list(logprobs) if logprobs is not None else None,
            tokens=list(tokens) if tokens is not None else None,
            top_logprobs=None
            if top_logprobs is None
            else [[wire.TopLogprob(token=t, logprob=lp) for t, lp in top] for top in top_logprobs],
        )
        self._seq += 1
        self.completion_tokens += len(token_ids)
        await self._send(wire.encode(message))

    async def done(
        self,
        finish_reason: wire.FinishReason,
        usage: wire.Usage,
        *,
        model_version: str | None = None,
    ) -> None:
        """End the stream successfully."""
        self._check_open()
        self.finished = True
        message = wire.Done(
            request_id=self.request_id,
            seq=self._seq,
            finish_reason=finish_reason,
            usage=usage,
            served_by=self.node_id,
            model_version=model_version,
        )
        self.completion_tokens = usage.completion_tokens
        await self._send(wire.encode(message))

    async def error(self, exc: HybridgenError) -> None:
        """End the stream with a coded error."""
        self._check_open()
        self.finished = True
        message = wire.Error.from_exception(exc, self.request_id)
        message.seq = self._seq
        await self._send(wire.encode(message))


GenerateHandler = Callable[[wire.GenerateRequest, Responder], Awaitable[None]]


def _request_id_of(data: bytes) -> str | None:
    """Best-effort request id of a payload that failed validation (for the error reply)."""
    with contextlib.suppress(Exception):
        obj = msgpack.unpackb(data, raw=False)
        if isinstance(obj, dict):
            rid = obj.get("request_id")
            if isinstance(rid, str) and 0 < len(rid) <= 64:
                return rid
    return None


def _str_metadata(metadata: dict[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (metadata or {}).items()}


class GenerationService:
    """Serves `hg.gen.<model>` for one model, one task per request.

    Async context manager; `close()` is idempotent and awaits the tasks it cancels.

    Args:
        nc: a connected client.
        model: model name (a subject token), e.g. `hg-cloud`.
        handler: `async (request, responder)`; it streams with `responder.chunk()` and ends
            with `responder.done()` (or raises a `HybridgenError`).
        node_id: this worker's id, sent as `Done.served_by`.
        name: nats.micro service name (`$SRV.INFO.<name>`).
        version: service version (semver).
        metadata: extra nats.micro metadata (values become strings).
        max_in_flight: refuse with `overloaded` at once beyond this many requests.
        auto_accept: send the accept chunk before calling the handler.

    Attributes:
        stats: `RequestStats` of the requests served (latency from receipt to the end).
    """

    def __init__(
        self,
        nc: Client,
        *,
        model: str,
        handler: GenerateHandler,
        node_id: str,
        name: str = WORKER_SERVICE,
        version: str = SOFTWARE_VERSION,
        metadata: dict[str, Any] | None = None,
        max_in_flight: int | None = None,
        auto_accept: bool = True,
    ) -> None:
        self.nc = nc
        self.model = subjects.token(model, what="model")
        self.subject = subjects.gen(model)
        self.queue_group = subjects.queue_group(model)
        self.handler = handler
        self.node_id = subjects.token(node_id, what="node_id")  # it answers as this node
        self.name = name
        self.version = version
        self.metadata = {"node_id": node_id, "model": model, **_str_metadata(metadata)}
        self.max_in_flight = max_in_flight
        self.auto_accept = auto_accept
        self.stats = RequestStats()
        self.service: micro.Service | None = None
        self._cancel_sub: Subscription | None = None
        self._tasks: dict[str, set[asyncio.Task[None]]] = {}
        self._accepting = False
        self._closed = False

    @property
    def in_flight(self) -> int:
        return sum(len(tasks) for tasks in self._tasks.values())

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def start(self) -> None:
        """Subscribe to cancels, then register the service and start taking requests."""
        if self._cancel_sub is None:
            self._cancel_sub = await self.nc.subscribe(subjects.CANCEL_ALL, cb=self._on_cancel)
        await self.resume()

    async def resume(self) -> None:
        """Take requests again after `stop_accepting()`."""
        if self._closed or self.service is not None:
            return
        # Accepting before subscribing: a request the broker routes here while the
        # subscription is being confirmed is served, not refused as "draining".
        self._accepting = True
        try:
            service = await add_service(
                self.nc, name=self.name, version=self.version, metadata=self.metadata
            )
            await service.add_endpoint(
                name="generate",
                subject=self.subject,
                queue_group=self.queue_group,
                handler=self._on_request,
                metadata={"model": self.model},
            )
            self.service = service
            await self.nc.flush()
        except BaseException:
            self._accepting = self.service is not None
            raise
        log.info("%s serving %s in queue group %s", self.node_id, self.subject, self.queue_group)

    async def stop_accepting(self) -> None:
        """Drain: take no new requests; those already routed here are served (`stop_service`)."""
        service, self.service = self.service, None
        if service is not None:
            await stop_service(service)
            log.info("%s stopped accepting on %s", self.node_id, self.subject)
        self._accepting = False

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait up to `timeout` seconds for in-flight requests to finish; True if none left."""
        deadline = time.monotonic() + timeout
        while self._tasks:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            pending = set().union(*self._tasks.values())
            await asyncio.wait(pending, timeout=left)
        return True

    async def close(self) -> None:
        """Stop accepting, cancel what is in flight, unsubscribe. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self.stop_accepting()
        tasks = set().union(*self._tasks.values()) if self._tasks else set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        sub, self._cancel_sub = self._cancel_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_request(self, request: Request) -> None:
        received_at = time.monotonic()
        data = request.data
        if not reply_subject(request):  # none, or not an inbox (`answerable` logged it)
            log.warning("%s: request without an inbox to reply to ignored", self.subject)
            return
        try:
            generate = wire.decode(data, wire.GenerateRequest)
            if not subjects.is_token(generate.request_id):
                raise BadRequest(
                    "invalid field 'request_id': use letters, digits, '-' or '_'",
                    param="request_id",
                )
            if not self._accepting:
                raise Unavailable(f"{self.node_id} is draining", retry_after=1.0)
            if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
                raise Overloaded(
                    f"{self.node_id} has {self.in_flight} requests in flight", retry_after=1.0
                )
        except HybridgenError as exc:
            self.stats.record(time.monotonic() - received_at, error=True)
            log.info("%s: refused request: %s", self.subject, exc.message)
            with contextlib.suppress(Exception):
                await request.respond(wire.error_reply(exc, _request_id_of(data)))
            return
        responder = Responder(
            lambda data: request.respond(data, headers=responder.reply_headers),
            generate.request_id,
            node_id=self.node_id,
            received_at=received_at,
            request_headers=request.headers,
        )
        task = asyncio.create_task(
            self._run(generate, responder), name=f"hg-gen-{generate.request_id}"
        )
        self._tasks.setdefault(generate.request_id, set()).add(task)
        task.add_done_callback(functools.partial(self._forget, generate.request_id))

    def _forget(self, request_id: str, task: asyncio.Task[None]) -> None:
        tasks = self._tasks.get(request_id)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._tasks[request_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("request %s: could not reply: %r", request_id, task.exception())

    async def _run(self, request: wire.GenerateRequest, responder: Responder) -> None:
        failed = True
        try:
            if self.auto_accept:
                await responder.accept()
            budget = request.timeout_ms / 1000 if request.timeout_ms else None
            try:
                async with asyncio.timeout(budget):
                    await self.handler(request, responder)
            except TimeoutError as exc:
                if isinstance(exc, HybridgenError):
                    raise
                raise Timeout(f"request exceeded its timeout of {request.timeout_ms} ms") from None
            if not responder.finished:
                raise Internal("the worker's handler returned without finishing the stream")
            failed = False
        except asyncio.CancelledError:
            log.info("request %s cancelled on %s", request.request_id, self.node_id)
            if not responder.finished:
                with contextlib.suppress(Exception):
                    await responder.error(Cancelled(f"request {request.request_id} cancelled"))
            raise
        except HybridgenError as exc:
            log.info("request %s failed: %r", request.request_id, exc)
            if not responder.finished:
                await responder.error(exc)
        except Exception as exc:
            log.exception("request %s: handler crashed", request.request_id)
            if not responder.finished:
                await responder.error(
                    Internal(f"internal error in the worker ({type(exc).__name__})")
                )
        finally:
            self.stats.record(
                time.monotonic() - responder.received_at, responder.completion_tokens, failed
            )

    async def _on_cancel(self, msg: Msg) -> None:
        request_id = msg.subject.rsplit(".", 1)[-1]
        for task in list(self._tasks.get(request_id, ())):
            log.info("cancel received for %s on %s", request_id, self.node_id)
            task.cancel()

    async def __aenter__(self) -> GenerationService:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def reply_subject(request: Request) -> str | None:
    """The inbox a nats.micro request is answered on (None for a fire-and-forget publish,
    or a reply subject that is not an inbox: `answerable`).

    nats.micro's `Request` does not expose it (nats-py 2.16): `respond()` only raises when it
    is missing, after the work is done. A generation must be refused before any work, so this
    one adapter reads the message underneath; nats-py is pinned below 2.17 and
    `test_micro_request_reply_subject` fails loudly if an upgrade moves it.
    """
    reply = getattr(getattr(request, "_msg", None), "reply", None)
    if not isinstance(reply, str) or not reply:
        return None
    return reply if answerable(request.subject, reply) else None
