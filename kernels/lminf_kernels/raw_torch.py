"""Λ attention over a paged cache of raw keys: the torch path (CPU, and any device).

For each sequence, queries are processed in tiles. A tile reads only
  - the local span [local_start(first query), last query], rotated at positions
    relative to the span start (angles stay below n_local + tile, whatever the
    absolute position), and
  - the global tokens [0, global_end(last query)), unrotated, against queries
    rotated by `distance_limit`,
and merges both in one softmax. Blocks between the two spans are never touched, so
their block-table entries may be stale (freed blocks), unless `top_k` is given: then the
rows that use it also read the middle (`topk.py`; their layer keeps its middle blocks).
"""

from __future__ import annotations

import torch

from .paged import (attend_local, band_mask, from_head_rows, gather_span, global_seen, merge_global,
                    merge_into_rows, merge_partials, raw_views, to_head_rows)
from .pattern import LambdaPattern
from .rope import RopeStyle, cos_sin, cos_sin_table, rotate
from .topk import TopKRows, attend_middle, attend_middle_blocks, middle_values, row_rule, summarize_blocks

DEFAULT_QUERY_TILE = 256


def lambda_paged_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                           query_start_loc: list[int], seq_lens: list[int], *, pattern: LambdaPattern,
                           style: RopeStyle, inv_freq: torch.Tensor, scale: float,
                           query_scale: list[float] | None = None, out: torch.Tensor | None = None,
                           query_tile: int = DEFAULT_QUERY_TILE, top_k: TopKRows | None = None,
                           sequences: list[int] | None = None,
                           block_summary: torch.Tensor | None = None) -> torch.Tensor:
    """Λ attention for a batch of sequences (prefill chunks and decodes mixed).

    query: [T, Hq, D] raw queries, sequence i owning rows
    query_start_loc[i]:query_start_loc[i+1], its queries being the last tokens of
    its seq_lens[i] tokens. kv_cache: [num_blocks, Hkv, B, 2*D], raw K then V on the
    last dim, already holding this step's keys. block_table: [num_seqs, max_blocks].
    inv_freq: [R/2] shared, or [num_seqs, R/2] per sequence (CLEX). query_scale:
    per-sequence query multiplier (CLEX log scale). top_k: the step's top-k rule (None:
    Λ only). sequences: compute only these (others' rows are left untouched).
    block_summary: the layer's block summaries (block mode, `update_block_summaries`).
    Computes in float32.
    """
    num_tokens, hq, dh = query.shape
    hkv = kv_cache.shape[1]
    group = hq // hkv
    if out is None:
        out = torch.empty_like(query)
    views = raw_views(kv_cache)
    inv_freq = inv_freq.to(torch.float32)
    for i in range(len(seq_lens)) if sequences is None else sequences:
        seq_len = seq_lens[i]
        a, b = query_start_loc[i], query_start_loc[i + 1]
        if b <= a:
            continue
        freq = inv_freq if inv_freq.dim() == 1 else inv_freq[i]
        row = block_table[i]
        first_pos = seq_len - (b - a)
        qmul = 1.0 if query_scale is None else query_scale[i]
        # Global branch: queries all rotated by the same distance.
        gcos, gsin = cos_sin(torch.tensor(pattern.distance_limit), freq)
        # Keys of every tile of this sequence, gathered and rotated once, at positions
        # relative to the first tile's window start (angles < W + chunk).
        span_lo = pattern.local_start(first_pos)
        k_span, v_span = gather_span(views, row, span_lo, seq_len)
        kc, ks = cos_sin_table(freq, seq_len - span_lo)
        k_span = rotate(k_span, kc, ks, style)
        v_span = v_span.to(torch.float32)
        middle = None
        if top_k is not None and top_k.uses(i, seq_len - 1, pattern):
            middle = _Middle(views, row, seq_len, top_k, i, pattern, style, freq, scale, block_summary)
        for t0 in range(a, b, query_tile):
            t1 = min(b, t0 + query_tile)
            pa, pb = first_pos + (t0 - a), first_pos + (t1 - a) - 1
            tq = t1 - t0
            q = query[t0:t1].to(torch.float32)
            if qmul != 1.0:
                q = q * qmul
            q_heads = to_head_rows(q, hkv)

            lo = pattern.local_start(pa)
            rel = slice(pa - span_lo, pb + 1 - span_lo)
            q_loc = rotate(q_heads, kc[rel], ks[rel], style).reshape(hkv, group * tq, dh)
            mask = band_mask(pa, pb, lo, pattern.n_local, group) if tq > 1 else None
            keys = slice(lo - span_lo, pb + 1 - span_lo)
            res, lse = attend_local(q_loc, k_span[:, keys], v_span[:, keys], mask, scale)
            if middle is not None:
                res, lse = merge_partials(res, lse, *middle.partial(q_heads, pa, pb))

            g_hi = pattern.global_end(pb)
            if g_hi > 0:
                k_g, v_g = gather_span(views, row, 0, g_hi)
                q_g = rotate(q_heads, gcos, gsin, style).reshape(hkv, group * tq, dh)
                seen = global_seen(pa, pb, g_hi, pattern.n_local).repeat(group, 1)
                s_g = torch.bmm(q_g, k_g.to(torch.float32).transpose(1, 2)) * scale
                res, lse = merge_global(res, lse, s_g.masked_fill(~seen, float("-inf")), v_g)

            out[t0:t1] = from_head_rows(res, tq)
    return out


