"""One decode step of a request at the edge: the edge's own sampling, with drafts.

The request's chosen token is not yet in the model's KV cache when a step starts (it is
`Job.pending`; right after the prefill there is none, and the prefill's last logits give the
first token). A step appends the pending token and the draft (`edge.runtime.drafts`) in one
`append_tokens`, reads every appended position's logits (`get_output("logits")`), and walks
them in order: at each position the worker turns the model's logits into the request's
distribution (the user's mixture, the penalties, the grammar's mask) and draws a token
(`edge.runtime.sampler`). A draw equal to the draft's next token accepts it and the walk
goes on; the first draw that differs (or the draw after the whole draft) is the next pending
token. The rejected tail is then dropped from the KV cache with `rewind_to`.

This is speculative decoding's exact rule for a draft of single tokens (a point mass): each
token is drawn from the model's own distribution at its place, so greedy answers, sampled
distributions and seeded answers are those of plain decoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge.runtime.guided import grammar_draft, masked
from edge.runtime.sampler import choose
from edge.runtime.steps import mixed_row, penalized_row

if TYPE_CHECKING:
    from edge.runtime.jobs import Job


def draft_for(job: Job) -> list[int]:
    """The draft to check after the pending token: room for it and a token after it within
    `max_tokens`, none for a request that turned drafting off."""
    control = job.drafts
    if control is None or job.pending is None:
        return []
    # The pending token is counted already; a verify of k drafts may add k + 1 tokens.
    limit = job.remaining - 1
    lookup = control.propose(limit, job.adapter, job.context)
    if job.matcher is None:
        return lookup
    return grammar_draft(job.matcher, lookup, min(limit, control.settings.tokens))


def step_rows(job: Job, draft: list[int]) -> np.ndarray:
    """Run the forward pass of a step: the logits (n, V) of the pending token and the draft
    (or, right after the prefill, of the prompt's last position)."""
    generator = job.generator
    if job.pending is None:
        return np.asarray(generator.get_logits())[0]
    generator.append_tokens(np.asarray([job.pending, *draft], dtype=np.int32))
    job.kv_length += 1 + len(draft)
    if not draft:
        return np.asarray(generator.get_logits())[0]
    return np.asarray(generator.get_output("logits"))[0]


def draw(job: Job, row: np.ndarray) -> tuple[int, np.ndarray, float | None]:
    """The request's token at one position: (token, the logits its log-probability reads,
    their mixed logsumexp or None)."""
    logits = np.array(row, dtype=np.float32)  # a copy: mixed in place
    mixed_lse = mixed_row(job.adapter, job.context, logits) if job.adapter is not None else None
    sampled = penalized_row(job.penalties, logits) if job.penalties is not None else logits
    if job.matcher is None:
        return choose(sampled, job.options, job.rng), logits, mixed_lse
    allowed = masked(job.matcher, sampled)
    token = job.end_token if allowed is None else choose(allowed, job.options, job.rng)
    job.matcher.consume_token(token)
    return token, logits, mixed_lse


def rewind(job: Job, drafted: int, accepted: int) -> None:
    """Drop the draft's unaccepted tail from the KV cache (the pending token and the first
    `accepted` of `drafted` tokens stay)."""
    if accepted < drafted:
        job.kv_length -= drafted - accepted
        job.generator.rewind_to(job.kv_length)
