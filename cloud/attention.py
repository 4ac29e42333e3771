"""Decode-step attention over row buckets, so short rows skip the long rows' padding.

In a left-padded batch every row's attention spans the batch's full width, though a short
row's keys start far to the right: a decode step over the full width costs attention over
padding that a step over the rows' own lengths does not.

The engine keeps the rows of its batch sorted by length (longest first, `rebuild`), and
for each decode step it splits them into a few contiguous row ranges (`row_buckets`), each
with the first column any of its rows needs. The attention function registered here
(`install`: transformers' `AttentionInterface`, mask creation as for SDPA) then runs
transformers' own SDPA attention once per range on a view of the cache from that column
on — the same kernel on fewer columns; a range is a slice of the batch, so no copy. Outside
the engine's decode steps (prefill, `model.generate`) it is transformers' SDPA attention,
unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

#: The attention implementation name this module registers.
NAME = "hg_sdpa_rows"
#: Cost of one more range, in row x column units (a kernel call per layer and a concat).
RANGE_OVERHEAD = 192
#: Most ranges per step.
MOST_RANGES = 4

#: (first row, end row, first column) ranges of the decode step running in this thread.
Plan = list[tuple[int, int, int]]
_state = threading.local()


def row_buckets(
    starts: Sequence[int],
    width: int,
    *,
    overhead: int = RANGE_OVERHEAD,
    most: int = MOST_RANGES,
) -> Plan:
    """Split rows into contiguous ranges minimising attended columns plus range overhead.

    Args:
        starts: each row's first real column, in batch order.
        width: the batch's columns.
        overhead: the cost of a range, in row x column units.
        most: the most ranges.

    Returns:
        (first row, end row, first column) per range, covering every row in order.
    """
    rows = len(starts)
    infinite = float("inf")
    best = [[infinite] * (rows + 1) for _ in range(most + 1)]
    back: list[list[tuple[int, int]]] = [[(0, 0)] * (rows + 1) for _ in range(most + 1)]
    best[0][0] = 0.0
    for count in range(1, most + 1):
        for end in range(1, rows + 1):
            low = width
            for first in range(end - 1, -1, -1):
                low = min(low, starts[first])
                cost = best[count - 1][first] + (end - first) * (width - low) + overhead
                if cost < best[count][end]:
                    best[count][end], back[count][end] = cost, (first, low)
    count = min(range(1, most + 1), key=lambda c: best[c][rows])
    plan: Plan = []
    end = rows
    while count:
        first, low = back[count][end]
        plan.append((first, end, low))
        end, count = first, count - 1
    return plan[::-1]


@contextmanager
def decode_plan(plan: Plan | None) -> Iterator[None]:
    """Attention of this thread's forward calls inside the block follows `plan`."""
    _state.plan = plan
    try:
        yield
    finally:
        _state.plan = None


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, once per row range of the current decode plan."""
    plan: Plan | None = getattr(_state, "plan", None)
    if (
        plan is None
        or len(plan) < 2
        or query.shape[2] != 1
        or attention_mask is None
        or attention_mask.dim() != 4
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(
            module,
            query[first:end],
            key[first:end, :, column:],
            value[first:end, :, column:],
            attention_mask[first:end, :, :, column:],
            **kwargs,
        )[0]
        for first, end, column in plan
    ]
    return torch.cat(outputs, dim=0), None


def implementation(model: Any) -> str | None:
    """The attention implementation a model runs ("sdpa", "eager", this module's `NAME`).

    transformers keeps it only in the private `config._attn_implementation` (no public
    getter in the release pyproject.toml pins); this is the one place that reads it, and
    `tests/test_cloud_internals.py` fails if a transformers upgrade moves it.
    """
    return getattr(model.config, "_attn_implementation", None)


def install(model: Any) -> bool:
    """Switch a model that runs SDPA attention to this module's; False if it does not."""
    if implementation(model) != "sdpa":
        return False
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except Exception:  # a model that cannot switch keeps plain SDPA
        return False
    return implementation(model) == NAME
