"""The running batch of the cloud engine: left-padded rows over one preallocated KV cache.

A `Batch` is B rows sharing one column axis: row i's tokens are right-aligned, the columns
to their left are padding (`mask` 0). Each decode step appends one column to every row;
`position_ids` are per row (the count of real tokens), so padding never shifts a row's
positions and a row computes the same logits as it would alone (up to the last bits of a
batched matmul).

The cache is a transformers `Cache` whose layers are `SlabLayer`s: keys and values live in
one preallocated `[B, heads, capacity, head_dim]` buffer per layer and a step writes its
column in place, where transformers' `DynamicLayer` concatenates, copying the whole cache
of every layer on every step. `capacity` is the batch's
width plus the largest number of tokens a row may still make (at most `GROWTH`; a full
slab grows by `GROWTH` columns).

A speculative step (`verify_step`, `cloud.speculative`) appends 1 + k columns to every row
at once: each row's next token and its draft, padded on the right for rows with a shorter
draft or none; `keep_verified` then keeps, per row, the columns of its accepted tokens and
masks the rest, and the slab drops the columns no row kept. A row that kept fewer columns
than another has masked columns (holes) in the middle: its positions stay its own, so it
computes what it would alone; a rebuild squeezes them out.

Rows join and leave by rebuilding: `prefill_group` makes a new batch for newly admitted
requests (left-padded together, fed in chunks of columns); `rebuild` copies the live rows of
one or more batches into a new slab, right-aligned to the widest one, dropping the padding
columns and holes that no live row needs any more. A finished or cancelled row is only marked dead
(its row slot keeps computing a token nobody reads) until a quarter of the rows are dead or
another group joins: one copy of the cache instead of one per finished row; likewise holes
are squeezed once a quarter of the columns could go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Cache, DynamicLayer

from cloud.attention import Plan, decode_plan, row_buckets

#: Columns a full slab grows by, and the most headroom a rebuilt slab gets.
GROWTH = 256

#: `forward(input_ids, attention_mask, position_ids, cache, logits_to_keep) -> logits`.
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Cache, int], torch.Tensor]


class SlabLayer(DynamicLayer):
    """One layer's keys and values in a preallocated buffer, filled left to right.

    `keys`/`values` (what attention reads) are views of the filled columns, so transformers'
    mask sizing (`get_seq_length`, `get_mask_sizes`) works unchanged. It relies on
    `DynamicLayer`'s attributes (`keys`, `values`, `is_initialized`, `device`) and its
    `lazy_initialization` hook, which transformers does not document as public: the release
    pyproject.toml pins, and `tests/test_cloud_internals.py` checks a slab against a
    `DynamicLayer` so that an upgrade that changes them fails there first.

    Args:
        capacity: columns to allocate on the first update (at least what it brings).
    """

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    @classmethod
    def from_buffers(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> SlabLayer:
        """A layer over existing `[B, H, capacity, D]` buffers whose first `length` columns
        are filled."""
        layer = cls(keys.shape[2])
        layer.key_buffer, layer.value_buffer = keys, values
        layer.device = keys.device
        layer.is_initialized = True
        layer._fill(length)
        return layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, columns, _ = key_states.shape
        capacity = max(self.capacity, columns)
        self.key_buffer = key_states.new_empty((batch, heads, capacity, key_states.shape[3]))
        self.value_buffer = value_states.new_empty(
            (batch, value_states.shape[1], capacity, value_states.shape[3])
        )
        self.device = key_states.device
        self.is_initialized = True

    def _fill(self, length: int) -> None:
        assert self.key_buffer is not None and self.value_buffer is not None
        self.length = length
        self.keys = self.key_buffer[:, :, :length]
        self.values = self.value_buffer[:, :, :length]

    def _grow(self, needed: int) -> None:
        assert self.key_buffer is not None and self.value_buffer is not None
        old_keys, old_values = self.key_buffer, self.value_buffer
        shape = list(old_keys.shape)
        shape[2] = needed + GROWTH
        self.key_buffer = old_keys.new_empty(shape)
        shape[3] = old_values.shape[3]
        self.value_buffer = old_values.new_empty(shape)
        self.key_buffer[:, :, : self.length].copy_(old_keys[:, :, : self.length])
        self.value_buffer[:, :, : self.length].copy_(old_values[:, :, : self.length])
        self.capacity = shape[2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new columns in place; return all filled keys and values (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.key_buffer is not None and self.value_buffer is not None
        start, end = self.length, self.length + key_states.shape[2]
        if end > self.key_buffer.shape[2]:
            self._grow(end)
        self.key_buffer[:, :, start:end].copy_(key_states)
        self.value_buffer[:, :, start:end].copy_(value_states)
        self._fill(end)
        return self.keys, self.values  # type: ignore[return-value]

    def rewind(self, length: int) -> None:
        """Keep only the first `length` columns (the rest is overwritten by later steps)."""
        self._fill(length)


def new_cache(num_layers: int, capacity: int) -> Cache:
    """An empty cache of `SlabLayer`s sized for `capacity` columns."""
    layers: list[Any] = [SlabLayer(capacity) for _ in range(num_layers)]
    return Cache(layers=layers)


def _filled(cache: Cache, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The filled keys and values of a slab cache's layer."""
    layer = cache.layers[index]
    assert isinstance(layer, SlabLayer) and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


