"""The edge's confidence signal: prompt perplexity read from the prefill logits.

Torch-free (numpy only): the edge runtime imports it to route, and the build's calibration
to choose the threshold, so both read the signal the same way. ORT-GenAI's
`Generator.get_output("logits")` right after `append_tokens(prompt)` returns the model's raw
output for every prompt position ((1, n, V)); it matches step-by-step logits to 3e-6 and
costs ~3% of the prefill it rides on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: Prompt tokens appended per call during a prefill (see `prefill`).
PREFILL_CHUNK = 64


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
    # A few rows (~256 KiB) at a time through one reused buffer that stays in cache: for 256
    # positions x V=49152 (50 MB of float32) this takes ~13 ms, against ~48 ms with
    # whole-array temporaries (fancy-indexed copy, shifted copy, exp copy). Sums are in the
    # logits' own precision; numpy sums pairwise (float32: relative error ~1e-6 over V).
    dtype = np.result_type(logits.dtype, np.float32)  # float32 logits stay float32
    rows = max(1, (256 * 1024) // (dtype.itemsize * max(1, logits.shape[-1])))
    buffer = np.empty((min(rows, len(positions)), logits.shape[-1]), dtype=dtype)
    nll = 0.0
    for first in range(0, len(positions), rows):
        block = predicted[first : first + rows]
        scratch = buffer[: block.shape[0]]
        peak = block.max(axis=-1)
        np.subtract(block, peak[:, None], out=scratch)
        np.exp(scratch, out=scratch)
        lse = peak.astype(np.float64) + np.log(scratch.sum(axis=-1).astype(np.float64))
        chosen = block[np.arange(block.shape[0]), targets[first : first + rows]]
        nll += float((lse - chosen).sum())
    return float(np.exp(nll / len(positions)))


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
    call this, so the threshold is measured exactly the way the router reads it.

    Args:
        generator: a fresh `og.Generator` (its search options sized for the prompt).
        ids: the prompt's token ids.
        span: [start, end) token positions to score (`scored_positions`); None: all.
        start: how many leading ids the generator already holds (a kept prefix, rewound to
            it); only `ids[start:]` is appended, so scored positions must lie after `start`.

    Returns:
        The prompt perplexity (`prompt_perplexity` over the scored positions), or None when
        no position is scored.
    """
    # The prompt goes in 64-token chunks. `append_tokens` holds the GIL for the whole
    # forward pass (unlike `generate_next_token`/`get_logits`), so one call on a long
    # prompt froze the event loop for the whole prefill (~0.7 s for 256 tokens of
    # SmolLM2-135M at 1 thread); between chunks it runs. Each chunk's logits (1, c, V)
    # are scored at once: 64 x V=49152 floats (12.5 MB) stays under the 32 MB ceiling of
    # glibc's dynamic mmap threshold, so the copies reuse heap pages instead of faulting
    # in a fresh 50 MB per prompt. 256 tokens, logits copies included: 663 ms chunked vs
    # 747 ms in one call at 1 thread (SmolLM2-135M int4; 0.80x on a random 124M Llama),
    # within 4% at 2 threads on a busy machine; same perplexity and next token. Event
    # loop stalls during that prefill: 690-710 ms before, 170-210 ms now.
    # Rows first..last-1 of this chunk predict tokens first+1..last.
    positions = scored_positions(len(ids), span)
    if positions and positions.start <= start:
        raise ValueError(f"scored position {positions.start} lies in the kept prefix ({start})")
    nll = 0.0
    for first in range(start, len(ids), PREFILL_CHUNK):
        last = min(len(ids), first + PREFILL_CHUNK)
        generator.append_tokens(list(ids[first:last]))
        # Rows first..last-1 of this chunk predict tokens first+1..last.
        low, high = max(positions.start, first + 1), min(positions.stop, last + 1)
        if low < high:
            logits = generator.get_output("logits")[0]  # (last - first, V)
            part = prompt_perplexity(
                logits, list(ids[first : last + 1]), (low - first, high - first)
            )
            nll += float(np.log(part)) * (high - low) if part is not None else 0.0
    return float(np.exp(nll / len(positions))) if positions else None
