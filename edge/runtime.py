"""The edge model runtime: onnxruntime-genai, several requests at once, an async interface.

Torch-free: only onnxruntime-genai, tokenizers and numpy.

Scheduling. One worker thread owns the model and steps a small pool of generators
round-robin (one token each per pass); requests beyond the pool wait in a bounded FIFO.
Measured on the 2-core dev machine (tiny int4 Llama, 1 intra-op thread, 4 requests x 60
tokens): a single worker running requests one after the other took 41.5 ms in all with
time-to-first-token 2 / 13 / 23 / 33 ms; the round-robin pool took 41.0 ms with TTFT
5.2-5.7 ms for all four. Same throughput (there is no dynamic batching on CPU: `og.Engine`
batches statically, and a batched `Generator` cannot admit late arrivals or mix sampling
options), but a short request is no longer stuck behind a long one and every client streams
at once. Static batching was 2.6x faster in throughput for identical arrivals; it is not
used because requests arrive one by one over HTTP.

Prompt perplexity (the router's primary signal) is read from the prefill logits. ORT-GenAI's
`Generator.get_logits()` returns only the last position ((1, 1, V)), but
`Generator.get_output("logits")` right after `append_tokens(prompt)` returns the model's raw
output for every prompt position ((1, n, V)); it matches step-by-step logits to 3e-6. Cost,
measured on a 100-token prompt (tiny model, V=1024): prefill 1.9 ms, prefill + perplexity
3.1 ms; the alternative of stepping the prompt one token at a time took 18.5 ms, and a second
onnxruntime session would have doubled prefill and memory. On the tiny model set (V=512) a
100-token prompt: prefill 2.3 ms, with perplexity 3.2 ms. On a random 83M Llama int4
(V=8192, 1 thread, busy 2-core machine), 100 tokens: prefill 400 ms, `get_output` copy 6 ms,
log-softmax 7.7 ms, i.e. the signal costs ~3% of the prefill it rides on. The log-softmax is
O(n x V).

Per-token log-probabilities are read with `get_logits()` after each step (log-softmax of the
raw logits, before temperature) and kept for the router. A request that asks for
`top_logprobs` also gets the k most likely tokens of each step: `np.argpartition` over V (no
Python loop over the vocabulary), then a sort of those k only, scored against the same
logsumexp; their texts are decoded on the worker thread, only for such requests.

Personalization. A request may carry a per-user adapter (`edge.adapt.NgramCache`, see
`submit`). At each step the worker asks it for its sparse next-token distribution after the
context (the prompt's tail, then the generated tokens); when its gate is non-zero the logits
are mixed in place (`edge.adapt.mix_logits`: one logsumexp over V, then only the cache's
tokens) and handed back with `Generator.set_logits((1, 1, V) float32)` before
`generate_next_token()`, which then samples from the mixture (temperature, top-p and top-k
apply to the mixed logits). The reported log-probability is that of the mixed distribution
and reuses the logsumexp, so it costs no second pass over V. A request without an adapter runs
exactly the code it ran before.

Persona prefix reuse. A request may name a stable prompt prefix (`submit(prefix_key=...,
prefix_len=...)`: a user's persona/system message, rendered and tokenized). When it ends, its
generator is kept in an LRU (`_PrefixCache`, one per key, bounded by an estimate of its KV
bytes: layers x KV heads x head size x 2 x dtype bytes per position, times the generator's
`max_length`, since onnxruntime-genai's CPU builds share one past/present buffer sized to
it). The next request with that key takes it (exclusively: a second request with the same key
meanwhile simply prefills a generator of its own; the one released last is kept),
`rewind_to(n)` and appends only the rest of its prompt. Onnxruntime-genai 0.18 cannot change a
generator's search options once it is made (`set_search_options` exists on `GeneratorParams`
only), so a kept generator is keyed by (prefix key, sampling options): temperature, top-p and
top-k must match, and a request with a `seed` and temperature > 0 never reuses (a kept
generator's random stream has moved on, the seed would not reproduce). Its `max_length` is the
request's need rounded up to `PREFIX_LENGTH_STEP`; a later request that needs more prefills a
fresh, larger one, which then replaces it. The kept prefix tokens are compared with the
request's before reuse, so a key reused for another persona falls back to a full prefill. The
prompt perplexity still works: `n` stays below the first scored position (the user's message
lies after the persona), so a request scoring the prefix itself does not reuse. Greedy outputs
are the same as without reuse (tested).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og

from broker.errors import BadRequest, ContextLengthExceeded, Internal, Overloaded
from broker.wire import FinishReason
from edge.adapt import NgramCache, logsumexp, mix_logits, mixed_logsumexp
from models.ort_edge import EdgeModel
from models.scoring import prefill, scored_positions
from serving.grammar import Grammar
from serving.sampling import SamplingParams
from serving.stops import StopMatcher
from serving.tools import template_messages, template_supports_tools

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prefill:
    """First event of a generation: the prompt has been read."""

    prompt_tokens: int
    #: exp(mean negative log-likelihood) of the scored prompt tokens (the whole prompt but
    #: its first token, or the span given to `submit`); None when no token is scored.
    perplexity: float | None
    queue_wait_s: float
    prefill_s: float
    #: How many prompt tokens the perplexity averages over.
    scored_tokens: int = 0
    #: Prompt tokens taken from a kept persona prefix instead of being prefilled.
    reused_tokens: int = 0


@dataclass(frozen=True)
class Token:
    """One generated token. `text` may be "" while a possible stop sequence is held back."""

    token_id: int
    text: str
    logprob: float
    #: Only when the request asked for log-probabilities (`SamplingParams.logprobs`): the
    #: token's text decoded alone (None otherwise, and for the end token), and the
    #: `top_logprobs` most likely tokens of this step as (text, log-probability).
    token: str | None = None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Finished:
    """Last event of a generation."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # text released at the end (held-back tail), usually ""


