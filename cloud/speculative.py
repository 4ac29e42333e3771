"""Speculative decoding in the cloud engine's batch: drafts per row, checked in one forward.

Each running row that may draft (`Ticket.drafts`: on unless the worker or the request turned
it off; never under a grammar) proposes up to `DraftSettings.tokens` tokens by the rule the
edge uses (`serving.drafts`: prompt lookup over the request's prompt and answer, the back-off
after failed drafts), never more than its `max_tokens` leaves room for. When any row has a
draft, the step appends every row's next token and its draft in one batched forward
(`cloud.batching.verify_step`) and walks the positions in order: at each one, the rows still
walking choose their token as a plain decode step does (`cloud.sampling.sample_rows`: the
row's penalties, grammar, temperature, top-k, top-p and its own generator), and a row keeps
walking while its choice equals its draft's token. A row's tokens are thus the ones it would
have chosen one step at a time: the draft only decides how many positions one forward
settles. For a single-token draft (a point mass) this is speculative sampling's exact rule,
so greedy answers, sampled distributions and a seeded row's draws are those of plain
decoding, and the log-probabilities are each token's own.

The batch's rows share one column axis, so every row of a verify pays the longest draft's
columns, drafting or not. A step checks drafts only while rows x columns stay within
`verify_tokens` (`propose`): on a CPU a forward's cost grows with the tokens it holds, and a
verify of many rows costs more than their drafts save; a lone row drafts up to the whole
draft (docs/cloud.md, "Speculative decoding", has the measurements).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from cloud.batching import Batch, Forward, keep_verified, verify_step
from cloud.sampling import RowScore, row_scores, sample_rows

if TYPE_CHECKING:
    from cloud.scheduler import Ticket


def propose(tickets: Sequence[Ticket | None], verify_tokens: int) -> list[list[int]]:
    """Each row's draft: [] for a dead row, one that does not draft, or one waiting after
    failed drafts; room is left for the chosen token and one after the draft. The verify
    holds every row (dead ones too) times 1 + the longest draft: within `verify_tokens`,
    or no row drafts this step."""
    limit = verify_tokens // max(1, len(tickets)) - 1
    drafts: list[list[int]] = []
    for ticket in tickets:
        if limit < 1 or ticket is None or ticket.cancelled or ticket.drafts is None:
            drafts.append([])
        else:
            drafts.append(ticket.drafts.propose(min(limit, ticket.remaining - 1)))
    return drafts


def walk(
    logits: torch.Tensor, tickets: Sequence[Ticket | None], drafts: Sequence[Sequence[int]]
) -> tuple[list[list[int]], list[list[RowScore | None]]]:
    """Every live row's tokens from a verify's logits ([B, 1 + k, V]) and their scores.

    Position by position, the rows still walking choose their token (one `sample_rows` over
    them, so penalties read the tokens chosen before); a row stops at its first choice that
    differs from its draft, after its whole draft, or at an end token. Dead rows get [].
    """
    out: list[list[int]] = [[] for _ in tickets]
    scores: list[list[RowScore | None]] = [[] for _ in tickets]
    walking = [i for i, ticket in enumerate(tickets) if ticket is not None]
    for index in walking:
        control = tickets[index].drafts  # type: ignore[union-attr]
        if control is not None and drafts[index]:
            control.begin(len(drafts[index]))
    position = 0
    while walking:
        rows = [tickets[i].sampling for i in walking]  # type: ignore[union-attr]
        at = logits[walking, position]  # [R, V]
        chosen = sample_rows(at, rows)
        scored = row_scores(at, rows, chosen)
        still: list[int] = []
        for index, token, score in zip(walking, chosen, scored, strict=True):
            ticket = tickets[index]
            assert ticket is not None
            out[index].append(token)
            scores[index].append(score)
            draft = drafts[index]
            if position < len(draft) and token == draft[position] and token not in ticket.eos:
                still.append(index)
                assert ticket.drafts is not None
                ticket.drafts.accept()
        walking, position = still, position + 1
    for index, draft in enumerate(drafts):
        ticket = tickets[index]
        if draft and ticket is not None and ticket.drafts is not None:
            ticket.drafts.end()
    return out, scores


def verify(
    forward: Forward,
    batch: Batch,
    drafts: Sequence[Sequence[int]],
    pad_id: int,
    counters: dict[str, float],
    sdpa_mask: bool = False,
) -> tuple[list[list[int]], list[list[RowScore | None]]]:
    """One speculative step of the running batch: each row's new tokens and their scores;
    the batch keeps the columns of the tokens in its cache and feeds each row's last next.
    `counters` count the step, the tokens drafted and those accepted."""
    logits = verify_step(forward, batch, drafts, pad_id, sdpa_mask=sdpa_mask)
    tokens, scores = walk(logits, batch.rows, drafts)
    kept = [max(1, len(new)) for new in tokens]
    keep_verified(batch, kept, [new[-1] if new else pad_id for new in tokens])
    counters["verify_steps"] += 1
    for draft, new in zip(drafts, tokens, strict=True):
        if draft:
            counters["draft_tokens"] += len(draft)
            counters["accepted_tokens"] += len(new) - 1
    return tokens, scores
