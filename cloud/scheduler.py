"""The cloud engine's generation thread: admission, prefill groups, decode steps.

`Scheduler` owns one daemon thread that runs rounds (see `cloud.engine` for the design):
admit waiting `Ticket`s in FIFO order within the row and token limits, feed one prefill
chunk of the current group, run one decode step of the running `Batch`, then hand every
new token to its request's asyncio queue — one `call_soon_threadsafe` per event loop per
round. Only the generation thread touches the model, the batch and the admission counters;
the asyncio side only submits, cancels (a flag, read at the next round) and forgets tickets,
under `_cv`.

A step that raises fails exactly the rows it was computing (`Internal`): a prefill chunk
its group, a decode step the running batch. The thread keeps going; closing the engine
fails whatever is left with `Unavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from broker.errors import BadRequest, HybridgenError, Internal, Unavailable
from cloud import speculative
from cloud.batching import (
    Batch,
    Forward,
    Prefill,
    decode_step,
    prefill_chunk,
    prefill_group,
    rebuild,
    to_batch,
)
from cloud.sampling import RowSampling, RowScore, row_scores, sample_rows
from cloud.spans import Timeline
from serving.drafts import DraftControl

logger = logging.getLogger(__name__)

#: A prefill group's padded size may exceed its real prompt tokens by this factor.
PADDING_SLACK = 1.25
_GREEDY = RowSampling()


@dataclass(eq=False)
class Ticket:
    """One request as the generation thread sees it.

    Attributes:
        request_id: the caller's id (unique among requests in flight).
        prompt: prompt token ids.
        max_tokens: tokens to make at most.
        eos: token ids that end the request (empty: ignore EOS).
        sampling: the row's sampling state.
        drafts: its drafting (`cloud.speculative`), None when it does not draft.
        loop, queue: where its outputs go: `(new ids, reason, scores)` tuples, reason None,
            "eos" or "length", scores None or one `RowScore` per id, or an exception.
        generated: tokens made so far.
        cancelled: set by `Scheduler.cancel` (any thread); the row leaves at the next round.
        done: finished, failed or cancelled, and its admission released.
        failed: an exception was posted.
        timeline: when it was admitted and prefilled (for its spans, `cloud.spans`).
    """

    request_id: str
    prompt: list[int]
    max_tokens: int
    eos: frozenset[int]
    sampling: RowSampling
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    drafts: DraftControl | None = None
    generated: int = 0
    cancelled: bool = False
    admitted: bool = False
    done: bool = False
    failed: bool = False
    timeline: Timeline = field(default_factory=Timeline)

    @property
    def cost(self) -> int:
        """Tokens the request may hold in the cache: prompt + max_tokens."""
        return len(self.prompt) + self.max_tokens

    @property
    def remaining(self) -> int:
        """Tokens it may still make."""
        return self.max_tokens - self.generated


def _deliver(items: list[tuple[Ticket, Any]]) -> None:
    for ticket, item in items:
        ticket.queue.put_nowait(item)


class Scheduler:
    """The batching loop over one model (see the module docstring).

    Args:
        forward: runs the model on (input_ids, attention_mask, position_ids, cache,
            logits_to_keep) and returns logits.
        num_layers: cache layers of the model.
        pad_id: token id of left padding.
        device: the model's device.
        max_rows: most requests admitted at once (prefilling and running).
        max_tokens: most prompt + max_tokens admitted at once (None: no limit).
        prefill_tokens: most prompt tokens (rows x columns) per prefill forward.
        threads: torch threads of the generation thread (None: leave as is).
        sdpa_mask: decode steps pass SDPA's 4D boolean mask (see `decode_step`).
        buckets: decode attention per row range (`cloud.attention`).
        verify_tokens: most rows x columns of a step that checks drafts
            (`cloud.speculative.propose`).
    """

    def __init__(
        self,
        *,
        forward: Forward,
        num_layers: int,
        pad_id: int,
        device: torch.device,
        max_rows: int,
        max_tokens: int | None,
        prefill_tokens: int,
        threads: int | None,
        sdpa_mask: bool = False,
        buckets: bool = False,
        verify_tokens: int = 0,
    ) -> None:
        self._forward = forward
        self._num_layers = num_layers
        self._pad_id = pad_id
        self._device = device
        self._max_rows = max(1, max_rows)
        self._max_tokens = max_tokens
        self._prefill_tokens = max(1, prefill_tokens)
        self._threads = threads
        self._sdpa_mask = sdpa_mask
        self._verify_tokens = verify_tokens
        self._buckets = buckets
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._waiting: deque[Ticket] = deque()
        self._tickets: dict[str, Ticket] = {}
        # Generation thread only:
        self._pending: list[Ticket] = []
        self._prefill: Prefill | None = None
        self._batch: Batch | None = None
        self._rows = 0
        self._tokens = 0
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, Any]]] = {}
        #: Cumulative counters (seconds, steps, tokens) for `stats()` and the bench.
        self.counters: dict[str, float] = dict.fromkeys(
            ("prefill_s", "prefill_chunks", "prefill_columns", "prefill_padded_tokens",
             "prefill_real_tokens", "decode_s", "decode_steps", "decode_rows",
             "decode_live_rows", "rebuild_s", "rebuilds", "verify_steps", "draft_tokens",
             "accepted_tokens"), 0.0,
        )  # fmt: skip

    # ----------------------------------------------------------------- any thread

    @property
    def running(self) -> bool:
        """The generation thread is alive and not stopping."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        """Start the generation thread (once)."""
        with self._cv:
            if self._thread is not None or self._stopping:
                return
            self._thread = threading.Thread(target=self._run, name="hg-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float) -> None:
        """Stop the thread after its current step; what is left fails. Idempotent."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("the generation thread did not stop within %.1fs", timeout)

    def submit(self, ticket: Ticket) -> None:
        """Queue a request (FIFO).

        Raises:
            Unavailable: the thread is not running.
            BadRequest: a request with this id is in flight.
        """
        with self._cv:
            if not self.running:
                raise Unavailable("the generation engine is not running")
            if ticket.request_id in self._tickets:
                raise BadRequest(
                    f"request id {ticket.request_id!r} is already in flight", param="request_id"
                )
            self._tickets[ticket.request_id] = ticket
            self._waiting.append(ticket)
            self._cv.notify_all()

    def cancel(self, request_id: str) -> None:
        """Cancel a request by id (no-op when unknown or finished)."""
        with self._cv:
            ticket = self._tickets.get(request_id)
            if ticket is None:
                return
            ticket.cancelled = True
            if ticket in self._waiting:
                self._waiting.remove(ticket)
                ticket.done = True
            self._cv.notify_all()

    def forget(self, ticket: Ticket) -> None:
        """Drop a request from the id registry (its stream is over)."""
        with self._cv:
            if self._tickets.get(ticket.request_id) is ticket:
                del self._tickets[ticket.request_id]

    def stats(self) -> dict[str, float]:
        """A snapshot: requests in flight, waiting/pending/prefilling/running rows, batch
        rows and width, tokens admitted, and the cumulative `counters`."""
        with self._cv:
            requests, waiting = len(self._tickets), len(self._waiting)
        batch, prefill = self._batch, self._prefill
        return {
            "requests": requests,
            "waiting": waiting,
            "pending": len(self._pending),
            "prefilling": len(prefill.rows) if prefill is not None else 0,
            "running": len(batch.live()) if batch is not None else 0,
            "batch_rows": batch.size if batch is not None else 0,
            "batch_width": batch.width if batch is not None else 0,
            "admitted_tokens": self._tokens,
            **self.counters,
        }

    # -------------------------------------------------------- generation thread

    def _run(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)
        try:
            with torch.inference_mode():
                while self._round():
                    pass
        except BaseException:
            logger.exception("the generation loop crashed")
        finally:
            self._shutdown()

    def _round(self) -> bool:
        with self._cv:
            while not self._stopping and not (
                self._waiting or self._pending or self._prefill or self._batch
            ):
                self._cv.wait()
            if self._stopping:
                return False
            self._admit()
        self._drop_cancelled()
        if self._prefill is None and self._pending:
            self._prefill = self._guarded(self._start_prefill, self._pending)
        if self._prefill is not None:
            self._guarded(self._prefill_step, self._prefill.rows)
            self._flush()
        if self._batch is not None:
            self._guarded(self._decode_step, self._batch.rows)
            self._flush()
        return True

    def _admit(self) -> None:
        """Admit waiting tickets in FIFO order while rows and tokens allow (holds `_cv`)."""
        while self._waiting:
            ticket = self._waiting[0]
            fits_tokens = (
                self._max_tokens is None
                or self._rows == 0
                or self._tokens + ticket.cost <= self._max_tokens
            )
            if self._rows >= self._max_rows or not fits_tokens:
                return
            self._waiting.popleft()
            ticket.admitted, ticket.timeline.admitted_ns = True, time.time_ns()
            self._rows += 1
            self._tokens += ticket.cost
            self._pending.append(ticket)

    def _release(self, ticket: Ticket) -> None:
        if ticket.done:
            return
        ticket.done = True
        if ticket.admitted:
            self._rows -= 1
            self._tokens -= ticket.cost

    def _post(self, ticket: Ticket, item: Any) -> None:
        self._outbox.setdefault(ticket.loop, []).append((ticket, item))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the request's event loop is closed: nobody listens
                for ticket, _ in items:
                    ticket.cancelled = True

    def _fail(self, tickets: Sequence[Ticket | None], make: Callable[[], HybridgenError]) -> None:
        for ticket in tickets:
            if ticket is not None and not ticket.done:
                ticket.failed = True
                self._post(ticket, make())
                self._release(ticket)

    def _guarded(self, step: Callable[[], Any], rows: Sequence[Ticket | None]) -> Any:
        """Run a step; if it raises, fail `rows` (and only them) with `Internal`."""
        try:
            return step()
        except Exception as exc:
            logger.exception("generation step failed (%d requests)", len(rows))
            message = f"generation failed: {type(exc).__name__}: {exc}"
            tickets = list(rows)
            if self._prefill is not None and rows is self._prefill.rows:
                self._prefill = None
            elif self._batch is not None and rows is self._batch.rows:
                self._batch = None
            elif rows is self._pending:
                self._pending = []
            self._fail(tickets, lambda: Internal(message))
            self._flush()
            return None

    def _drop_cancelled(self) -> None:
        for ticket in [t for t in self._pending if t.cancelled]:
            self._pending.remove(ticket)
            self._release(ticket)
        prefill = self._prefill
        if prefill is not None and all(t.cancelled or t.done for t in prefill.rows):
            for ticket in prefill.rows:
                self._release(ticket)
            self._prefill = None
        batch = self._batch
        if batch is not None:
            for index, ticket in enumerate(batch.rows):
                if ticket is not None and ticket.cancelled:
                    batch.rows[index] = None
                    self._release(ticket)
            self._compact()

    def _headroom(self, *batches: Batch | None) -> int:
        return max(
            (t.remaining for b in batches if b is not None for t in b.rows if t is not None),
            default=1,
        )

    def _rebuild(self, batches: list[Batch]) -> Batch | None:
        started = time.perf_counter()
        batch = rebuild(batches, self._headroom(*batches))
        self.counters["rebuild_s"] += time.perf_counter() - started
        self.counters["rebuilds"] += 1
        return batch

    def _compact(self) -> None:
        batch = self._batch
        if batch is not None and not batch.live():
            self._batch = None
        elif batch is not None and batch.needs_compaction():
            self._batch = self._rebuild([batch])

    def _start_prefill(self) -> Prefill:
        """Group the oldest pending request with others of similar prompt length."""
        anchor = self._pending[0]
        chosen = [anchor]
        real, longest = len(anchor.prompt), len(anchor.prompt)
        others = sorted(self._pending[1:], key=lambda t: abs(len(t.prompt) - len(anchor.prompt)))
        for ticket in others:
            size = len(ticket.prompt)
            padded = (len(chosen) + 1) * max(longest, size)
            if padded <= PADDING_SLACK * (real + size):
                chosen.append(ticket)
                real, longest = real + size, max(longest, size)
        chosen.sort(key=self._pending.index)
        group = prefill_group(
            chosen,
            [t.prompt for t in chosen],
            pad_id=self._pad_id,
            num_layers=self._num_layers,
            headroom=max(t.max_tokens for t in chosen),
            device=self._device,
        )
        self._pending = [t for t in self._pending if t not in chosen]
        return group

    def _prefill_step(self) -> None:
        group = self._prefill
        assert group is not None
        started, before = time.perf_counter(), group.done
        logits = prefill_chunk(self._forward, group, self._prefill_tokens // len(group.rows))
        counters = self.counters
        counters["prefill_s"] += time.perf_counter() - started
        counters["prefill_chunks"] += 1
        counters["prefill_columns"] += group.done - before
        counters["prefill_padded_tokens"] += (group.done - before) * len(group.rows)
        counters["prefill_real_tokens"] += int(group.mask[:, before : group.done].sum())
        if logits is None:
            return
        for ticket in group.rows:
            ticket.timeline.prefilled_ns = time.time_ns()
        rows = [t.sampling for t in group.rows]
        tokens = sample_rows(logits, rows)
        scores = row_scores(logits, rows, tokens)
        joined = to_batch(group, tokens)
        self._prefill = None
        self._advance(joined, [[t] for t in tokens], [[s] for s in scores])
        if self._batch is None:
            self._batch = joined
            self._compact()
        else:
            self._batch = self._rebuild([self._batch, joined])

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch is not None
        started = time.perf_counter()
        drafts = speculative.propose(batch.rows, self._verify_tokens)
        if any(drafts):
            tokens, scores = speculative.verify(
                self._forward, batch, drafts, self._pad_id, self.counters, self._sdpa_mask
            )
        else:
            logits = decode_step(
                self._forward, batch, sdpa_mask=self._sdpa_mask, buckets=self._buckets
            )
            rows = [t.sampling if t else _GREEDY for t in batch.rows]
            chosen = sample_rows(logits, rows)
            tokens = [[t] for t in chosen]
            scores = [[s] for s in row_scores(logits, rows, chosen)]
            batch.tokens = torch.tensor(chosen, dtype=torch.long, device=batch.tokens.device)
        counters = self.counters
        counters["decode_s"] += time.perf_counter() - started
        counters["decode_steps"] += 1
        counters["decode_rows"] += batch.size
        counters["decode_live_rows"] += len(batch.live())
        self._advance(batch, tokens, scores)
        self._compact()

    def _advance(
        self, batch: Batch, tokens: list[list[int]], scores: list[list[RowScore | None]]
    ) -> None:
        """Hand each live row its new tokens (with their scores, when the row asked for
        them); rows that finish (or were cancelled) die."""
        for index, (ticket, new) in enumerate(zip(batch.rows, tokens, strict=True)):
            if ticket is None:
                continue
            if ticket.cancelled or ticket.done:
                batch.rows[index] = None
                self._release(ticket)
                continue
            ticket.generated += len(new)
            if ticket.drafts is not None:
                for token in new:
                    ticket.drafts.append(token)
            reason = None
            if new[-1] in ticket.eos:
                reason = "eos"
            elif ticket.generated >= ticket.max_tokens:
                reason = "length"
            scored = [s for s in scores[index] if s is not None]
            self._post(ticket, (new, reason, scored or None))
            if reason is not None:
                batch.rows[index] = None
                self._release(ticket)

    def _shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            left: list[Ticket | None] = list(self._waiting)
            self._waiting.clear()
        left += self._pending
        if self._prefill is not None:
            left += self._prefill.rows
        if self._batch is not None:
            left += self._batch.rows
        self._pending, self._prefill, self._batch = [], None, None
        self._fail(left, lambda: Unavailable("the generation engine stopped"))
        self._flush()
