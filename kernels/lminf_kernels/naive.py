"""Plain reference for Λ-shaped (LM-Infinite) attention: dense, one sequence at a time.

Written for clarity, not speed: every (query, key) pair gets its own rotation by the
distance the Λ pattern assigns it. The fast paths (`raw_torch.py`, `absolute_cpu.py`, the Triton
kernels) are tested against this; this is tested against the formula itself.
"""

from __future__ import annotations

import torch

from .pattern import LambdaPattern
from .rope import RopeStyle, cos_sin, rotate


def pair_distances(q_pos: torch.Tensor, num_keys: int, pattern: LambdaPattern) -> torch.Tensor:
    """Rotary distance per (query, key) pair, or -1 where the key is not attended.

    Local keys `p - W < j <= p` are seen at `p - j`; global keys `j < G`, `j <= p - W`
    at `distance_limit`.
    """
    p = q_pos.long()[:, None]
    j = torch.arange(num_keys)[None, :]
    local = (j <= p) & (j > p - pattern.n_local)
    glob = (j < pattern.n_global) & (j <= p - pattern.n_local)
    dist = torch.full((p.shape[0], num_keys), -1, dtype=torch.long)
    dist = torch.where(local, p - j, dist)
    return torch.where(glob, torch.full_like(dist, pattern.distance_limit), dist)


