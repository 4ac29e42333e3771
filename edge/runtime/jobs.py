"""One request inside the runtime (`Job`, the worker's side) and its caller's handle (`Generation`).

The worker thread fills a job's event queue through the caller's event loop; the caller reads
it by async-iterating the `Generation`. Fields touched by both sides are simple flags.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Hashable
from typing import TYPE_CHECKING, Any

from edge.personal.adapt import NgramCache
from edge.runtime.drafts import DraftControl
from edge.runtime.events import Event, Finished
from edge.runtime.sampler import new_rng
from serving.grammar import Grammar
from serving.penalties import TokenCounts
from serving.sampling import SamplingParams
from serving.stops import StopMatcher

if TYPE_CHECKING:
    from edge.runtime.engine import EdgeRuntime


class Job:
    """One request inside the worker thread (fields touched by both sides are simple flags)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        prompt_ids: list[int],
        options: SamplingParams,
        hold_after_prefill: bool,
        score_span: tuple[int, int] | None = None,
        adapter: NgramCache | None = None,
        prefix_key: Hashable | None = None,
        prefix_len: int = 0,
        grammar: Grammar | None = None,
        *,
        open_length: bool = False,
        answer_tokens: int = 0,
    ) -> None:
        self.loop = loop
        #: The request set no max_tokens: `options.max_tokens` is the cap or the window's
        #: room, not a length it is expected to reach (`expected_remaining`).
        self.open_length = open_length
        self.grammar = grammar  # constrained decoding (onnxruntime-genai's llguidance)
        self.prompt_ids = prompt_ids
        self.score_span = score_span
        self.options = options
        self.events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        self.held = hold_after_prefill
        self.cancelled = False
        self.enqueued_at = time.perf_counter()
        self.generator: Any = None
        self.stream: Any = None
        self.completion_tokens = 0
        self.stops = StopMatcher(options.stop)  # holds what may start a stop string
        self.adapter = adapter
        # What the penalties read (None: none on); the prompt's last `answer_tokens` are the
        # answer so far (one the edge finishes after the cloud failed mid-stream).
        split = len(prompt_ids) - answer_tokens
        self.penalties = TokenCounts.of(options, prompt_ids[:split], prompt_ids[split:])
        # The adapter's context: the last tokens of the prompt, then of the completion.
        self.context: deque[int] = deque(
            prompt_ids[-(adapter.order - 1) :] if adapter is not None else (),
            maxlen=adapter.order - 1 if adapter is not None else 0,
        )
        # Persona prefix reuse: the cache key (None: not eligible) and the prefix length.
        self.prefix_key = prefix_key
        self.prefix_len = prefix_len
        self.max_length = 0  # the generator's search max_length (for a kept one)
        self.failed = False  # an error left the generator in an unknown state
        self.released = False  # its generator went back to the prefix cache
        self.finished = False  # its Finished event was sent
        self.epoch = 0  # the prefix cache's forget epoch when it was submitted
        # The edge's own sampling (`edge.runtime.speculative`): the request's random
        # generator, the chosen token not yet in the KV cache, how many tokens the KV cache
        # holds, its drafting (None: off) and its grammar's matcher (`edge.runtime.guided`;
        # both set at the prefill), and the token that ends it if its grammar breaks.
        self.rng = new_rng(options)
        self.pending: int | None = None
        self.kv_length = 0
        self.drafts: DraftControl | None = None
        self.matcher: Any = None
        self.end_token = 0

    def emit(self, event: Event | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    @property
    def remaining(self) -> int:
        assert self.options.max_tokens is not None  # settled on submit
        return self.options.max_tokens - self.completion_tokens

    def expected_remaining(self, open_answer_tokens: float) -> int:
        """Tokens it is expected to make still: its remaining budget, or for an answer of
        open length, what a typical such answer (`open_answer_tokens` long) has left."""
        if not self.open_length:
            return self.remaining
        return max(1, min(self.remaining, round(open_answer_tokens) - self.completion_tokens))


class Generation:
    """Handle of one generation: async-iterate its events (Prefill, Token..., Finished).

    When created with `hold_after_prefill`, the worker stops after the Prefill event until
    `resume()` (the router reads the perplexity first) or `cancel()`.
    """

    def __init__(self, runtime: EdgeRuntime, job: Job) -> None:
        self._runtime = runtime
        self._job = job
        self.finished: Finished | None = None

    def resume(self) -> None:
        """Let a held generation continue after its Prefill event."""
        self._job.held = False
        self._runtime._wake()

    def cancel(self) -> None:
        """Stop generating (idempotent); the worker drops it at its next pass."""
        if not self._job.cancelled:
            self._job.cancelled = True
            self._runtime._wake()

    async def next_event(self) -> Event:
        """The next event; raises the worker's error, if any."""
        item = await self._job.events.get()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Finished):
            self.finished = item
        return item

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while self.finished is None:
                yield await self.next_event()
        finally:
            if self.finished is None:
                self.cancel()
