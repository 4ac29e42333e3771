"""Persona prefix reuse: kept generators by key, in an LRU bounded by their KV bytes.

A request may name a stable prompt prefix (`submit(prefix_key=..., prefix_len=...)`: a user's
persona/system message, rendered and tokenized). When it ends, its generator is kept here (one
per key, bounded by an estimate of its KV bytes: layers x KV heads x head size x 2 x dtype
bytes per position, times the generator's `max_length`, since onnxruntime-genai's CPU builds
share one past/present buffer sized to it). The next request with that key takes it
(exclusively: a second request with the same key meanwhile simply prefills a generator of its
own; the one released last is kept), `rewind_to(n)` and appends only the rest of its prompt.

A kept generator holds only the KV cache: the edge samples each token itself with the
request's own random generator (`edge.runtime.sampler`), and the request's job holds its
penalties' counts and its grammar's matcher. So the key is the prefix key alone, and any
sampling options, seed, penalties or grammar may reuse it. Its `max_length` is the request's
need rounded up to `PREFIX_LENGTH_STEP`; a later request that needs more prefills a fresh,
larger one, which then replaces it. The kept prefix tokens are compared with the request's
before reuse, so a key reused for another persona falls back to a full prefill. The prompt
perplexity still works: `n` stays below the first scored position (the user's message lies
after the persona), so a request scoring the prefix itself does not reuse. Greedy and seeded
outputs are the same as without reuse (tested).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.scoring import scored_positions

#: A kept generator's max_length is the request's need rounded up to this many tokens.
PREFIX_LENGTH_STEP = 256
#: A request submitted this soon after its user was forgotten was prepared before it: its
#: prefix is not kept (`PrefixCache.forget`).
FORGET_GRACE_S = 30.0


def prefix_length(prompt_ids: Sequence[int], prefix_ids: Sequence[int]) -> int:
    """`len(prefix_ids)` when they are exactly the first tokens of `prompt_ids`, else 0.

    The caller of `EdgeRuntime.submit(prefix_len=...)` tokenizes the persona/system part of
    the rendered chat on its own; a merge across its boundary makes it no prefix of the
    prompt's ids, and then it must not be reused (0 turns reuse off for that request).
    """
    n = len(prefix_ids)
    return n if 0 < n <= len(prompt_ids) and list(prompt_ids[:n]) == list(prefix_ids) else 0


def prefix_eligible(
    prefix_key: Hashable | None,
    prefix_len: int,
    prompt_ids: Sequence[int],
    budget_bytes: int,
) -> bool:
    """Whether a request may reuse or keep a prefix (else it runs as without a key). A kept
    generator holds only the KV cache (the edge samples and holds any grammar itself), so
    any sampling options or grammar may reuse it."""
    return prefix_key is not None and budget_bytes > 0 and 0 < prefix_len <= len(prompt_ids)


def reusable_depth(
    prompt_ids: Sequence[int], prefix_len: int, score_span: tuple[int, int] | None
) -> int:
    """How many prompt tokens a kept prefix may supply: the prefix, but at least one token
    must be appended (for the next token's logits) and every scored position needs the
    logits of the position before it, so the depth stays below those."""
    depth = min(prefix_len, len(prompt_ids) - 1)
    scored = scored_positions(len(prompt_ids), score_span)
    if scored:
        depth = min(depth, scored.start - 1)
    return max(depth, 0)


def kv_bytes_per_token(model_dir: Path) -> int:
    """Estimated KV-cache bytes per position from `genai_config.json`: layers x KV heads x
    head size x 2 (key and value) x 4 (float32, as the CPU builds keep the cache; 2 for a
    folder named fp16/bf16)."""
    try:
        config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
        decoder = config["model"]["decoder"]
        heads = int(decoder.get("num_key_value_heads") or decoder["num_attention_heads"])
        head_size = int(
            decoder.get("head_size") or decoder["hidden_size"] // decoder["num_attention_heads"]
        )
        layers = int(decoder["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return 1 << 16  # unknown layout: a generous guess keeps the budget meaningful
    dtype_bytes = 2 if "fp16" in model_dir.name or "bf16" in model_dir.name else 4
    return layers * heads * head_size * 2 * dtype_bytes


@dataclass
class Kept:
    """An idle generator holding a persona prefix (and whatever followed it last time)."""

    generator: Any
    prefix_ids: tuple[int, ...]
    max_length: int
    nbytes: int


class PrefixCache:
    """Kept generators by key, least recently used first, bounded by their KV bytes.

    Worker thread only (`clear` also after it stopped); the lock guards the readers of
    `nbytes` / `keys` on other threads.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Hashable, Kept] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.evictions = 0
        # Forgotten owners (`forget`): requests started before one, or submitted less than
        # FORGET_GRACE_S after it (prepared before it), keep nothing it matches.
        self.epoch = 0
        self._forgotten: deque[tuple[int, float, Callable[[Hashable], bool]]] = deque(maxlen=256)

    def forget(self, match: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose prefix key `match`es; a request in flight since keeps none.

        Returns:
            How many entries were dropped.
        """
        with self._lock:
            self.epoch += 1
            self._forgotten.append((self.epoch, time.perf_counter(), match))
            gone = [key for key in self._entries if match(key)]
            for key in gone:
                self.nbytes -= self._entries.pop(key).nbytes
            return len(gone)

    def _was_forgotten(self, key: Hashable, since: int, submitted: float) -> bool:
        """Whether an owner of `key` was forgotten after epoch `since`, or less than
        `FORGET_GRACE_S` before `submitted` (unsure: True)."""
        if since < self.epoch and (not self._forgotten or self._forgotten[0][0] > since + 1):
            return True  # forgets since the request started fell out of the record
        return any(
            (epoch > since or at > submitted - FORGET_GRACE_S) and match(key)
            for epoch, at, match in self._forgotten
        )

    def snapshot(self) -> list[Hashable]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def take(self, key: Hashable) -> Kept | None:
        """Remove and return the entry of `key` (the caller owns it until `put`)."""
        with self._lock:
            kept = self._entries.pop(key, None)
            if kept is not None:
                self.nbytes -= kept.nbytes
            return kept

    def put(self, key: Hashable, kept: Kept, since: int = 0, submitted: float = 0.0) -> None:
        """Keep `kept` as the most recent entry of `key`, evicting the oldest beyond budget
        (not when its owner was forgotten since its request, `_was_forgotten`)."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            if kept.nbytes > self.budget_bytes or self._was_forgotten(key, since, submitted):
                self.evictions += 1
                return
            self._entries[key] = kept
            self.nbytes += kept.nbytes
            while self.nbytes > self.budget_bytes:
                _, oldest = self._entries.popitem(last=False)
                self.nbytes -= oldest.nbytes
                self.evictions += 1

    def clear(self) -> None:
        """Drop every kept generator (their memory goes with them)."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0
