"""Λ attention over a paged cache of raw keys: the torch path (CPU, and any device).

For each sequence, queries are processed in tiles. A tile reads only
  - the local span [local_start(first query), last query], rotated at positions
    relative to the span start (angles stay below n_local + tile, whatever the
    absolute position), and
  - the global tokens [0, global_end(last query)), unrotated, against queries
    rotated by `distance_limit`,
and merges both in one softmax. Blocks between the two spans are never touched, so
their block-table entries may be stale (freed blocks).
"""

from __future__ import annotations

import torch

from .pattern import LambdaPattern
from .rope import RopeStyle, cos_sin, cos_sin_table, rotate

DEFAULT_QUERY_TILE = 256


def store_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write this step's raw K/V at `slot_mapping` (negative slots are padding)."""
    n = min(slot_mapping.shape[0], key.shape[0])
    slots = slot_mapping[:n].long()
    key, value = key[:n], value[:n]
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    bs, d = kv_cache.shape[2], key.shape[-1]
    blk, off = slots // bs, slots % bs
    kv_cache[blk, :, off, :d] = key.to(kv_cache.dtype)
    kv_cache[blk, :, off, d:] = value.to(kv_cache.dtype)


def gather_span(kv_cache: torch.Tensor, block_row: torch.Tensor, lo: int, hi: int):
    """Tokens [lo, hi) of one sequence as head-major K and V: [Hkv, hi-lo, D] each.

    Reads exactly the blocks that hold those tokens.
    """
    bs = kv_cache.shape[2]
    b0, b1 = lo // bs, (hi - 1) // bs + 1
    blocks = kv_cache[block_row[b0:b1]]  # [nb, Hkv, B, 2D]
    hkv = kv_cache.shape[1]
    span = blocks.transpose(0, 1).reshape(hkv, (b1 - b0) * bs, -1)[:, lo - b0 * bs : hi - b0 * bs]
    d = span.shape[-1] // 2
    return span[..., :d], span[..., d:]


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q: [Hkv, G*T, D], k: [Hkv, N, D] -> [Hkv, G*T, N]."""
    return torch.bmm(q, k.transpose(1, 2))


def _flash(q, k, v, mask, scale):
    """Fused attention that also returns the log-sum-exp (torch's CPU flash kernel);
    q: [H, M, D], k/v: [H, N, D], mask: additive [M, N] or None."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], k[None], v[None], 0.0, False, attn_mask=mask, scale=scale
    )
    return out[0], lse[0]


def _dense(q, k, v, mask, scale):
    """Same contract as _flash, unfused (devices without the CPU kernel)."""
    s = _scores(q, k) * scale
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, dim=-1)
    return torch.bmm(torch.exp(s - lse[..., None]), v), lse


def band_mask(pa: int, pb: int, lo: int, n_local: int, group: int) -> torch.Tensor:
    """Additive mask [group * T, pb + 1 - lo] for queries pa..pb over keys lo..pb: the
    query at position p sees keys (p - n_local, p]; rows are (head, token)."""
    rel_q = torch.arange(pa - lo, pb - lo + 1)[:, None]
    rel_k = torch.arange(pb + 1 - lo)[None, :]
    visible = (rel_k <= rel_q) & (rel_k > rel_q - n_local)
    return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")).repeat(group, 1)


def _merge(o1, lse1, o2, lse2):
    """Combine two partial softmaxes over disjoint key sets (lse2 may be -inf)."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    return (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]


def lambda_paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    *,
    pattern: LambdaPattern,
    style: RopeStyle,
    inv_freq: torch.Tensor,
    scale: float,
    query_scale: list[float] | None = None,
    out: torch.Tensor | None = None,
    query_tile: int = DEFAULT_QUERY_TILE,
) -> torch.Tensor:
    """Λ attention for a batch of sequences (prefill chunks and decodes mixed).

    query: [T, Hq, D] raw queries, sequence i owning rows
    query_start_loc[i]:query_start_loc[i+1], its queries being the last tokens of
    its seq_lens[i] tokens. kv_cache: [num_blocks, Hkv, B, 2*D], raw K then V on the
    last dim, already holding this step's keys. block_table: [num_seqs, max_blocks].
    inv_freq: [R/2] shared, or [num_seqs, R/2] per sequence (CLEX). query_scale:
    per-sequence query multiplier (CLEX log scale). Computes in float32.
    """
    num_tokens, hq, dh = query.shape
    hkv = kv_cache.shape[1]
    group = hq // hkv
    if out is None:
        out = torch.empty_like(query)
    inv_freq = inv_freq.to(torch.float32)
    attend = _flash if query.device.type == "cpu" else _dense
    for i, seq_len in enumerate(seq_lens):
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
        k_span, v_span = gather_span(kv_cache, row, span_lo, seq_len)
        kc, ks = cos_sin_table(freq, seq_len - span_lo)
        k_span = rotate(k_span, kc, ks, style)
        v_span = v_span.to(torch.float32)
        for t0 in range(a, b, query_tile):
            t1 = min(b, t0 + query_tile)
            pa, pb = first_pos + (t0 - a), first_pos + (t1 - a) - 1
            tq = t1 - t0
            q = query[t0:t1].to(torch.float32)
            if qmul != 1.0:
                q = q * qmul
            # [T, Hq, D] -> [Hkv, G*T, D] with row index g*T + t
            q_heads = q.view(tq, hkv, group, dh).permute(1, 2, 0, 3)

            lo = pattern.local_start(pa)
            k_rot = k_span[:, lo - span_lo : pb + 1 - span_lo]
            v_loc = v_span[:, lo - span_lo : pb + 1 - span_lo]
            q_loc = rotate(q_heads, kc[pa - span_lo : pb + 1 - span_lo], ks[pa - span_lo : pb + 1 - span_lo],
                           style).reshape(hkv, group * tq, dh)
            mask = band_mask(pa, pb, lo, pattern.n_local, group) if tq > 1 else None
            fn = attend if tq > 1 else _dense  # the fused kernel only pays off for many queries
            res, lse = fn(q_loc, k_rot, v_loc, mask, scale)

            g_hi = pattern.global_end(pb)
            if g_hi > 0:
                k_g, v_g = gather_span(kv_cache, row, 0, g_hi)
                q_g = rotate(q_heads, gcos, gsin, style).reshape(hkv, group * tq, dh)
                # key j is global for query p iff j <= p - W
                pos = torch.arange(pa, pb + 1)[:, None]
                seen = torch.arange(g_hi)[None, :] <= pos - pattern.n_local
                g_mask = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf")).repeat(group, 1)
                s_g = _scores(q_g, k_g.to(torch.float32)) * scale + g_mask
                lse_g = torch.logsumexp(s_g, dim=-1)
                p_g = torch.exp(s_g - lse_g.clamp(min=-1e30)[..., None])  # rows with no key stay 0
                res = _merge(res, lse, torch.bmm(p_g, v_g.to(torch.float32)), lse_g)

            out[t0:t1] = res.view(hkv, group, tq, -1).permute(2, 0, 1, 3).reshape(tq, hq, -1)
    return out
