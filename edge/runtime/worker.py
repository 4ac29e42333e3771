"""The worker thread: one thread owns the model and steps a small pool of generators.

Scheduling. Generators are stepped round-robin (one token each per pass); requests beyond the
pool wait in a bounded FIFO (`EdgeRuntime.submit`). There is no dynamic batching on CPU:
`og.Engine` batches statically, and a batched `Generator` cannot admit late arrivals or mix
sampling options. Round-robin gives the same throughput as running requests one after the
other, but a short request is no longer stuck behind a long one and every client streams at
once. Static batching is faster for identical arrivals; it is not used because requests
arrive one by one over HTTP.

`Worker` is `EdgeRuntime`'s thread side (a mixin: the state it reads is set by
`EdgeRuntime.__init__`): the loop (`_run`), the prefill, one decode step and the end of a
request, and the hand-over of prefix generators to the `PrefixCache`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from broker.errors import BadRequest, Internal
from broker.wire import FinishReason
from edge.runtime.drafts import DraftControl, DraftSettings
from edge.runtime.events import Finished, Prefill, Token
from edge.runtime.guided import grammar_tokenizer, new_matcher
from edge.runtime.jobs import Job
from edge.runtime.prefix import PREFIX_LENGTH_STEP, Kept, PrefixCache, reusable_depth
from edge.runtime.speculative import draft_for, draw, rewind, step_rows
from edge.runtime.steps import token_logprob, top_scores
from models.ort_edge import EdgeModel, new_generator
from models.scoring import prefill, scored_positions

logger = logging.getLogger(__name__)


class Worker:
    """The worker thread's side of `EdgeRuntime` (see the module docstring)."""

    # Set by EdgeRuntime.__init__.
    edge_model: EdgeModel
    model_dir: Path
    context_length: int
    vocab_size: int
    max_active: int
    stop_token_ids: set[int]
    kv_bytes_per_token: int
    tokens_generated: int
    cancelled: int
    prefix_hits: int
    prefix_misses: int
    drafting: DraftSettings
    speculative: bool
    draft_tokens: int
    accepted_tokens: int
    verifies: int
    _model: Any
    _grammar_tokenizer: Any
    _og_tokenizer: Any
    _lock: threading.Condition
    _pending: deque[Job]
    _active: list[Job]
    _closing: bool
    _step_s: float
    _open_answer_tokens: float
    _prefix: PrefixCache

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    def _warm_up(self) -> None:
        """Run a few steps so the per-token estimate starts from a measurement."""
        generator = new_generator(self._model, min(self.context_length, 12), do_sample=False)
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

    def _drop_if_cancelled(self, job: Job) -> bool:
        if job.cancelled:
            if not job.finished and not job.failed:
                self.cancelled += 1
            self._keep(job)
            job.generator = None
            job.stream = None
        return job.cancelled

    # ------------------------------------------------------------------ prefix reuse

    def _take_prefix(self, job: Job, needed: int) -> tuple[Any, int]:
        """A kept generator rewound for `job` and how many tokens it supplies, or (None, 0)."""
        depth = reusable_depth(job.prompt_ids, job.prefix_len, job.score_span)
        kept = self._prefix.take(job.prefix_key) if depth > 0 else None
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

    def _keep(self, job: Job) -> None:
        """Hand a finished (or cancelled) prefix request's generator to the LRU (once)."""
        if job.prefix_key is None or job.generator is None or job.failed or job.released:
            return
        job.released = True
        if self._closing:
            return
        assert job.prefix_key is not None
        self._prefix.put(
            job.prefix_key,
            Kept(
                generator=job.generator,
                prefix_ids=tuple(job.prompt_ids[: job.prefix_len]),
                max_length=job.max_length,
                nbytes=self.kv_bytes_per_token * job.max_length,
            ),
            job.epoch,
            job.enqueued_at,
        )

    # ------------------------------------------------------------------ one request

    def _prefill(self, job: Job) -> None:
        started = time.perf_counter()
        if job.grammar is not None and not self._compile(job):
            return
        needed = min(self.context_length, len(job.prompt_ids) + job.remaining)
        generator, reused = (None, 0)
        if job.prefix_key is not None:
            generator, reused = self._take_prefix(job, needed)
        if generator is None:
            generator = self._new_generator(job, needed)
            if generator is None:
                return
        perplexity = prefill(generator, job.prompt_ids, job.score_span, start=reused)
        job.kv_length = len(job.prompt_ids)
        if job.options.speculative and self.speculative:
            job.drafts = DraftControl(self.drafting, job.prompt_ids)
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

    def _new_generator(self, job: Job, needed: int) -> Any:
        """A fresh generator for `job` (its own KV cache; the edge samples, so it is greedy)."""
        if job.prefix_key is not None:  # kept afterwards: room for the next requests
            step = PREFIX_LENGTH_STEP
            needed = min(self.context_length, -(-needed // step) * step)
            job.max_length = needed
        return new_generator(self._model, needed, do_sample=False)

    def _compile(self, job: Job) -> bool:
        """Give a constrained `job` its grammar's matcher; False when the grammar does not
        compile for this model (the job then has its error and is dropped)."""
        assert job.grammar is not None
        if self._grammar_tokenizer is None:  # built once, on the first constrained request
            self._grammar_tokenizer = grammar_tokenizer(
                self.model_dir, self.vocab_size, self.stop_token_ids
            )
        try:
            job.matcher = new_matcher(self._grammar_tokenizer, job.grammar)
        except BadRequest as exc:
            job.emit(exc)
            job.failed = job.cancelled = True
            return False
        job.end_token = min(self.stop_token_ids)
        return True

    def _step(self, job: Job) -> None:
        """A step of a request the edge samples itself, checking a draft when it has one
        (`edge.runtime.speculative`)."""
        if job.remaining <= 0:
            self._finish(job, "length")
            return
        started = time.perf_counter()
        draft = draft_for(job)
        control = job.drafts
        if draft:
            assert control is not None
            control.begin(len(draft))
            self.draft_tokens += len(draft)
            self.verifies += 1
        rows = step_rows(job, draft)
        accepted = made = 0
        for i, row in enumerate(rows):
            token_id, logits, mixed_lse = draw(job, row)
            hit = i < len(draft) and token_id == draft[i]
            if hit:  # counted before the token is sent: it may end the answer
                assert control is not None
                control.accept()
                self.accepted_tokens += 1
                accepted += 1
            made += 1
            if self._emit(job, token_id, logits, mixed_lse):
                break
            if not hit:  # the model's own token: the next step appends it
                job.pending = token_id
                break
        if control is not None and draft:
            control.end()
            if not job.finished:
                rewind(job, len(draft), accepted)
        per_token = (time.perf_counter() - started) / made
        self._step_s = 0.9 * self._step_s + 0.1 * per_token

    def _emit(self, job: Job, token_id: int, logits: Any, mixed_lse: float | None) -> bool:
        """Count and send one chosen token (`logits`: what its log-probability reads);
        True when it ended the answer (an end token, a stop string, `max_tokens`)."""
        if job.adapter is not None:
            job.context.append(token_id)
        if job.penalties is not None:
            job.penalties.observe(token_id)
        if job.drafts is not None:
            job.drafts.append(token_id)
        logprob = token_logprob(logits, token_id, mixed_lse)
        job.completion_tokens += 1
        self.tokens_generated += 1
        if token_id in self.stop_token_ids:
            job.emit(Token(token_id=token_id, text="", logprob=logprob))
            self._finish(job, "stop")
            return True
        released, stopped = job.stops.push(job.stream.decode(token_id))
        if job.options.logprobs:
            decode = self.edge_model.decode
            token, top = top_scores(logits, token_id, job.options.top_logprobs, mixed_lse, decode)
            job.emit(Token(token_id, released, logprob, token=token, top=top))
        else:
            job.emit(Token(token_id=token_id, text=released, logprob=logprob))
        if stopped:
            self._finish(job, "stop", flush=False)
        elif job.remaining <= 0:
            self._finish(job, "length")
        return job.finished

    def _finish(self, job: Job, reason: FinishReason, *, flush: bool = True) -> None:
        tail = job.stops.flush() if flush else ""
        if job.open_length:
            self._open_answer_tokens += 0.1 * (job.completion_tokens - self._open_answer_tokens)
        self._keep(job)  # before Finished: the caller's next request finds it kept
        job.finished = True
        job.emit(
            Finished(
                finish_reason=reason,
                prompt_tokens=len(job.prompt_ids),
                completion_tokens=job.completion_tokens,
                text=tail,
                draft_tokens=job.drafts.drafted if job.drafts is not None else 0,
                accepted_tokens=job.drafts.accepted if job.drafts is not None else 0,
            )
        )
        job.cancelled = True  # dropped from the pool at the next pass
