"""The edge's confidence signal: prompt perplexity read from the prefill logits.

Torch-free (numpy only): the edge runtime imports it to route, and the build's calibration
to choose the threshold, so both read the signal the same way. The prompt's logits come from
the prefill itself (`models.logits.teacher_forced`), so the signal costs no second pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from models.logits import perplexity, teacher_forced


def scored_positions(n: int, span: tuple[int, int] | None = None) -> range:
    """Prompt positions whose tokens the perplexity scores: `span` (or all), never position 0.

    Position 0 has no context to be predicted from, so it is never scored.
    """
    start, end = span if span is not None else (0, n)
    return range(max(1, start), min(n, end))


def prompt_perplexity(
    logits: np.ndarray, token_ids: list[int], span: tuple[int, int] | None = None
) -> float | None:
    """Perplexity of a prompt (or of a span of it) from its prefill logits.

    Args:
        logits: (n, V) logits of every prompt position.
        token_ids: the n prompt token ids.
        span: [start, end) token positions to score (e.g. a chat message's content, not its
            role tags); None scores the whole prompt.

    Returns:
        exp(-mean log p(token[i] | token[..i-1])) over the scored positions i
        (`scored_positions`), or None when there is none.
    """
    positions = scored_positions(len(token_ids), span)
    if not positions:
        return None
    # Position i-1 predicts token i; the scored positions are contiguous, so this is a view.
    predicted = logits[positions.start - 1 : positions.stop - 1]
    targets = np.asarray(token_ids, dtype=np.int64)[positions.start : positions.stop]
    return perplexity(predicted, targets)


def encode_with_span(
    encode: Callable[[str], list[int]], text: str, char_span: tuple[int, int] | None
) -> tuple[list[int], tuple[int, int]]:
    """Token ids of `text` and the token span of its characters `char_span`.

    The span is found by tokenizing the text up to the span's start and up to its end: with
    byte-level BPE and special tokens (a chat message's content sits between `<|role|>\\n`
    and `<|end|>`) both are prefixes of the whole. When they are not (a merge across the
    boundary), the whole prompt is the span.
    """
    ids = encode(text)
    whole = (0, len(ids))
    if char_span is None:
        return ids, whole
    start, end = char_span
    if not 0 <= start < end <= len(text):
        return ids, whole
    head = encode(text[:start]) if start else []
    upto = encode(text[:end])
    if ids[: len(upto)] != upto or upto[: len(head)] != head or len(upto) <= len(head):
        return ids, whole
    return ids, (len(head), len(upto))


def prefill(
    generator: Any, ids: Sequence[int], span: tuple[int, int] | None = None, *, start: int = 0
) -> float | None:
    """Feed a prompt to an onnxruntime-genai `Generator` and return its perplexity over `span`.

    The edge runtime (serving) and the build's calibration (choosing the threshold) both
    call this, so the threshold is measured exactly the way the router reads it. The ids go
    in `PREFILL_CHUNK`-token chunks (`models.logits.teacher_forced`), each chunk's
    perplexity weighted by its scored tokens.

    Args:
        generator: a fresh `og.Generator` (its search options sized for the prompt).
        ids: the prompt's token ids.
        span: [start, end) token positions to score (`scored_positions`); None: all.
        start: how many leading ids the generator already holds (a kept prefix, rewound to
            it); only `ids[start:]` is appended, so scored positions must lie after `start`.

    Returns:
        The prompt perplexity (`prompt_perplexity` over the scored positions), or None when
        no position is scored.

    Raises:
        ValueError: a scored position lies in the kept prefix.
    """
    positions = scored_positions(len(ids), span)
    nll = 0.0
    for rows, targets in teacher_forced(generator, ids, positions, start=start):
        nll += float(np.log(perplexity(rows, targets))) * len(targets)
    return float(np.exp(nll / len(positions))) if positions else None
