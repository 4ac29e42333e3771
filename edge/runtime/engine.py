"""The edge model runtime: onnxruntime-genai, several requests at once, an async interface.

Torch-free: only onnxruntime-genai, tokenizers and numpy. `EdgeRuntime` is the public side
(any thread: submit, encode, render the chat, estimate the wait, check the context, close);
its worker thread (`edge.runtime.worker`) owns the model.

Prompt perplexity (the router's primary signal) is read from the prefill logits
(`models.scoring.prefill`). ORT-GenAI's `Generator.get_logits()` returns only the last
position ((1, 1, V)), but `Generator.get_output("logits")` right after
`append_tokens(prompt)` returns the model's raw output for every prompt position ((1, n, V)),
the same logits as stepping the prompt one token at a time. So the signal rides on the
prefill at the cost of one copy and one O(n x V) log-softmax, with no token-by-token prompt
pass and no second onnxruntime session (which would double prefill and memory).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from broker.errors import BadRequest, Overloaded
from edge.personal.adapt import NgramCache
from edge.runtime.drafts import DraftSettings
from edge.runtime.jobs import Generation, Job
from edge.runtime.prefix import PrefixCache, kv_bytes_per_token, prefix_eligible
from edge.runtime.worker import Worker
from models.ort_edge import EdgeModel
from serving.context import MAX_TOKENS_CAP, settle_max_tokens
from serving.grammar import Grammar
from serving.sampling import SamplingParams
from serving.tools import template_messages, template_supports_tools

logger = logging.getLogger(__name__)

#: The wait estimate's first guess of an answer's length when its request sets no
#: `max_tokens`, until answers of the node's own traffic refine it (`estimate_wait_s`).
OPEN_ANSWER_TOKENS = 64


class EdgeRuntime(Worker):
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
        max_tokens_cap: most tokens of an answer whose options set no `max_tokens`
            (`serving.context.settle_max_tokens`).
        drafting: speculative decoding's drafts (`edge.runtime.drafts`; `tokens` 0: off).

    Attributes:
        prefix_hits: requests that reused a kept prefix; `prefix_misses`: requests with a
            prefix key that prefilled it (none kept, mismatch, options differ, too short).
        cancelled: generations dropped before they finished (cancelled by their caller,
            a hang-up, or unloaded unfinished), so no token is spent on them any more.
        draft_tokens, accepted_tokens, verifies: tokens drafted, drafted tokens the model
            accepted, and forward passes that checked a draft (`edge.runtime.speculative`).
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
        max_tokens_cap: int = MAX_TOKENS_CAP,
        drafting: DraftSettings | None = None,
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
        self.max_tokens_cap = max_tokens_cap
        self.drafting = drafting or DraftSettings()
        #: Drafting on for new requests (the policy's switch; `drafting.tokens` 0: never).
        self.speculative = True
        self.draft_tokens = self.accepted_tokens = self.verifies = 0
        self.version = version or _version_of(self.model_dir)
        self._model = edge_model.model
        self._grammar_tokenizer: Any = None  # llguidance's, built on first use (guided)
        self._og_tokenizer = edge_model.og_tokenizer
        self.tokenizer = edge_model.tokenizer
        self.stop_token_ids = edge_model.stop_token_ids
        self._lock = threading.Condition()
        self._pending: deque[Job] = deque()
        self._active: list[Job] = []
        self._closing = False
        self._step_s = 0.0  # EWMA of one decode step (one token of one generator)
        # EWMA of the length of answers whose request set no max_tokens (for the wait).
        self._open_answer_tokens = float(OPEN_ANSWER_TOKENS)
        self.tokens_generated = 0
        self.cancelled = 0
        self._prefix = PrefixCache(int(prefix_cache_mb * (1 << 20)))
        self.prefix_hits = 0
        self.prefix_misses = 0
        self.kv_bytes_per_token = kv_bytes_per_token(self.model_dir)
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
    def draft_acceptance(self) -> float | None:
        """Share of drafted tokens the model accepted (None before any draft)."""
        if not self.draft_tokens:
            return None
        return round(self.accepted_tokens / self.draft_tokens, 4)

    @property
    def prefix_cache_bytes(self) -> int:
        """Estimated KV bytes of the kept persona prefixes."""
        return self._prefix.nbytes

    @property
    def prefix_cache_keys(self) -> list[Hashable]:
        """Prefix keys of the kept generators, least recently used first."""
        return list(self._prefix.snapshot())

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
        tokens plus the shortest active request's remaining tokens per active slot. A request
        that set no `max_tokens` counts as long as recent such answers (`expected_remaining`).
        """
        typical = self._open_answer_tokens
        with self._lock:
            active = [j for j in self._active if not j.cancelled]
            queued_tokens = sum(
                j.expected_remaining(typical) for j in self._pending if not j.cancelled
            )
            if len(active) < self.max_active and not self._pending:
                ahead = len(active)
            else:
                shortest = min((j.expected_remaining(typical) for j in active), default=0)
                ahead = queued_tokens + shortest * len(active) + len(active)
        return ahead * self._step_s

    def settle_max_tokens(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The `max_tokens` a prompt of `prompt_tokens` is served with (`serving.context`,
        the rule every server applies): ContextLengthExceeded when it does not fit."""
        return settle_max_tokens(max_tokens, prompt_tokens, self.context_length,
                                 cap=self.max_tokens_cap, input_field="prompt",
                                 why=" (the edge model's)")  # fmt: skip

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
        answer_tokens: int = 0,
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
        with the key (`edge.runtime.prefix`; any options). Reuse never changes the outputs;
        the Prefill event's `reused_tokens` tells whether it happened.

        `grammar` constrains the output (`serving.grammar`, held by the request's own
        `llguidance.LLMatcher`, `edge.runtime.guided`: every position is masked, and an end
        token is forced once the grammar is complete); an adapter still mixes into the logits
        it masks, and the text the grammar forces is drafted.

        The options' penalties (`serving.penalties`) read the prompt and the answer; the
        prompt's last `answer_tokens` are the answer so far (an answer the edge finishes
        after the cloud failed mid-stream), counted as the answer's own.

        Raises:
            BadRequest: empty prompt.
            ContextLengthExceeded: prompt + max_tokens beyond the context window.
            Overloaded: the queue is full (retry_after = predicted wait).
        """
        if not prompt_ids:
            raise BadRequest("the prompt is empty", param="prompt")
        eligible = prefix_eligible(prefix_key, prefix_len, prompt_ids, self._prefix.budget_bytes)
        settled = options.with_max_tokens(
            self.settle_max_tokens(len(prompt_ids), options.max_tokens)
        )
        job = Job(
            asyncio.get_running_loop(),
            list(prompt_ids),
            settled,
            hold_after_prefill,
            score_span,
            adapter,
            prefix_key if eligible else None,
            prefix_len,
            grammar,
            open_length=options.max_tokens is None,
            answer_tokens=answer_tokens,
        )
        job.epoch = self._prefix.epoch
        self._enqueue(job)
        return Generation(self, job)

    def _enqueue(self, job: Job) -> None:
        """Queue `job` for the worker, or raise Overloaded (unloading, or the queue is full)."""
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


def _version_of(model_dir: Path) -> str:
    """The model-set version when `model_dir` sits in one (manifest.json above it)."""
    manifest = model_dir.parent / "manifest.json"
    try:
        version = json.loads(manifest.read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        version = None
    return str(version) if version else model_dir.name