@dataclass(eq=False)
class Batch:
    """Rows decoding together. `rows[i]` is the caller's request object, None once dead.

    Attributes:
        rows: one entry per batch row (None: finished or cancelled, awaiting a rebuild).
        cache: the rows' keys and values (`SlabLayer`s), `width` columns filled.
        mask: [B, width] 1 for a real token, 0 for padding.
        positions: [B] position id of each row's next token (its real token count).
        tokens: [B] each row's next input token (the last one sampled).
        plan: the row ranges of bucketed decode attention (`cloud.attention`), made on
            the first decode step (rows' first columns do not move while decoding).
        holes: some row has masked columns after its first real one (a speculative step
            kept fewer of its columns than another row's).
    """

    rows: list[Any]
    cache: Cache
    mask: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor
    plan: Plan | None = None
    holes: bool = False

    @property
    def size(self) -> int:
        """Rows, dead ones included."""
        return len(self.rows)

    @property
    def width(self) -> int:
        """Columns filled in the cache."""
        return int(self.mask.shape[1])

    def live(self) -> list[int]:
        """Indices of the rows still running."""
        return [i for i, row in enumerate(self.rows) if row is not None]

    def needs_compaction(self) -> bool:
        """Whether enough rows are dead (a quarter), or enough columns are holes no live
        row needs (a quarter of the width), to pay for copying the live rows."""
        live = self.live()
        dead = self.size - len(live)
        if dead > 0 and dead * 4 >= self.size:
            return True
        if not live or not self.holes:
            return False
        widest = int(self.positions[live].max())
        return (self.width - widest) * 4 >= self.width


@dataclass(eq=False)
class Prefill:
    """Newly admitted rows being prefilled together, a chunk of columns per forward.

    Attributes:
        rows: the request objects.
        ids, mask, positions: [B, P] left-padded prompts, their mask and position ids.
        cache: filled up to `done` columns.
        done: prompt columns fed so far.
    """

    rows: list[Any]
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    cache: Cache
    done: int = 0

    @property
    def finished(self) -> bool:
        """All prompt columns fed."""
        return self.done >= int(self.ids.shape[1])


def prefill_group(
    rows: Sequence[Any],
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    num_layers: int,
    headroom: int,
    device: torch.device,
) -> Prefill:
    """Left-pad `prompts` into one prefill group with a slab sized for `headroom` more tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for index, prompt in enumerate(prompts):
        ids[index, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[index, width - len(prompt) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return Prefill(
        rows=list(rows),
        ids=ids.to(device),
        mask=mask.to(device),
        positions=positions.to(device),
        cache=new_cache(num_layers, width + min(headroom, GROWTH)),
    )


def prefill_chunk(forward: Forward, group: Prefill, columns: int) -> torch.Tensor | None:
    """Feed the next `columns` prompt columns; the last-position logits [B, V] after the
    last chunk, None before."""
    start, end = group.done, min(group.done + max(1, columns), int(group.ids.shape[1]))
    logits = forward(
        group.ids[:, start:end],
        group.mask[:, :end],
        group.positions[:, start:end],
        group.cache,
        1,
    )
    group.done = end
    return logits[:, -1, :] if group.finished else None


def to_batch(group: Prefill, tokens: list[int]) -> Batch:
    """A finished prefill group as a batch whose next inputs are `tokens`."""
    return Batch(
        rows=list(group.rows),
        cache=group.cache,
        mask=group.mask,
        positions=group.mask.sum(dim=1),
        tokens=torch.tensor(tokens, dtype=torch.long, device=group.mask.device),
    )


def first_columns(batch: Batch) -> list[int]:
    """Each row's first real column (holes after it make it more than the width less the
    row's tokens)."""
    starts: list[int] = batch.mask.argmax(dim=1).tolist()
    return starts


