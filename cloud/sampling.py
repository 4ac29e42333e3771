"""Per-row next-token choice for the cloud engine's batches, in plain torch.

Every row of a batch carries its own `RowSampling`: greedy rows (temperature 0) take the
argmax (one vectorised call for the whole batch); sampled rows apply their temperature,
top-k and top-p and draw with their own `torch.Generator` (seeded when the request gave a
seed, from the OS otherwise), so a seeded row's draws never depend on its neighbours.

Top-p without a full-vocabulary sort: the `_CANDIDATES` most likely tokens are taken with
`topk` and their probabilities computed against the full softmax; when they already hold
`top_p` of the mass (nearly always for a trained model) the cut is made among them, exactly
as a full sort would; otherwise the row falls back to a full sort. A full sort of a 49k
vocabulary costs about a millisecond per row on a CPU core; `topk(256)` a tenth of that.

Constrained rows (`response_format`) carry an `llguidance.LLMatcher`: before the row's
choice its logits are masked to the tokens the grammar allows (`compute_logit_bias`, one
byte per token), after it the token is consumed. Once the grammar is complete only the end
token is allowed, so the row ends as a normal `stop`. Unconstrained rows pay nothing.

Penalized rows (`serving.penalties`) carry their token history (`TokenCounts`): before any
choice, the seen tokens of every such row are gathered into one tensor, penalized by the one
rule of both ends and written back into a float32 copy of the batch's logits, which the rows
choose from (the grammar's mask after it); the log-probabilities are taken from the logits
as the model gave them. Rows without penalties pay nothing, and a batch without any makes no
copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from serving.penalties import TokenCounts, penalize
from serving.sampling import is_greedy

#: Candidates taken with `topk` before falling back to a full sort for top-p.
_CANDIDATES = 256


@dataclass
class RowSampling:
    """How one row picks its next token.

    Attributes:
        temperature: softmax temperature (unused when greedy).
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set of most likely tokens holding this much mass (1: all).
        generator: the row's own random source; None for a greedy row.
        top_logprobs: -1: no log-probabilities; k >= 0: the chosen token's log-probability
            and the k most likely tokens of each step (`row_scores`).
        matcher: the row's `llguidance.LLMatcher` when its output is constrained, else None.
        end_token: what a constrained row emits if its matcher fails (an end token).
        penalties: the tokens the row's penalties read, when any is on (else None).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    top_logprobs: int = -1
    matcher: Any = None
    end_token: int = 0
    penalties: TokenCounts | None = None

    @property
    def greedy(self) -> bool:
        """Whether the row takes the argmax."""
        return self.generator is None

    @classmethod
    def create(
        cls,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        device: torch.device | str = "cpu",
        top_logprobs: int = -1,
        penalties: TokenCounts | None = None,
    ) -> RowSampling:
        """A row's sampling state; greedy when `temperature` is (about) 0.

        Args:
            temperature: softmax temperature; greedy at about 0 (`serving.sampling.is_greedy`).
            top_k: 0 (or >= vocabulary) keeps every token.
            top_p: nucleus mass in (0, 1]; 1 keeps every token.
            seed: seeds the row's generator (repeatable draws); None seeds it from the OS.
            device: where the generator lives (the logits' device).
            penalties: the row's token history when a penalty is on.
        """
        if is_greedy(temperature):
            return cls(temperature=0.0, top_logprobs=top_logprobs, penalties=penalties)
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed) % (2**63 - 1))
        return cls(
            temperature=float(temperature),
            top_k=max(0, int(top_k)),
            top_p=float(top_p),
            generator=generator,
            top_logprobs=top_logprobs,
            penalties=penalties,
        )


def _sample_row(logits: torch.Tensor, row: RowSampling) -> int:
    """Draw one token id from one row's logits ([V], any float dtype)."""
    scores = logits.float() / row.temperature  # [V]
    vocab = scores.shape[0]
    top_k = row.top_k if 0 < row.top_k < vocab else 0
    top_p = row.top_p
    ids: torch.Tensor | None = None
    if top_k or top_p < 1.0:
        count = top_k or min(vocab, _CANDIDATES)
        values, ids = scores.topk(count)  # [C] descending
        if top_p < 1.0:
            probs = torch.exp(values - torch.logsumexp(scores if not top_k else values, dim=0))
            if not top_k and float(probs.sum()) < top_p and count < vocab:
                values, ids = scores.sort(descending=True)  # the candidates fell short
                probs = torch.softmax(values, dim=0)
            before = probs.cumsum(0) - probs  # mass of the more likely tokens
            drop = before >= top_p
            drop[0] = False  # the most likely token always stays
            values = values.masked_fill(drop, float("-inf"))
        scores = values
    probs = torch.softmax(scores, dim=0)
    choice = torch.multinomial(probs, 1, generator=row.generator)
    if ids is not None:
        choice = ids[choice]
    return int(choice)


def sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    """The next token of every row of a batch (penalized rows: from their penalized logits;
    each chosen token joins its row's history).

    Args:
        logits: [B, V] last-position logits (left as they are).
        rows: B sampling states, in batch order.

    Returns:
        B token ids.
    """
    logits = penalize_rows(logits, rows)
    # argmax of bf16 is not vectorised on CPU: fp32 first is faster.
    tokens: list[int] = logits.float().argmax(dim=-1).tolist()  # [B]
    for index, row in enumerate(rows):
        if row.matcher is not None:
            tokens[index] = _constrained_row(logits[index], row)
        elif not row.greedy:
            tokens[index] = _sample_row(logits[index], row)
        if row.penalties is not None:
            row.penalties.observe(tokens[index])
    return tokens


def penalize_rows(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """A float32 copy of `logits` ([B, V]) with every penalized row's seen tokens penalized
    (`serving.penalties.penalize`, one call for the whole batch); `logits` themselves when
    no row has a penalty on."""
    picked: list[int] = []  # the rows with seen tokens, and for each:
    sizes: list[int] = []  # how many
    params: list[tuple[float, float, float]] = []  # its penalties
    token_ids: list[int] = []
    counts: list[int] = []
    for index, row in enumerate(rows):
        history = row.penalties
        if history is None or not history.entries()[0]:
            continue
        ids, seen = history.entries()
        picked.append(index)
        sizes.append(len(ids))
        params.append((history.presence, history.frequency, history.repetition))
        token_ids += ids
        counts += seen
    if not picked:
        return logits
    device = logits.device
    size = torch.tensor(sizes, device=device)  # [R]
    row_ids = torch.tensor(picked, device=device).repeat_interleave(size)  # [N]
    per_entry = torch.tensor(params, device=device).repeat_interleave(size, dim=0)  # [N, 3]
    where = (row_ids, _long_tensor(token_ids, device))
    out = logits.to(torch.float32, copy=True)
    seen_counts = _long_tensor(counts, device)
    out[where] = penalize(out[where], seen_counts, *per_entry.unbind(1))
    return out


def _long_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """A long tensor of a long list, through numpy (`torch.tensor` of a list is ten times
    slower)."""
    array = np.fromiter(values, dtype=np.int64, count=len(values))
    return torch.from_numpy(array).to(device)


def _constrained_row(logits: torch.Tensor, row: RowSampling) -> int:
    """One constrained row's token: masked to what its grammar allows, then consumed."""
    matcher = row.matcher
    allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)
    vocab = logits.shape[0]
    banned = torch.ones(vocab, dtype=torch.bool, device=logits.device)
    shared = min(vocab, allowed.shape[0])
    banned[:shared] = allowed[:shared].to(logits.device) == 0
    if matcher.is_error() or bool(banned.all()):
        return row.end_token  # a broken grammar state: end the row rather than fail the batch
    scores = logits.float().masked_fill(banned, float("-inf"))
    token = int(scores.argmax()) if row.greedy else _sample_row(scores, row)
    matcher.consume_token(token)
    return token


#: One row's scores at one step: the chosen token's log-probability and the most likely
#: tokens as (id, log-probability), most likely first.
RowScore = tuple[float, list[tuple[int, float]]]


def row_scores(
    logits: torch.Tensor, rows: list[RowSampling], tokens: list[int]
) -> list[RowScore | None]:
    """The log-probabilities of the rows that asked for them (`top_logprobs` >= 0), None for
    the others: one log-softmax and one `topk` over just those rows.

    They are the model's (before penalties, temperature, top-k, top-p or a grammar's mask),
    as OpenAI reports them: pass the logits as the model gave them.
    """
    wanted = [i for i, row in enumerate(rows) if row.top_logprobs >= 0]
    out: list[RowScore | None] = [None] * len(rows)
    if not wanted:
        return out
    scores = torch.log_softmax(logits[wanted].float(), dim=-1)  # [W, V]
    picked = torch.tensor([[tokens[i]] for i in wanted], device=scores.device)
    chosen: list[float] = scores.gather(1, picked)[:, 0].tolist()
    k = min(max(rows[i].top_logprobs for i in wanted), scores.shape[-1])
    values: list[list[float]] = [[] for _ in wanted]
    ids: list[list[int]] = [[] for _ in wanted]
    if k > 0:
        top = scores.topk(k, dim=-1)
        values, ids = top.values.tolist(), top.indices.tolist()
    for j, i in enumerate(wanted):
        n = rows[i].top_logprobs
        out[i] = (chosen[j], list(zip(ids[j][:n], values[j][:n], strict=True)))
    return out
