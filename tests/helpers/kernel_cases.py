"""Cases and inputs shared by the kernel tests (tests/unit/test_kernels_*.py): paged
caches with shuffled block tables, the batch shapes every paged path is checked on, and
the poisoning of blocks no query may read. Random draws use torch's and `random`'s
global generators, which the tests' `seed` fixture (tests/conftest.py) has seeded."""

from __future__ import annotations

import random

import torch

from lminf_kernels.paged import absolute_views
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_inv_freq(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


def build_paged(seq_lens, hkv, dh, block_size, dtype=torch.float32, poison_gap: LambdaPattern | None = None):
    """Random paged cache with a shuffled block table. With `poison_gap`, every block
    that holds only tokens no query of the last step can read is filled with NaN."""
    nblocks = [-(-s // block_size) for s in seq_lens]
    total = sum(nblocks) + 1
    cache = torch.randn(total, hkv, block_size, 2 * dh, dtype=dtype)
    ids = list(range(1, total))
    random.shuffle(ids)
    table = torch.zeros(len(seq_lens), max(nblocks), dtype=torch.int32)
    pos = 0
    for i, nb in enumerate(nblocks):
        table[i, :nb] = torch.tensor(ids[pos : pos + nb], dtype=torch.int32)
        pos += nb
    return cache, table


def poison_unread_blocks(cache, table, seq_lens, q_lens, pattern, *, tails: bool = True):
    """NaN-fill blocks outside every query's global and local spans (and, with `tails`,
    the unwritten slots past each sequence's end); return a copy."""
    cache = cache.clone()
    bs = cache.shape[2]
    for i, (s, n) in enumerate(zip(seq_lens, q_lens)):
        if n == 0:
            continue
        needed_lo = pattern.local_start(s - n)
        g_hi = min(pattern.n_global, s)
        for blk in range(-(-s // bs)):
            first, last = blk * bs, min(s, (blk + 1) * bs) - 1
            if last < needed_lo and first >= g_hi:
                cache[table[i, blk]] = float("nan")
        # slots past the sequence's end in its last block are unwritten: poison them too
        tail = s % bs
        if tails and tail:
            cache[table[i, (s - 1) // bs], :, tail:] = float("nan")
    return cache


CASES = [
    # (seq_lens, q_lens, pattern, block_size, query_tile)
    ([37], [37], LambdaPattern(4, 8, 8), 16, 256),  # prefill far past the window
    ([37], [37], LambdaPattern(4, 8, 8), 16, 5),  # same, many query tiles
    ([64], [64], LambdaPattern(4, 64, 64), 32, 7),  # exactly the window
    ([65], [1], LambdaPattern(4, 64, 64), 32, 256),  # decode one past the window
    ([200], [1], LambdaPattern(10, 32, 32), 32, 256),  # decode far past
    ([1], [1], LambdaPattern(4, 8, 8), 32, 256),  # length 1
    ([96, 5, 130, 33], [20, 5, 1, 1], LambdaPattern(3, 16, 20), 32, 8),  # mixed chunk/prefill/decodes
    ([96, 7, 300], [0, 7, 64], LambdaPattern(0, 24, 24), 32, 16),  # empty query row, G=0
    ([128, 129], [128, 1], LambdaPattern(17, 40, 33), 128, 64),  # G not a block multiple, B=128
    ([50], [50], LambdaPattern(100, 10, 10), 16, 16),  # G beyond the sequence
]


def case_inputs(case, neox):
    """Fresh random inputs for one CASES entry: (raw cache, table, qsl, query, kw); kw holds
    the pattern, rotary style (partial rotary for GPT-J), frequencies and scale."""
    seq_lens, q_lens, pattern, bs, _ = case
    hq, hkv, dh = 6, 2, 16
    style = RopeStyle(12 if not neox else 16, neox)
    cache, table = build_paged(seq_lens, hkv, dh, bs)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    query = torch.randn(qsl[-1], hq, dh)
    kw = dict(pattern=pattern, style=style, inv_freq=make_inv_freq(style.rotary_dim), scale=dh**-0.5)
    return cache, table, qsl, query, kw


# -- the CPU fast path's layout: keys rotated at absolute positions -------------------


def rotate64(x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor, style: RopeStyle) -> torch.Tensor:
    """Reference rotation of [T, H, D] rows at integer positions, all in float64."""
    x = x.double().clone()
    ang = pos.double()[:, None] * inv.double()[None, :]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    r = style.rotary_dim
    if style.neox:
        a, b = x[..., : r // 2].clone(), x[..., r // 2 : r].clone()
        x[..., : r // 2], x[..., r // 2 : r] = a * c - b * s, b * c + a * s
    else:
        a, b = x[..., 0:r:2].clone(), x[..., 1:r:2].clone()
        x[..., 0:r:2], x[..., 1:r:2] = a * c - b * s, b * c + a * s
    return x


def to_absolute_layout(raw: torch.Tensor, table, seq_lens, inv, style) -> torch.Tensor:
    """The interleaved raw-key cache rewritten as vLLM's CPU layout with keys rotated at
    their absolute positions (NaN everywhere no sequence token lives)."""
    out = torch.full_like(raw, float("nan"))
    keys, values = absolute_views(out)
    bs, d = raw.shape[2], raw.shape[3] // 2
    for i, s in enumerate(seq_lens):
        pos = torch.arange(s)
        blk, off = table[i][pos // bs].long(), pos % bs
        k = raw[blk, :, off, :d]  # [s, H, D]
        keys[blk, :, off] = rotate64(k, pos, inv, style).to(raw.dtype)
        values[blk, :, off] = raw[blk, :, off, d:]
    return out


def poison_unread_whole_blocks(cache, table, seq_lens, q_lens, pattern):
    """NaN-fill every block no query of the step may read (the tails of partly written
    blocks are NaN already, from `to_absolute_layout`)."""
    marks = poison_unread_blocks(torch.zeros_like(cache), table, seq_lens, q_lens, pattern)
    unread = marks.isnan().flatten(1).all(1)
    cache = cache.clone()
    cache[unread] = float("nan")
    return cache


def absolute_queries(query, qsl, seq_lens, inv, style):
    q = torch.empty(query.shape, dtype=torch.float64)
    for i, s in enumerate(seq_lens):
        a, b = qsl[i], qsl[i + 1]
        q[a:b] = rotate64(query[a:b], torch.arange(s - (b - a), s), inv, style)
    return q.to(query.dtype)