def decode_step(
    forward: Forward, batch: Batch, *, sdpa_mask: bool = False, buckets: bool = False
) -> torch.Tensor:
    """One token for every row: the logits [B, V] of the step (the cache grows one column).

    Args:
        forward: runs the model.
        batch: the running batch (its mask, positions and cache advance one column).
        sdpa_mask: pass the padding mask as the 4D boolean mask SDPA reads (`[B, 1, 1,
            width]`, which transformers passes through as is) instead of the 2D one. With
            a 2D mask and no padding transformers drops the mask and runs SDPA with
            `enable_gqa`, which in bf16 on CPU is several times slower than the packed-GQA
            path a mask selects.
        buckets: run attention per row range (`cloud.attention`; needs `sdpa_mask` and
            the model switched with `cloud.attention.install`).
    """
    ones = batch.mask.new_ones((batch.size, 1))
    mask = torch.cat([batch.mask, ones], dim=1)
    attention_mask = mask.bool()[:, None, None, :] if sdpa_mask else mask
    plan = None
    if buckets and sdpa_mask:
        if batch.plan is None:
            batch.plan = row_buckets(first_columns(batch), batch.width)
        plan = batch.plan
    with decode_plan(plan):
        logits = forward(
            batch.tokens.unsqueeze(1), attention_mask, batch.positions.unsqueeze(1), batch.cache, 1
        )
    batch.mask = mask
    batch.positions = batch.positions + 1
    return logits[:, -1, :]


def verify_step(
    forward: Forward,
    batch: Batch,
    drafts: Sequence[Sequence[int]],
    pad_id: int,
    *,
    sdpa_mask: bool = False,
) -> torch.Tensor:
    """Every row's next token and its draft in one forward: the logits [B, 1 + k, V] of
    each appended column (k: the longest draft; shorter drafts are padded, masked out).

    The cache grows 1 + k columns; the batch's mask and positions are left for
    `keep_verified`, which decides what stays. `sdpa_mask`: pass SDPA's 4D boolean mask
    (causal over the new columns) rather than the 2D one (see `decode_step`).
    """
    size, width = batch.size, batch.width
    columns = 1 + max(len(draft) for draft in drafts)
    ids = torch.full((size, columns), pad_id, dtype=torch.long)
    real = torch.zeros((size, columns), dtype=torch.long)
    real[:, 0] = 1
    for index, draft in enumerate(drafts):
        if draft:
            ids[index, 1 : 1 + len(draft)] = torch.tensor(list(draft), dtype=torch.long)
            real[index, 1 : 1 + len(draft)] = 1
    device = batch.mask.device
    ids[:, 0] = batch.tokens.cpu()
    mask = torch.cat([batch.mask, real.to(device)], dim=1)
    steps = torch.arange(columns, device=device)
    positions = batch.positions[:, None] + steps[None, :]
    attention_mask: torch.Tensor = mask
    if sdpa_mask:
        causal = torch.ones((columns, width + columns), dtype=torch.bool, device=device)
        causal = causal.tril(diagonal=width)  # new column j sees the old ones and 0..j
        attention_mask = mask.bool()[:, None, None, :] & causal[None, None]
    return forward(ids.to(device), attention_mask, positions, batch.cache, columns)


def keep_verified(batch: Batch, kept: Sequence[int], tokens: Sequence[int]) -> None:
    """After `verify_step`: row i keeps its first `kept[i]` new columns (its next token and
    the draft tokens accepted after it) and will feed `tokens[i]` next; the slab drops the
    columns no row kept, and the rest of a row's are masked (holes)."""
    grow = max(kept)
    device = batch.mask.device
    counts = torch.tensor(list(kept), device=device)
    new = (torch.arange(grow, device=device)[None, :] < counts[:, None]).to(batch.mask.dtype)
    for layer in batch.cache.layers:
        assert isinstance(layer, SlabLayer)
        layer.rewind(batch.width + grow)
    batch.holes = batch.holes or bool((counts < grow).any())
    batch.mask = torch.cat([batch.mask, new], dim=1)
    batch.positions = batch.positions + counts
    batch.tokens = torch.tensor(list(tokens), dtype=torch.long, device=device)


