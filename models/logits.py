"""Log-probabilities from raw logits: the one copy the edge and the models lab read.

Numpy only (no torch), so the edge runtime, the per-user adapter, the confidence signal, the
build's calibration and the benches all compute them the same way:

- `log_softmax`: a whole row (in the logits' own dtype), or one entry of a (V,) row without
  building the row (the runtime's per-token log-probability);
- `logsumexp`: of a (V,) row, shifted only when its max is far from 0 (adapter mixing);
- `log_softmax_at` and `perplexity`: per-row log-probabilities of target ids, and the
  perplexity of the targets, a block of rows at a time through one reused buffer;
- `teacher_forced`: token ids fed to an onnxruntime-genai `Generator` in chunks, and the
  logits rows that predict the scored positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

#: Tokens appended per `append_tokens` call when ids are teacher-forced (a prompt's prefill).
PREFILL_CHUNK = 64
#: Bytes of one block of rows that `log_softmax_at` and `perplexity` work through at once.
BLOCK_BYTES = 256 * 1024


def log_softmax(logits: np.ndarray, index: int | None = None) -> np.ndarray | float:
    """Log-softmax over the last axis, or only the log-probability of entry `index`.

    Args:
        logits: (..., V) raw logits (any float dtype; the result keeps it).
        index: with a 1-D `logits`, return just `log p[index]` as a float: one max, one
            exp-and-sum over V and a subtraction, without building the (V,) result (per
            decoded token this is the cheap path; float32 is exact enough here: the max is
            subtracted first and numpy sums pairwise).

    Returns:
        The (..., V) log-probabilities, or a float when `index` is given.
    """
    peak = logits.max(axis=-1, keepdims=True)
    if index is not None:
        total = float(np.exp(logits - peak).sum())
        return float(logits[index] - peak[0]) - float(np.log(total))
    shifted = logits - peak
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def logsumexp(logits: np.ndarray) -> float:
    """log(sum(exp(logits))) of a 1-D array, stable.

    The max is subtracted only when it is far from 0 (|max| >= 60: exp could overflow or
    underflow in float32); otherwise exp runs on the logits directly, which saves one pass
    over V.
    """
    peak = float(logits.max())
    if -60.0 < peak < 60.0:
        return math.log(float(np.exp(logits).sum()))
    return peak + math.log(float(np.exp(logits - peak).sum()))


def _row_blocks(logits: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """Blocks of rows of (n, V) `logits` (`BLOCK_BYTES` each) and their logsumexp (float64).

    The shift, exp and sums run in the logits' own precision (at least float32) through one
    reused buffer that stays in cache, instead of whole-array temporaries; numpy sums
    pairwise (float32: relative error ~1e-6 over V). Only the logsumexp is float64.
    """
    dtype = np.result_type(logits.dtype, np.float32)  # float32 logits stay float32
    rows = max(1, BLOCK_BYTES // (dtype.itemsize * max(1, logits.shape[-1])))
    buffer = np.empty((min(rows, len(logits)), logits.shape[-1]), dtype=dtype)
    for first in range(0, len(logits), rows):
        block = logits[first : first + rows]
        scratch = buffer[: block.shape[0]]
        peak = block.max(axis=-1)
        np.subtract(block, peak[:, None], out=scratch)
        np.exp(scratch, out=scratch)
        lse = peak.astype(np.float64) + np.log(scratch.sum(axis=-1).astype(np.float64))
        yield slice(first, first + block.shape[0]), lse


def log_softmax_at(logits: np.ndarray, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """log-softmax of each row of `logits` ((n, V)) at the matching id of `ids`, in float64.

    Computed as `logit - logsumexp` of each row, the logits first made float64.
    """
    rows = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(ids, dtype=np.int64)
    out = np.empty(len(targets), dtype=np.float64)
    for block, lse in _row_blocks(rows):
        chosen = rows[block][np.arange(block.stop - block.start), targets[block]]
        out[block] = chosen - lse
    return out


def perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """exp(-mean log p(targets[i])) under the rows of `logits` ((n, V), n >= 1).

    Sums in the logits' own precision (float32 logits stay float32, see `_row_blocks`), the
    negative log-likelihood in float64.
    """
    nll = 0.0
    for block, lse in _row_blocks(logits):
        rows = logits[block]
        chosen = rows[np.arange(rows.shape[0]), targets[block]]
        nll += float((lse - chosen).sum())
    return float(np.exp(nll / len(targets)))


def teacher_forced(
    generator: Any,
    ids: Sequence[int],
    positions: range,
    *,
    start: int = 0,
    chunk: int | None = PREFILL_CHUNK,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Feed `ids[start:]` to an onnxruntime-genai `Generator`; yield the logits of `positions`.

    `Generator.get_output("logits")` right after `append_tokens` returns the model's raw
    output for every appended position ((1, c, V)); the row of position i - 1 predicts the
    token at position i. The ids go in `chunk`-token calls: `append_tokens` holds the GIL
    for its whole forward pass, so between chunks the caller's event loop runs, and a
    chunk's logits stay small enough for their copies to reuse heap pages. The logits are
    read only for a chunk that predicts a scored position.

    Args:
        generator: an `og.Generator` holding `ids[:start]` (a fresh one, or one rewound to a
            kept prefix), with room for all of `ids`.
        ids: the whole token sequence.
        positions: the contiguous token positions scored, all after `start`.
        start: how many leading ids the generator already holds.
        chunk: ids appended per call; None: all in one call.

    Yields:
        For each chunk that predicts scored positions, `(rows, targets)`: its (m, V) logits
        rows (read them before the next chunk is appended) and the m token ids they predict.
        The ids are appended as the iteration goes: run it to the end.

    Raises:
        ValueError: a scored position lies in the held prefix.
    """
    if positions and positions.start <= start:
        raise ValueError(f"scored position {positions.start} lies in the kept prefix ({start})")
    step = chunk or max(1, len(ids) - start)
    for first in range(start, len(ids), step):
        last = min(len(ids), first + step)
        generator.append_tokens(np.asarray(ids[first:last], dtype=np.int32))
        # Rows first..last-1 of this chunk predict tokens first+1..last.
        low, high = max(positions.start, first + 1), min(positions.stop, last + 1)
        if low < high:
            logits = np.asarray(generator.get_output("logits"))[0]  # (last - first, V)
            targets = np.asarray(ids[low:high], dtype=np.int64)
            yield logits[low - 1 - first : high - 1 - first], targets