def lambda_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    *,
    pattern: LambdaPattern,
    style: RopeStyle,
    inv_freq: torch.Tensor,
    scale: float,
    query_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    top_k: tuple[int, int] | None = None,
    top_k_rows: torch.Tensor | None = None,
    top_k_block_size: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Λ attention of raw queries over raw keys/values of one sequence.

    q: [Tq, Hq, D] (before rotation), k/v: [S, Hkv, D] for key positions 0..S-1,
    q_pos: [Tq] query positions (< S). top_k = (k, distance): rows flagged in top_k_rows
    [Tq] bool (default: all) whose middle holds >= k keys also see, per query head, the k
    middle keys with the largest logit at `distance`, at that logit. With top_k_block_size
    (block mode) k counts blocks: the k middle blocks with the largest bound
    sum_c max(q_c max_c, q_c min_c) (q rotated by `distance`, min/max over the block's raw
    keys) give all their middle keys, at `distance`. Returns [Tq, Hq, Dv] in `dtype`, and
    with return_lse also each row's log-sum-exp of the logits it attends, [Tq, Hq].
    """
    tq, hq, _ = q.shape
    s, hkv, _ = k.shape
    group = hq // hkv
    dist = pair_distances(q_pos, s, pattern)  # [Tq, S]
    c, sn = cos_sin(dist.clamp(min=0), inv_freq.to(dtype))  # [Tq, S, R/2]
    q = q.to(dtype) * query_scale
    # rotate each query once per key: [Tq, S, Hq, D]
    q_rot = rotate(q[:, None].expand(tq, s, hq, q.shape[-1]), c[:, :, None], sn[:, :, None], style)
    k_rep = k.to(dtype).repeat_interleave(group, dim=1)  # [S, Hq, D]
    logits = torch.einsum("tshd,shd->hts", q_rot, k_rep) * scale
    logits = logits.masked_fill((dist < 0)[None], float("-inf"))
    if top_k is not None:
        logits = _with_top_k(logits, q, k_rep, q_pos, pattern, style, inv_freq.to(dtype), scale, *top_k,
                             torch.ones(tq, dtype=torch.bool) if top_k_rows is None else top_k_rows,
                             top_k_block_size)
    probs = torch.softmax(logits, dim=-1)
    probs = torch.nan_to_num(probs)  # a query with no key (cannot happen for p >= 0) stays 0
    v_rep = v.to(dtype).repeat_interleave(group, dim=1)
    out = torch.einsum("hts,shd->thd", probs, v_rep)
    return (out, torch.logsumexp(logits, dim=-1).t()) if return_lse else out


def _with_top_k(logits, q, k_rep, q_pos, pattern, style, inv_freq, scale, k, distance, rows, block_size=None):
    """Λ logits [Hq, Tq, S] with each flagged row's k best middle logits (per head) filled in
    (block mode: the middle logits of its k best blocks)."""
    c, sn = cos_sin(torch.tensor(distance), inv_freq)
    q_d = rotate(q, c, sn, style)  # every middle key is seen at the same distance
    mid_logits = torch.einsum("thd,shd->hts", q_d, k_rep) * scale
    p = q_pos.long()[:, None]
    j = torch.arange(k_rep.shape[0])[None, :]
    middle = (j >= pattern.n_global) & (j <= p - pattern.n_local)  # [Tq, S]
    out = logits.clone()
    for t in range(q.shape[0]):
        keys = torch.nonzero(middle[t]).flatten()
        if block_size is not None:
            blocks = sorted({int(j) // block_size for j in keys})
            if not bool(rows[t]) or len(blocks) < k:
                continue
            for h in range(q.shape[1]):
                bound = []
                for b in blocks:
                    kb = k_rep[b * block_size:(b + 1) * block_size, h]  # the whole block, filled
                    lo, hi = kb.min(0).values, kb.max(0).values
                    bound.append(float(torch.maximum(q_d[t, h] * hi, q_d[t, h] * lo).sum()))
                best = [blocks[i] for i in sorted(range(len(blocks)), key=lambda i: -bound[i])[:k]]
                chosen = keys[torch.tensor([int(j) // block_size in best for j in keys])]
                out[h, t, chosen] = mid_logits[h, t, chosen]
            continue
        if not bool(rows[t]) or len(keys) < k:
            continue
        for h in range(q.shape[1]):
            best = keys[torch.argsort(mid_logits[h, t, keys], descending=True)[:k]]
            out[h, t, best] = mid_logits[h, t, best]
    return out


def gather_paged(kv_cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int, head_size: int):
    """Keys and values of tokens 0..num_tokens-1 from a paged cache
    [num_blocks, Hkv, B, 2*D] (K in [..., :D], V in [..., D:])."""
    bs = kv_cache.shape[2]
    nb = -(-num_tokens // bs)
    blocks = kv_cache[block_row[:nb].long()]  # [nb, H, B, 2D]
    flat = blocks.permute(0, 2, 1, 3).reshape(nb * bs, kv_cache.shape[1], -1)[:num_tokens]
    return flat[..., :head_size], flat[..., head_size:]


def lambda_paged_attention_naive(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                                 query_start_loc: list[int], seq_lens: list[int], *, pattern: LambdaPattern,
                                 style: RopeStyle, inv_freq: torch.Tensor, scale: float,
                                 query_scale: list[float] | None = None,
                                 top_k: tuple[int, int, list[int]] | None = None,
                                 top_k_block_size: int | None = None) -> torch.Tensor:
    """Reference for the paged entry point: gathers every token of each sequence
    (the fast paths must not) and runs the dense reference. top_k = (k, distance,
    first_pos per sequence): rows at positions >= first_pos may use top-k. Returns float64."""
    head_size = query.shape[-1]
    out = torch.zeros(query.shape, dtype=torch.float64)
    for i, s in enumerate(seq_lens):
        a, b = query_start_loc[i], query_start_loc[i + 1]
        if b == a:
            continue
        k, v = gather_paged(kv_cache, block_table[i], s, head_size)
        q_pos = torch.arange(s - (b - a), s)
        freq = inv_freq if inv_freq.dim() == 1 else inv_freq[i]
        out[a:b] = lambda_attention_dense(
            query[a:b], k, v, q_pos, pattern=pattern, style=style, inv_freq=freq, scale=scale,
            query_scale=1.0 if query_scale is None else query_scale[i],
            top_k=None if top_k is None else top_k[:2],
            top_k_rows=None if top_k is None else q_pos >= top_k[2][i], top_k_block_size=top_k_block_size,
        )
    return out