@dataclass(eq=False)
class _Part:
    """The live rows of one batch, as `rebuild` copies them."""

    batch: Batch
    index: torch.Tensor | None  # the live rows (None: all of them)
    mask: torch.Tensor  # [n, w] their mask, without the columns none of them uses
    start: int  # columns dropped on the left
    rows: list[int] = field(default_factory=list)  # row i's row in the new batch
    columns: torch.Tensor | None = None  # [n, w] source column of each (batch with holes)

    def select(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.index is None else tensor.index_select(0, self.index)

    def squeeze(self) -> None:
        """Right-align each row's real columns (holes out): `columns` and `mask` for them."""
        mask = self.mask
        numbered = mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)
        width = int(mask.sum(dim=1).max())
        ordered = numbered.sort(dim=1).values[:, mask.shape[1] - width :]  # 0: padding
        self.columns = (ordered - 1).clamp(min=0)
        self.mask = (ordered > 0).to(mask.dtype)

    def data(self, filled: torch.Tensor) -> torch.Tensor:
        """Its rows of one filled key or value tensor, as the new slab holds them."""
        data = self.select(filled)[:, :, self.start :]
        if self.columns is None:
            return data
        rows, heads, _, dim = data.shape
        index = self.columns[:, None, :, None].expand(rows, heads, self.columns.shape[1], dim)
        return data.gather(2, index)


def rebuild(batches: Sequence[Batch], headroom: int) -> Batch | None:
    """The live rows of `batches` in one new slab, longest first, right-aligned, without
    the padding columns and holes no live row needs.

    Args:
        batches: batches of the same model; dead rows are left out.
        headroom: tokens the live rows may still make (the slab gets at most `GROWTH`).

    Returns:
        The new batch, or None when no row is live.
    """
    parts: list[_Part] = []
    order: list[tuple[int, int, int]] = []  # (-real tokens, part, row in part)
    for batch in batches:
        keep = batch.live()
        if not keep:
            continue
        index = None if len(keep) == batch.size else torch.tensor(keep, device=batch.mask.device)
        part = _Part(batch, index, batch.mask, 0)
        part.mask = part.select(batch.mask)
        used = part.mask.any(dim=0).nonzero()
        part.start = int(used[0]) if used.numel() else int(part.mask.shape[1])
        part.mask = part.mask[:, part.start :]
        if batch.holes:
            part.squeeze()
        counts = part.select(batch.positions).tolist()
        order += [(-count, len(parts), row) for row, count in enumerate(counts)]
        parts.append(part)
    if not parts:
        return None
    order.sort()
    for part in parts:
        part.rows = [0] * int(part.mask.shape[0])
    for new_row, (_, part_no, row) in enumerate(order):
        parts[part_no].rows[row] = new_row
    device = parts[0].mask.device
    targets = [torch.tensor(part.rows, device=device) for part in parts]
    width = max(int(part.mask.shape[1]) for part in parts)
    size = len(order)
    capacity = width + min(max(headroom, 1), GROWTH)
    layers: list[Any] = []
    for layer_index in range(len(parts[0].batch.cache.layers)):
        sources = [_filled(part.batch.cache, layer_index) for part in parts]
        buffers = [
            filled.new_empty((size, filled.shape[1], capacity, filled.shape[3]))
            for filled in sources[0]
        ]
        for part, rows, source in zip(parts, targets, sources, strict=True):
            pad = width - int(part.mask.shape[1])
            for buffer, filled in zip(buffers, source, strict=True):
                data = part.data(filled)
                buffer[:, :, pad:width].index_copy_(0, rows, data)
                if pad:
                    buffer[:, :, :pad].index_fill_(0, rows, 0)
        layers.append(SlabLayer.from_buffers(buffers[0], buffers[1], width))
    mask = parts[0].mask.new_zeros((size, width))
    positions = parts[0].batch.positions.new_empty((size,))
    tokens = parts[0].batch.tokens.new_empty((size,))
    row_list: list[Any] = [None] * size
    for part, rows in zip(parts, targets, strict=True):
        mask[:, width - int(part.mask.shape[1]) :].index_copy_(0, rows, part.mask)
        positions.index_copy_(0, rows, part.select(part.batch.positions))
        tokens.index_copy_(0, rows, part.select(part.batch.tokens))
        for new_row, old_row in zip(part.rows, part.batch.live(), strict=True):
            row_list[new_row] = part.batch.rows[old_row]
    return Batch(
        rows=row_list, cache=Cache(layers=layers), mask=mask, positions=positions, tokens=tokens
    )
