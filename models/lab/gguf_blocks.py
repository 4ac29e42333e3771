"""A GGUF tensor's quantized blocks, read as they are: integers, a scale and an offset each.

Every block type this reads describes its weights exactly as `w = scale * q + low`, with
`q` small unsigned integers and one `scale` and `low` per block of `block` weights along a
row (the input dimension):

| type | block | q bits | scale | low |
|---|---|---|---|---|
| Q4_0 | 32 | 4 | d | -8 d |
| Q4_1 | 32 | 4 | d | m |
| Q5_0 | 32 | 5 | d | -16 d |
| Q5_1 | 32 | 5 | d | m |
| Q8_0 | 32 | 8 | d | -128 d |
| Q4_K | 32 | 4 | d sc | -dmin m |
| Q5_K | 32 | 5 | d sc | -dmin m |
| Q6_K | 16 | 6 | d sc | -32 d sc |

The same arithmetic as gguf's and transformers' dequantization (float32 products of the
stored halves), so `dequantized()` equals the checkpoint those loaders made, bit for bit. The
edge build takes these blocks instead of quantizing the dequantized weights again
(`models.lab.edge_repack`). Other types (Q2_K, Q3_K, the IQ types, floats) are not read here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Block types `read_blocks` decodes.
SUPPORTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
#: Weights per K-quant super-block.
QK_K = 256


@dataclass
class Blocks:
    """One weight matrix `[rows, cols]` as `scale * q + low`, blocks along the columns."""

    #: Unsigned integers `[rows, cols]`, each below `2 ** bits`.
    q: np.ndarray
    #: `[rows, cols // block]` float32.
    scale: np.ndarray
    low: np.ndarray
    block: int
    bits: int

    def dequantized(self) -> np.ndarray:
        """The weights `[rows, cols]` in float32."""
        rows, cols = self.q.shape
        q = self.q.reshape(rows, cols // self.block, self.block).astype(np.float32)
        return (self.scale[..., None] * q + self.low[..., None]).reshape(rows, cols)

    def reblocked(self, block: int) -> Blocks:
        """The same weights in smaller blocks (`block` divides this one's)."""
        if block == self.block:
            return self
        times = self.block // block
        return Blocks(self.q, np.repeat(self.scale, times, axis=1),
                      np.repeat(self.low, times, axis=1), block, self.bits)  # fmt: skip

    def rows(self, order: np.ndarray) -> Blocks:
        """The rows taken in `order`."""
        return Blocks(self.q[order], self.scale[order], self.low[order], self.block, self.bits)


def concat(parts: list[Blocks]) -> Blocks:
    """Row-wise concatenation (a fused projection), in the finest block and widest bits."""
    block = min(p.block for p in parts)
    parts = [p.reblocked(block) for p in parts]
    return Blocks(
        np.concatenate([p.q for p in parts]),
        np.concatenate([p.scale for p in parts]),
        np.concatenate([p.low for p in parts]),
        block,
        max(p.bits for p in parts),
    )


def _half(raw: np.ndarray) -> np.ndarray:
    """float16 values stored in the last axis's 2 bytes, as float32 (drops that axis)."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Unpack `qs [..., n]`: the low nibbles are the first n values, the high ones the next."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 32 high bits (4 bytes, little-endian) as `[..., 32]` values 0/1."""
    bits = np.ascontiguousarray(qh).view(np.uint32)[..., 0:1]
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of 6-bit scales and mins, as 8 of each per super-block."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _simple(kind: str, raw: np.ndarray) -> Blocks:
    """Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0: blocks of 32 with a half scale (and min)."""
    rows = raw.shape[0]
    width = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}[kind]
    b = raw.reshape(rows, -1, width)
    d = _half(b[..., 0:2])
    if kind == "Q8_0":
        q = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Blocks(q.reshape(rows, -1), d, -128 * d, 32, 8)
    with_min = kind in ("Q4_1", "Q5_1")
    start = 4 if with_min else 2
    if kind.startswith("Q5"):
        high, qs = b[..., start : start + 4], b[..., start + 4 :]
        q = _nibbles(qs) | (_fifth_bits(high) << 4)
        bits, center = 5, 16
    else:
        q, bits, center = _nibbles(b[..., start:]), 4, 8
    low = _half(b[..., 2:4]) if with_min else -center * d
    return Blocks(q.reshape(rows, -1), d, low, 32, bits)


def _q45_k(kind: str, raw: np.ndarray) -> Blocks:
    """Q4_K and Q5_K: super-blocks of 256 in 8 blocks of 32, each with a scale and a min."""
    rows = raw.shape[0]
    width = 144 if kind == "Q4_K" else 176
    b = raw.reshape(rows, -1, width)
    d, dmin = _half(b[..., 0:2]), _half(b[..., 2:4])
    sc, mn = _k_scales(b[..., 4:16])
    if kind == "Q4_K":
        qs = b[..., 16:].reshape(rows, -1, 4, 32)  # 4 chunks of 64 values
        q = _nibbles(qs)
        bits = 4
    else:
        qh = b[..., 16:48]  # bit j of byte i: the fifth bit of value 32 j + i
        qs = b[..., 48:].reshape(rows, -1, 4, 32)
        high = ((qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(
            rows, -1, 4, 64
        )
        q = _nibbles(qs) | (high << 4)
        bits = 5
    scale = (d[..., None] * sc).reshape(rows, -1)
    low = -(dmin[..., None] * mn).reshape(rows, -1)
    return Blocks(q.reshape(rows, -1), scale, low, 32, bits)


def _q6_k(raw: np.ndarray) -> Blocks:
    """Q6_K: super-blocks of 256 in 16 blocks of 16 with int8 scales, values 6 bits."""
    rows = raw.shape[0]
    b = raw.reshape(rows, -1, 210)
    ql = b[..., :128].reshape(rows, -1, 2, 64)
    qh = b[..., 128:192].reshape(rows, -1, 2, 32)
    scales = b[..., 192:208].view(np.int8).astype(np.float32)
    d = _half(b[..., 208:210])
    low4 = _nibbles(ql).reshape(rows, -1, 2, 128)  # per half: 4 groups of 32
    high = ((qh[..., None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3).reshape(
        rows, -1, 2, 128
    )
    q = (low4 | (high << 4)).reshape(rows, -1)
    scale = (d[..., None] * scales).reshape(rows, -1)
    return Blocks(q, scale, -32 * scale, 16, 6)


def read_blocks(kind: str, raw: np.ndarray, cols: int) -> Blocks:
    """The blocks of a tensor of type `kind` whose rows are `raw` (`[rows, bytes]` uint8,
    as gguf's reader gives them) and hold `cols` weights each.

    Raises:
        ValueError: a type this module does not read (see `SUPPORTED`).
    """
    if kind not in SUPPORTED:
        raise ValueError(f"GGUF block type {kind} is not read (supported: {', '.join(SUPPORTED)})")
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(raw.shape[0], -1)
    if kind in ("Q4_K", "Q5_K"):
        blocks = _q45_k(kind, raw)
    elif kind == "Q6_K":
        blocks = _q6_k(raw)
    else:
        blocks = _simple(kind, raw)
    if blocks.q.shape[1] != cols:
        raise ValueError(f"a {kind} row holds {blocks.q.shape[1]} weights, not {cols}")
    return blocks
