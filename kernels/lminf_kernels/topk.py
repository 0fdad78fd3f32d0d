"""Top-k middle attention: LM-Infinite's retrieval variant, as a partial softmax merged
into the Λ result.

A query row at position p that uses top-k also sees, per query head, the `k` keys of the
middle  n_global <= j <= p - n_local  with the largest logit  <R(distance) q_raw, k_raw> * scale,
at that logit, in the same softmax as its global and window keys. A row whose middle holds
fewer than `k` keys is plain Λ. Which rows use it is the caller's choice (`TopKRows`):
the reference applies it to the last prompt row and every generated row.

Block mode (`TopKRows.blocks`, beyond the reference): each full KV block keeps a summary
of its raw keys per KV head (element-wise min and max, as Quest does), written once when the
block fills. A row scores each middle block by the upper bound of its logits at the scoring
distance, sum_c max(q_c * max_c, q_c * min_c), keeps the `k` best blocks per query head and
attends their middle tokens, each seen at the scoring distance (as exact mode sees its keys).
A row whose middle touches fewer than `k` blocks is plain Λ. Per row the work is
O(middle blocks + k * block_size), not O(middle keys).

The torch paths (`raw_torch`, `absolute_cpu`) call `attend_middle` / `attend_middle_blocks`
for a tile of rows after their local softmax and merge with `paged.merge_partials`; `naive.py` is
the dense reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .pattern import LambdaPattern

# Logit elements per `attend_middle` chunk (rows x middle keys x kv heads), ~64 MiB in float32.
MAX_SCORE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class TopKRows:
    """The top-k rule of one step: k, the scoring distance, and per sequence the first
    query position whose row uses it (a larger value than any position: none)."""

    k: int
    distance: int
    first_pos: list[int]
    blocks: bool = False  # block mode: k counts blocks of `block_size` tokens
    block_size: int = 0
    # block mode: the blocks this step fills (ids, first positions, sequence), to summarize
    filled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # per-sequence inputs of the C++ middle ops, built by the first layer of the step and
    # reused by the others (`absolute_cpu._middle_inputs`): the rule is one step's
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def uses(self, i: int, last_pos: int, pattern: LambdaPattern) -> bool:
        """Whether any row of sequence i, whose last query is at `last_pos`, uses top-k."""
        if last_pos < self.first_pos[i]:
            return False
        if self.blocks:
            return middle_blocks(last_pos, pattern, self.block_size) >= self.k
        return middle_count(last_pos, pattern) >= self.k


def middle_count(p, pattern: LambdaPattern):
    """Keys in the middle of query position p (int or integer tensor): n_global <= j <= p - n_local."""
    count = p - pattern.n_local + 1 - pattern.n_global
    return count.clamp(min=0) if isinstance(count, torch.Tensor) else max(0, count)


def middle_blocks(p, pattern: LambdaPattern, block_size: int):
    """KV blocks that hold some middle key of query position p (int or integer tensor)."""
    return blocks_through(p - pattern.n_local, pattern.n_global, block_size)


def blocks_through(last, n_global: int, block_size: int):
    """KV blocks holding some position of [n_global, last] (int or integer tensor)."""
    count = last // block_size - n_global // block_size + 1
    if isinstance(count, torch.Tensor):
        return torch.where(last >= n_global, count, torch.zeros_like(count))
    return count if last >= n_global else 0


def row_rule(positions: torch.Tensor, first_pos: int, k: int, pattern: LambdaPattern, group: int):
    """For tile rows (query head in group, token) of consecutive positions: how many
    middle keys each sees and whether it uses top-k, each [group * T]."""
    counts = middle_count(positions, pattern)
    use = (positions >= first_pos) & (counts >= k)
    return counts.repeat(group), use.repeat(group)


def attend_middle(q: torch.Tensor, k_mid: torch.Tensor, v_mid: torch.Tensor, counts: torch.Tensor,
                  use: torch.Tensor, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k partial softmax of rows q [H, M, D] over middle keys k_mid / v_mid [H, N, D]
    (key i at position n_global + i, in the frame where <q, k_mid> is the logit at the
    scoring distance). k_mid may instead be a function (rows q [H, r, D], n) giving their
    scaled logits over the first n middle keys [H, r, n] (a kernel reading the cache in
    place); v_mid may be a function of middle indices [H, r, k] giving their values
    [H, r, k, D] (so that only the chosen values are read). Row m may see keys i < counts[m]; rows with use[m] False (or fewer
    than k keys) get lse = -inf and output 0. Returns (output [H, M, Dv], lse [H, M])."""
    h, m, dv = q.shape  # values as wide as keys (every model the plugin serves)
    out = q.new_zeros(h, m, dv)
    lse = q.new_full((h, m), float("-inf"))
    rows = torch.nonzero(use & (counts >= k)).flatten()
    if len(rows) == 0:
        return out, lse
    n = int(counts[rows].max())
    if not callable(k_mid):
        k_mid = k_mid[:, :n]
    if not callable(v_mid):
        v_mid = v_mid[:, :n]
    step = max(1, MAX_SCORE_ELEMENTS // max(1, h * n))
    key_index = torch.arange(n)
    for c in range(0, len(rows), step):
        r = rows[c:c + step]
        s = k_mid(q[:, r], n) if callable(k_mid) else torch.bmm(q[:, r], k_mid.transpose(1, 2)) * scale  # [H, r, n]
        s = s.masked_fill((key_index[None, :] >= counts[r][:, None])[None].to(s.device), float("-inf"))
        top, idx = s.topk(k, dim=-1)  # [H, r, k]
        if callable(v_mid):  # reads only the chosen values from the cache
            v_sel = v_mid(idx)
        else:
            v_sel = torch.gather(v_mid, 1, idx.reshape(h, -1, 1).expand(-1, -1, dv)).view(h, len(r), k, dv)
        lse_r = torch.logsumexp(top, dim=-1)
        p = torch.exp(top - lse_r[..., None])
        out[:, r] = torch.einsum("hrk,hrkd->hrd", p, v_sel.to(p.dtype))
        lse[:, r] = lse_r
    return out, lse


def filled_blocks(block_table: torch.Tensor, query_start_loc: list[int], seq_lens: list[int],
                  block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The blocks a step fills: (ids, first positions, sequence index), one entry per block
    whose last slot is written by this step's tokens."""
    ids, first, seq = [], [], []
    for i, s in enumerate(seq_lens):
        start = s - (query_start_loc[i + 1] - query_start_loc[i])
        for b in range(start // block_size, s // block_size):
            if (b + 1) * block_size > start:
                ids.append(int(block_table[i, b]))
                first.append(b * block_size)
                seq.append(i)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return as_long(ids), as_long(first), as_long(seq)


def summarize_blocks(keys: torch.Tensor) -> torch.Tensor:
    """Per-channel min and max of each block's raw keys: [n, H, B, D] -> [n, H, 2, D] float32."""
    keys = keys.to(torch.float32)
    return torch.stack((keys.amin(dim=2), keys.amax(dim=2)), dim=2)


def attend_middle_blocks(q: torch.Tensor, summary: torch.Tensor, block_row: torch.Tensor, fetch, last_mid: torch.Tensor,
                         use: torch.Tensor, k: int, scale: float, block_size: int,
                         n_global: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-mode top-k partial softmax of rows q [H, M, D] (raw frame at the scoring distance).

    summary: the layer's block summaries [num_blocks, H, 2, D] (`summarize_blocks`), indexed
    by block id; block_row: the sequence's block table (logical block -> id); last_mid [M]:
    each row's last middle position p - n_local; use [M]: rows that may use it.
    fetch(logical [H, r, k]) returns the raw keys and values of those blocks of the
    sequence, [H, r, k, B, D] each. Returns (output [H, M, Dv], lse [H, M]) as `attend_middle`."""
    h, m, _ = q.shape
    first = n_global // block_size
    n_blocks = blocks_through(last_mid, n_global, block_size)  # [M]
    rows = torch.nonzero(use & (n_blocks >= k)).flatten()
    lse = q.new_full((h, m), float("-inf"))
    if len(rows) == 0:
        return q.new_zeros(h, m, q.shape[-1]), lse
    nb = int(n_blocks[rows].max())
    ids = block_row[first:first + nb].long()
    lo, hi = summary[ids, :, 0].transpose(0, 1), summary[ids, :, 1].transpose(0, 1)  # [H, nb, D]
    qr = q[:, rows]
    bound = qr.clamp(min=0) @ hi.transpose(1, 2) + qr.clamp(max=0) @ lo.transpose(1, 2)  # [H, r, nb]
    beyond = (torch.arange(nb)[None, :] >= n_blocks[rows][:, None])[None]  # row metadata lives on the CPU
    bound = bound.masked_fill(beyond.to(bound.device), float("-inf"))
    chosen = bound.topk(k, dim=-1).indices + first  # logical blocks [H, r, k]
    out = None
    step = max(1, MAX_SCORE_ELEMENTS // max(1, h * k * block_size * q.shape[-1]))
    for c in range(0, len(rows), step):
        sel, r = chosen[:, c:c + step], rows[c:c + step]
        keys, values = fetch(sel)
        if out is None:
            out = q.new_zeros(h, m, values.shape[-1])
        pos = sel[..., None] * block_size + torch.arange(block_size, device=sel.device)  # [H, r, k, B]
        seen = (pos >= n_global) & (pos <= last_mid[r].to(sel.device)[None, :, None, None])
        s = torch.einsum("hrd,hrkbd->hrkb", q[:, r], keys.to(q.dtype)) * scale
        s = s.masked_fill(~seen, float("-inf")).flatten(2)  # [H, r, k*B]
        lse_r = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse_r[..., None])
        out[:, r] = torch.einsum("hrt,hrtd->hrd", p, values.flatten(2, 3).to(p.dtype))
        lse[:, r] = lse_r
    return out, lse


def middle_values(views, block_row: torch.Tensor, n_global: int):
    """The values of a sequence's middle keys by middle index [H, r, k] -> [H, r, k, D]
    float32, read from the paged cache (key views of either layout)."""
    values = views[1]
    bs = values.shape[2]
    heads = torch.arange(values.shape[1], device=values.device)[:, None, None]

    def at(index: torch.Tensor) -> torch.Tensor:
        pos = index + n_global
        return values[block_row[pos // bs].long(), heads, pos % bs].to(torch.float32)

    return at