class _Middle:
    """One sequence's top-k middle in the raw layout: the partial softmax of its rows over
    their k best middle keys (exact) or the tokens of their k best blocks (block mode),
    with queries rotated by the top-k distance (raw keys are unrotated)."""

    def __init__(self, views, row, seq_len: int, top_k: TopKRows, seq: int, pattern: LambdaPattern,
                 style: RopeStyle, freq: torch.Tensor, scale: float, block_summary, scores=None) -> None:
        """scores: exact mode's middle logits from a kernel reading the cache in place
        (`raw_triton.middle_scores_triton`'s signature); None: gathered here, scored in torch."""
        self.views, self.row, self.top_k, self.seq, self.pattern = views, row, top_k, seq, pattern
        self.style, self.scale, self.block_summary = style, scale, block_summary
        self.dcos, self.dsin = cos_sin(torch.tensor(top_k.distance), freq.to(row.device))
        if top_k.blocks:
            return
        self.v_mid = middle_values(views, row, pattern.n_global)
        if scores is not None:
            self.k_mid = lambda q, n: scores(q, views[0], row, pattern.n_global, n, scale)
        else:  # every middle key is scored: gather them once for all tiles
            k_mid, _ = gather_span(views, row, pattern.n_global, seq_len - pattern.n_local, with_values=False)
            self.k_mid = k_mid.to(torch.float32)

    def partial(self, q_heads: torch.Tensor, pa: int, pb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(output [Hkv, group * T, D], lse) of rows at positions pa..pb (q_heads: `to_head_rows`, float32)."""
        hkv, group, tq, dh = q_heads.shape
        top_k, pattern = self.top_k, self.pattern
        counts, use = row_rule(torch.arange(pa, pb + 1), top_k.first_pos[self.seq], top_k.k, pattern, group)
        q_mid = rotate(q_heads, self.dcos, self.dsin, self.style).reshape(hkv, group * tq, dh)
        if top_k.blocks:
            last_mid = (torch.arange(pa, pb + 1) - pattern.n_local).repeat(group)
            return attend_middle_blocks(q_mid, self.block_summary, self.row, _raw_fetch(self.views, self.row),
                                        last_mid, use, top_k.k, self.scale, top_k.block_size, pattern.n_global)
        return attend_middle(q_mid, self.k_mid, self.v_mid, counts, use, top_k.k, self.scale)


def merge_middle(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 query_start_loc: list[int], seq_lens: list[int], out: torch.Tensor, lse: torch.Tensor, *,
                 pattern: LambdaPattern, style: RopeStyle, inv_freq: torch.Tensor, scale: float,
                 top_k: TopKRows, query_scale: list[float] | None = None, sequences: list[int] | None = None,
                 query_tile: int = DEFAULT_QUERY_TILE, block_summary: torch.Tensor | None = None,
                 scores=None) -> torch.Tensor:
    """The top-k middle partial of the rows that use it, merged in place into a Λ result
    computed elsewhere (the Triton kernel): out [T, Hq, D] and its log-sum-exp lse [T, Hq]
    (float32, contiguous), both updated. Arguments as `lambda_paged_attention`; sequences
    none of whose rows use top-k are left as they are. scores: exact mode's middle logits
    from a kernel (`raw_triton.middle_scores_triton`), else torch."""
    hkv = kv_cache.shape[1]
    views = raw_views(kv_cache)
    inv_freq = inv_freq.to(torch.float32)
    for i in range(len(seq_lens)) if sequences is None else sequences:
        a, b = query_start_loc[i], query_start_loc[i + 1]
        if b <= a or not top_k.uses(i, seq_lens[i] - 1, pattern):
            continue
        freq = inv_freq if inv_freq.dim() == 1 else inv_freq[i]
        first_pos = seq_lens[i] - (b - a)
        middle = _Middle(views, block_table[i], seq_lens[i], top_k, i, pattern, style, freq, scale, block_summary,
                         scores)
        qmul = 1.0 if query_scale is None else query_scale[i]
        for t0 in range(a, b, query_tile):
            t1 = min(b, t0 + query_tile)
            q = query[t0:t1].to(torch.float32)
            if qmul != 1.0:
                q = q * qmul
            part = middle.partial(to_head_rows(q, hkv), first_pos + (t0 - a), first_pos + (t1 - a) - 1)
            merge_into_rows(out[t0:t1], lse[t0:t1], part)
    return out


def _raw_fetch(views, block_row: torch.Tensor):
    """Block mode: the raw keys and values of a sequence's logical blocks [H, r, k] -> [H, r, k, B, D]."""
    keys, values = views
    heads = torch.arange(keys.shape[1], device=keys.device)[:, None, None]

    def fetch(logical: torch.Tensor):
        ids = block_row[logical].long()
        return keys[ids, heads].to(torch.float32), values[ids, heads].to(torch.float32)

    return fetch


def update_block_summaries(kv_cache: torch.Tensor, summary: torch.Tensor, filled) -> None:
    """Block mode: summarize the blocks this step filled (raw keys)."""
    ids = filled[0]
    if len(ids):
        summary[ids] = summarize_blocks(raw_views(kv_cache)[0][ids])