Event = Prefill | Token | Finished


def log_softmax(logits: np.ndarray, index: int | None = None) -> np.ndarray | float:
    """Log-softmax over the last axis, or only the log-probability of entry `index`.

    Args:
        logits: (..., V) raw logits (any float dtype; the result keeps it).
        index: with a 1-D `logits`, return just `log p[index]` as a float: one max, one
            exp-and-sum over V and a subtraction, without building the (V,) result. Per
            decoded token of a V=49152 model this costs ~50 us in float32, against ~200 us
            for the full float64 log-softmax it replaces (float32 is exact enough here: the
            max is subtracted first and numpy sums pairwise, error ~1e-6).

    Returns:
        The (..., V) log-probabilities, or a float when `index` is given.
    """
    peak = logits.max(axis=-1, keepdims=True)
    if index is not None:
        total = float(np.exp(logits - peak).sum())
        return float(logits[index] - peak[0]) - float(np.log(total))
    shifted = logits - peak
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class _Job:
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
    ) -> None:
        self.loop = loop
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

    def emit(self, event: Event | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    @property
    def remaining(self) -> int:
        return self.options.max_tokens - self.completion_tokens


#: A kept generator's max_length is the request's need rounded up to this many tokens.
PREFIX_LENGTH_STEP = 256
#: A request submitted this soon after its user was forgotten was prepared before it: its
#: prefix is not kept (`_PrefixCache.forget`).
FORGET_GRACE_S = 30.0


def prefix_length(prompt_ids: Sequence[int], prefix_ids: Sequence[int]) -> int:
    """`len(prefix_ids)` when they are exactly the first tokens of `prompt_ids`, else 0.

    The caller of `EdgeRuntime.submit(prefix_len=...)` tokenizes the persona/system part of
    the rendered chat on its own; a merge across its boundary makes it no prefix of the
    prompt's ids, and then it must not be reused (0 turns reuse off for that request).
    """
    n = len(prefix_ids)
    return n if 0 < n <= len(prompt_ids) and list(prompt_ids[:n]) == list(prefix_ids) else 0


@dataclass
class _Kept:
    """An idle generator holding a persona prefix (and whatever followed it last time)."""

    generator: Any
    prefix_ids: tuple[int, ...]
    max_length: int
    nbytes: int


class _PrefixCache:
    """Kept generators by key, least recently used first, bounded by their KV bytes.

    Worker thread only (`clear` also after it stopped); the lock guards the readers of
    `nbytes` / `keys` on other threads.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, _Kept] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.evictions = 0
        # Forgotten owners (`forget`): requests started before one, or submitted less than
        # FORGET_GRACE_S after it (prepared before it), keep nothing it matches.
        self.epoch = 0
        self._forgotten: deque[tuple[int, float, Callable[[Hashable], bool]]] = deque(maxlen=256)

    def forget(self, match: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose prefix key `match`es; a request in flight since keeps none.

        Returns:
            How many entries were dropped.
        """
        with self._lock:
            self.epoch += 1
            self._forgotten.append((self.epoch, time.perf_counter(), match))
            gone = [key for key in self._entries if isinstance(key, tuple) and match(key[0])]
            for key in gone:
                self.nbytes -= self._entries.pop(key).nbytes
            return len(gone)

    def _was_forgotten(self, key: Hashable, since: int, submitted: float) -> bool:
        """Whether an owner of `key` was forgotten after epoch `since`, or less than
        `FORGET_GRACE_S` before `submitted` (unsure: True)."""
        if since < self.epoch and (not self._forgotten or self._forgotten[0][0] > since + 1):
            return True  # forgets since the request started fell out of the record
        prefix = key[0] if isinstance(key, tuple) else key
        return any(
            (epoch > since or at > submitted - FORGET_GRACE_S) and match(prefix)
            for epoch, at, match in self._forgotten
        )

    def snapshot(self) -> list[Hashable]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def take(self, key: Hashable) -> _Kept | None:
        """Remove and return the entry of `key` (the caller owns it until `put`)."""
        with self._lock:
            kept = self._entries.pop(key, None)
            if kept is not None:
                self.nbytes -= kept.nbytes
            return kept

    def put(self, key: Hashable, kept: _Kept, since: int = 0, submitted: float = 0.0) -> None:
        """Keep `kept` as the most recent entry of `key`, evicting the oldest beyond budget
        (not when its owner was forgotten since its request, `_was_forgotten`)."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            if kept.nbytes > self.budget_bytes or self._was_forgotten(key, since, submitted):
                self.evictions += 1
                return
            self._entries[key] = kept
            self.nbytes += kept.nbytes
            while self.nbytes > self.budget_bytes:
                _, oldest = self._entries.popitem(last=False)
                self.nbytes -= oldest.nbytes
                self.evictions += 1

    def clear(self) -> None:
        """Drop every kept generator (their memory goes with them)."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0


class Generation:
    """Handle of one generation: async-iterate its events (Prefill, Token..., Finished).

    When created with `hold_after_prefill`, the worker stops after the Prefill event until
    `resume()` (the router reads the perplexity first) or `cancel()`.
    """

    def __init__(self, runtime: EdgeRuntime, job: _Job) -> None:
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


class EdgeRuntime:
    """An onnxruntime-genai model served by one worker thread to many async callers.

    Args:
        model_dir: an onnxruntime-genai folder (genai_config.json, model.onnx, tokenizer).
        threads: intra-op threads of the ONNX session (set explicitly: the default takes
            every core and halves throughput next to another busy process).
        max_active: generators stepped round-robin at once.
        max_queue: requests waiting for a slot before `Overloaded` is raised.
        version: the model version reported in telemetry (default: the manifest's, else the
            folder name).
        prefix_cache_mb: memory budget of the kept persona prefixes (estimated KV bytes;
            0 turns prefix reuse off).

    Attributes:
        prefix_hits: requests that reused a kept prefix; `prefix_misses`: requests with a
            prefix key that prefilled it (none kept, mismatch, options differ, too short).
        cancelled: generations dropped before they finished (cancelled by their caller,
            a hang-up, or unloaded unfinished), so no token is spent on them any more.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        threads: int = 1,
        max_active: int = 4,
        max_queue: int = 32,
        version: str | None = None,
        prefix_cache_mb: float = 256.0,
    ) -> None:
        started = time.perf_counter()
        edge_model = EdgeModel(model_dir, threads)
        self.load_s = time.perf_counter() - started
        self.edge_model = edge_model
        self.model_dir = edge_model.model_dir
        self.context_length = edge_model.context_length
        self.vocab_size = edge_model.vocab_size
        self.threads = threads
        self.max_active = max_active
        self.max_queue = max_queue
        self.version = version or _version_of(self.model_dir)
        self._model = edge_model.model
        self._og_tokenizer = edge_model.og_tokenizer
        self.tokenizer = edge_model.tokenizer
        self.stop_token_ids = edge_model.stop_token_ids
        self._lock = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._closing = False
        self._step_s = 0.0  # EWMA of one decode step (one token of one generator)
        self.tokens_generated = 0
        self.cancelled = 0
        self._prefix = _PrefixCache(int(prefix_cache_mb * (1 << 20)))
        self.prefix_hits = 0
        self.prefix_misses = 0
        self.kv_bytes_per_token = _kv_bytes_per_token(self.model_dir)
        self._thread = threading.Thread(target=self._run, name="edge-runtime", daemon=True)
        self._warm_up()
        self._thread.start()
        logger.info(
            "loaded %s (version %s, context %d, %d threads) in %.2f s; %.2f ms/token",
            self.model_dir,
            self.version,
            self.context_length,
            threads,
            self.load_s,
            self._step_s * 1e3,
        )

    # ------------------------------------------------------------------ public, any thread

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special tokens such as `<|im_start|>` included)."""
        return self.edge_model.encode(text)

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The edge model's own chat template applied to `messages` (`EdgeModel.render_chat`).

        `tools` (shown to the model) and tool turns go to the template when it handles tools,
        else through the fallback of `serving.tools.fallback_messages`.
        """
        native = template_supports_tools(self.edge_model.chat_template)
        messages, tools = template_messages(messages, tools, native)
        return self.edge_model.render_chat(messages, tools)

    @property
    def per_token_s(self) -> float:
        """Recent time of one decode step (seconds)."""
        return self._step_s

    @property
    def prefix_cache_bytes(self) -> int:
        """Estimated KV bytes of the kept persona prefixes."""
        return self._prefix.nbytes

    @property
    def prefix_cache_keys(self) -> list[Hashable]:
        """Prefix keys of the kept generators, least recently used first."""
        return [key[0] for key in self._prefix.snapshot() if isinstance(key, tuple)]

    def forget_prefixes(self, match: Callable[[Hashable], bool]) -> int:
        """Drop the kept prefixes whose key `match`es (a deleted or reset user's, see
        `edge.samples.owns_prefix`); requests in flight keep none of them afterwards.

        Returns:
            How many were dropped.
        """
        return self._prefix.forget(match)

    @property
    def prefix_evictions(self) -> int:
        """Kept prefixes dropped to stay within the memory budget."""
        return self._prefix.evictions

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._active) + len(self._pending)

    def estimate_wait_s(self) -> float:
        """Predicted wait before a new request's first token.

        Tokens ahead of it times the recent per-token time: with a free slot it waits one
        round-robin pass over the active generators; otherwise every queued request's
        `max_tokens` plus the shortest active request's remaining tokens per active slot.
        """
        with self._lock:
            active = [j for j in self._active if not j.cancelled]
            queued_tokens = sum(j.options.max_tokens for j in self._pending if not j.cancelled)
            if len(active) < self.max_active and not self._pending:
                ahead = len(active)
            else:
                shortest = min((j.remaining for j in active), default=0)
                ahead = queued_tokens + shortest * len(active) + len(active)
        return ahead * self._step_s

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ContextLengthExceeded unless prompt + max_tokens fits the context window."""
        if prompt_tokens + max_tokens > self.context_length:
            raise ContextLengthExceeded(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the edge "
                f"model's context window of {self.context_length} tokens",
                param="max_tokens",
            )

    def submit(
        self,
        prompt_ids: list[int],
        options: SamplingParams,
        *,
        hold_after_prefill: bool = False,
        score_span: tuple[int, int] | None = None,
        adapter: NgramCache | None = None,
        prefix_key: Hashable | None = None,
        prefix_len: int = 0,
        grammar: Grammar | None = None,
    ) -> Generation:
        """Queue a generation (call from the event loop).

        `score_span` ([start, end) token positions) limits the prompt perplexity of the
        Prefill event to those tokens (see `encode_with_span`); None scores the whole prompt.

        `adapter` personalizes the generation: the user's n-gram cache is mixed into every
        step's next-token distribution where its gate is open, and token log-probabilities are
        those of the mixture. The worker thread reads it while the request runs; an update
        from another thread meanwhile is tolerated (that step goes unmixed), but pass a copy
        (`NgramCache.from_bytes(cache.to_bytes())`) when the outputs must be reproducible.

        `prefix_key` (e.g. a hash of the user's persona) and `prefix_len` (how many of the
        prompt's first tokens are that persona/system part, see `prefix_length`) let the
        request reuse a kept prefill of those tokens and keep its own for the next request
        with the key (module docstring: options must match, no seeded sampling). Reuse never
        changes the outputs; the Prefill event's `reused_tokens` tells whether it happened.

        `grammar` constrains the output (`serving.grammar`: onnxruntime-genai's built-in
        llguidance masks every step, and forces an end token once the grammar is complete).
        The guidance state lives in the generator, so a constrained request never reuses or
        keeps a prefix generator; an adapter still mixes into the logits it masks.

        Raises:
            BadRequest: empty prompt.
            ContextLengthExceeded: prompt + max_tokens beyond the context window.
            Overloaded: the queue is full (retry_after = predicted wait).
        """
        if not prompt_ids:
            raise BadRequest("the prompt is empty", param="prompt")
        self.check_fits(len(prompt_ids), options.max_tokens)
        job = _Job(
            asyncio.get_running_loop(),
            list(prompt_ids),
            options,
            hold_after_prefill,
            score_span,
            adapter,
            prefix_key
            if grammar is None
            and self._prefix_eligible(prefix_key, prefix_len, prompt_ids, options)
            else None,
            prefix_len,
            grammar,
        )
        job.epoch = self._prefix.epoch
        with self._lock:
            if self._closing:
                raise Overloaded("the edge model is being unloaded", retry_after=1.0)
            if len(self._active) + len(self._pending) >= self.max_active + self.max_queue:
                raise Overloaded(
                    f"edge queue full ({self.max_queue} waiting)",
                    retry_after=max(1.0, self.estimate_wait_s()),
                )
            self._pending.append(job)
            self._lock.notify()
        return Generation(self, job)

    async def close(self, *, drain_timeout: float = 30.0) -> None:
        """Finish what was admitted (up to `drain_timeout`), then stop the thread (idempotent)."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        await asyncio.to_thread(self._thread.join, drain_timeout)
        if self._thread.is_alive():
            with self._lock:
                for job in [*self._active, *self._pending]:
                    job.cancelled = True
                self._lock.notify()
            await asyncio.to_thread(self._thread.join, 5.0)
        self._prefix.clear()

    # ------------------------------------------------------------------ worker thread

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def _warm_up(self) -> None:
        """Run a few steps so the per-token estimate starts from a measurement."""
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=min(self.context_length, 12), do_sample=False)
        generator = og.Generator(self._model, params)
        generator.append_tokens([0, 0, 0, 0])
        steps, started = 0, time.perf_counter()
        while not generator.is_done() and steps < 6:
            generator.get_logits()  # same order as `_step`: this runs the forward pass
            generator.generate_next_token()
            steps += 1
        self._step_s = (time.perf_counter() - started) / max(steps, 1)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._active = [j for j in self._active if not self._drop_if_cancelled(j)]
                while self._pending and len(self._active) < self.max_active:
                    job = self._pending.popleft()
                    if not self._drop_if_cancelled(job):
                        self._active.append(job)  # prefilled below, outside the lock
                runnable = [j for j in self._active if j.generator is None or not j.held]
                if not runnable:
                    if self._closing and not self._active and not self._pending:
                        self._prefix.clear()
                        return
                    self._lock.wait(0.5)
                    continue
            for job in runnable:
                try:
                    if job.generator is None:
                        self._prefill(job)
                    elif not job.cancelled and not job.held:
                        self._step(job)
                except Exception as exc:  # one broken request must not stop the others
                    logger.exception("edge generation failed")
                    job.emit(Internal(f"edge generation failed ({type(exc).__name__}: {exc})"))
                    job.failed = True
                    job.cancelled = True

    def _drop_if_cancelled(self, job: _Job) -> bool:
        if job.cancelled:
            if not job.finished and not job.failed:
                self.cancelled += 1
            self._keep(job)
            job.generator = None
            job.stream = None
        return job.cancelled

    def _search_options(self, options: SamplingParams) -> dict[str, Any]:
        """onnxruntime-genai search options of a request, but `max_length`."""
        search: dict[str, Any] = {}
        if options.temperature > 0:
            search.update(
                do_sample=True,
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=options.top_k or self.vocab_size,
            )
            if options.seed is not None:
                search["random_seed"] = options.seed
        else:
            search["do_sample"] = False
        return search

    def _prefix_eligible(
        self,
        prefix_key: Hashable | None,
        prefix_len: int,
        prompt_ids: Sequence[int],
        options: SamplingParams,
    ) -> bool:
        """Whether a request may reuse or keep a prefix (else it runs as without a key)."""
        return (
            prefix_key is not None
            and self._prefix.budget_bytes > 0
            and 0 < prefix_len <= len(prompt_ids)
            and (options.temperature <= 0 or options.seed is None)
        )

    def _prefix_cache_key(self, job: _Job) -> Hashable:
        """The LRU key: the prefix key and the sampling options a generator is made with."""
        search = self._search_options(job.options)
        return (job.prefix_key, tuple(sorted(search.items())))

    def _reusable_depth(self, job: _Job) -> int:
        """How many prompt tokens a kept prefix may supply: the prefix, but at least one
        token must be appended (for the next token's logits) and every scored position
        needs the logits of the position before it, so the depth stays below those."""
        depth = min(job.prefix_len, len(job.prompt_ids) - 1)
        scored = scored_positions(len(job.prompt_ids), job.score_span)
        if scored:
            depth = min(depth, scored.start - 1)
        return max(depth, 0)

    def _take_prefix(self, job: _Job, needed: int) -> tuple[Any, int]:
        """A kept generator rewound for `job` and how many tokens it supplies, or (None, 0)."""
        depth = self._reusable_depth(job)
        kept = self._prefix.take(self._prefix_cache_key(job)) if depth > 0 else None
        if (
            kept is None
            or needed > kept.max_length
            or kept.prefix_ids != tuple(job.prompt_ids[: job.prefix_len])
        ):
            self.prefix_misses += 1
            return None, 0  # a mismatched or too short kept generator is dropped here
        kept.generator.rewind_to(depth)
        job.max_length = kept.max_length
        self.prefix_hits += 1
        return kept.generator, depth

    def _keep(self, job: _Job) -> None:
        """Hand a finished (or cancelled) prefix request's generator to the LRU (once)."""
        if job.prefix_key is None or job.generator is None or job.failed or job.released:
            return
        job.released = True
        if self._closing:
            return
        self._prefix.put(
            self._prefix_cache_key(job),
            _Kept(
                generator=job.generator,
                prefix_ids=tuple(job.prompt_ids[: job.prefix_len]),
                max_length=job.max_length,
                nbytes=self.kv_bytes_per_token * job.max_length,
            ),
            job.epoch,
            job.enqueued_at,
        )

    def _prefill(self, job: _Job) -> None:
        started = time.perf_counter()
        options = job.options
        needed = min(self.context_length, len(job.prompt_ids) + options.max_tokens)
        generator, reused = (None, 0)
        if job.prefix_key is not None:
            generator, reused = self._take_prefix(job, needed)
        if generator is None:
            params = og.GeneratorParams(self._model)
            if job.prefix_key is not None:  # kept afterwards: room for the next requests
                step = PREFIX_LENGTH_STEP
                needed = min(self.context_length, -(-needed // step) * step)
                job.max_length = needed
            params.set_search_options(max_length=needed, **self._search_options(options))
            if job.grammar is not None:
                try:
                    params.set_guidance(*job.grammar.og_guidance())
                    generator = og.Generator(self._model, params)
                except Exception as exc:  # onnxruntime-genai refuses the grammar
                    job.emit(
                        BadRequest(
                            f"the edge model cannot decode under this {job.grammar.kind} "
                            f"grammar: {exc}",
                            param="response_format",
                        )
                    )
                    job.failed = job.cancelled = True
                    return
            else:
                generator = og.Generator(self._model, params)
        perplexity = prefill(generator, job.prompt_ids, job.score_span, start=reused)
        job.generator = generator
        job.stream = self._og_tokenizer.create_stream()
        job.emit(
            Prefill(
                prompt_tokens=len(job.prompt_ids),
                perplexity=perplexity,
                queue_wait_s=started - job.enqueued_at,
                prefill_s=time.perf_counter() - started,
                scored_tokens=len(scored_positions(len(job.prompt_ids), job.score_span)),
                reused_tokens=reused,
            )
        )

    def _step(self, job: _Job) -> None:
        generator = job.generator
        if generator.is_done() or job.remaining <= 0:
            self._finish(job, "length")
            return
        started = time.perf_counter()
        # onnxruntime-genai runs the model lazily: `get_logits()` here runs the forward pass
        # of the last token and returns the distribution the next token is drawn from, and
        # `generate_next_token()` then only samples from it. Reading the logits *after*
        # `generate_next_token()` would run the following position's forward pass early and
        # score the chosen token under the wrong distribution (and waste one forward pass
        # per request on the last token).
        raw = generator.get_logits()
        logits = raw[0, 0]  # (V,) raw logits, before temperature
        mixed_lse = self._adapt(job, raw) if job.adapter is not None else None
        generator.generate_next_token()
        token_id = int(generator.get_next_tokens()[0])
        self._step_s = 0.9 * self._step_s + 0.1 * (time.perf_counter() - started)
        if job.adapter is None:
            logprob = float(log_softmax(logits, token_id))
        else:
            job.context.append(token_id)
            if mixed_lse is None:
                logprob = float(log_softmax(logits, token_id))
            else:  # `logits` now holds the mixed logits
                logprob = float(logits[token_id]) - mixed_lse
        job.completion_tokens += 1
        self.tokens_generated += 1
        if token_id in self.stop_token_ids:
            job.emit(Token(token_id=token_id, text="", logprob=logprob))
            self._finish(job, "stop")
            return
        released, stopped = job.stops.push(job.stream.decode(token_id))
        if job.options.logprobs:
            token, top = self._scores(job, logits, token_id, mixed_lse)
            job.emit(Token(token_id, released, logprob, token=token, top=top))
        else:
            job.emit(Token(token_id=token_id, text=released, logprob=logprob))
        if stopped:
            self._finish(job, "stop", flush=False)
        elif generator.is_done() or job.remaining <= 0:
            self._finish(job, "length")

    def _scores(
        self, job: _Job, logits: np.ndarray, token_id: int, lse: float | None
    ) -> tuple[str, tuple[tuple[str, float], ...]]:
        """The chosen token's text and the step's `top_logprobs` most likely tokens.

        `logits` are the (V,) logits the token was drawn from (mixed, for an adapter, with
        their logsumexp `lse`; None: computed here). Top-k by `np.argpartition`, O(V).
        """
        decode = self.edge_model.decode
        k = min(job.options.top_logprobs, logits.shape[-1])
        if k <= 0:
            return decode([token_id]), ()
        total = logsumexp(logits) if lse is None else lse
        ids = np.argpartition(logits, -k)[-k:]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        top = tuple((decode([int(i)]), float(logits[i]) - total) for i in ids)
        return decode([token_id]), top

    def _adapt(self, job: _Job, raw: np.ndarray) -> float | None:
        """Mix the job's adapter into `raw` ((1, 1, V) logits) and hand them to the generator.

        Returns the logsumexp of the mixed logits, or None when the gate is closed (the
        generator keeps its own logits).
        """
        assert job.adapter is not None
        try:
            ids, probs, weight = job.adapter.predict(job.context)
        except (RuntimeError, KeyError):  # updated by another thread meanwhile: skip a step
            return None
        if weight <= 0.0:
            return None
        if int(ids.max()) >= raw.shape[-1]:  # learned with another tokenizer: ignore those ids
            keep = ids < raw.shape[-1]
            ids, probs = ids[keep], probs[keep]
            if len(ids) == 0:
                return None
        logits = raw[0, 0]
        lse = logsumexp(logits)
        mix_logits(logits, ids, probs, weight, lse=lse)
        job.generator.set_logits(raw)
        return mixed_logsumexp(lse, probs, weight)

    def _finish(self, job: _Job, reason: FinishReason, *, flush: bool = True) -> None:
        tail = job.stops.flush() if flush else ""
        self._keep(job)  # before Finished: the caller's next request finds it kept
        job.finished = True
        job.emit(
            Finished(
                finish_reason=reason,
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=job.completion_tokens,
                text=tail,
            )
        )
        job.cancelled = True  # dropped from the pool at the next pass


def _kv_bytes_per_token(model_dir: Path) -> int:
    """Estimated KV-cache bytes per position from `genai_config.json`: layers x KV heads x
    head size x 2 (key and value) x 4 (float32, as the CPU builds keep the cache; 2 for a
    folder named fp16/bf16)."""
    try:
        config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
        decoder = config["model"]["decoder"]
        heads = int(decoder.get("num_key_value_heads") or decoder["num_attention_heads"])
        head_size = int(
            decoder.get("head_size") or decoder["hidden_size"] // decoder["num_attention_heads"]
        )
        layers = int(decoder["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 1 << 16  # unknown layout: a generous guess keeps the budget meaningful
    dtype_bytes = 2 if "fp16" in model_dir.name or "bf16" in model_dir.name else 4
    return layers * heads * head_size * 2 * dtype_bytes


def _version_of(model_dir: Path) -> str:
    """The model-set version when `model_dir` sits in one (manifest.json above it)."""
    manifest = model_dir.parent / "manifest.json"
    try:
        version = json.loads(manifest.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        version = None
    return str(version) if version else model_dir.name
