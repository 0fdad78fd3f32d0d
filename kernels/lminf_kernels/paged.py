"""Paged KV caches and the softmax pieces both torch paths share.

One cache tensor per layer, [num_blocks, Hkv, B, 2*D], in one of two layouts:
  - raw (`raw_views`): K then V on the last dim, token-major; keys stored unrotated.
  - absolute (`absolute_views`): vLLM's CPU "vec" layout: per (block, kv head) the B*D
    key elements dim-major ([D][B]) then the B*D value elements token-major ([B][D]);
    keys stored rotated at their absolute position.
Both are exposed as a (keys, values) pair of [num_blocks, Hkv, B, D] views, so the K/V
writer and the span gather below are written once for both.
"""

from __future__ import annotations

import torch

CacheViews = tuple[torch.Tensor, torch.Tensor]


def raw_views(kv_cache: torch.Tensor) -> CacheViews:
    d = kv_cache.shape[-1] // 2
    return kv_cache[..., :d], kv_cache[..., d:]


KEY_LAYOUTS = ("vec", "amx")  # the absolute cache's key layouts, named by vLLM's CPU attention ISA


def absolute_key_blocks(kv_cache: torch.Tensor, layout: str = "vec") -> torch.Tensor:
    """The absolute cache's keys as a view [num_blocks, Hkv, ...] whose trailing dims flatten
    to [D][B]: "vec" [D, B]; "amx" (vLLM's layout for bf16 on AMX CPUs, [B/16][D/2][16][2]
    in memory, the keys only) permuted to [D/2, 2, B/16, 16]."""
    if layout not in KEY_LAYOUTS:
        raise ValueError(f"key_layout must be one of {KEY_LAYOUTS}, got {layout!r}")
    n, h, bs, d2 = kv_cache.shape
    d = d2 // 2
    keys = kv_cache.view(n, h, 2, bs * d)[:, :, 0]
    if layout == "amx":
        return keys.view(n, h, bs // 16, d // 2, 16, 2).permute(0, 1, 3, 5, 2, 4)
    return keys.view(n, h, d, bs)


def absolute_views(kv_cache: torch.Tensor) -> CacheViews:
    n, h, bs, d2 = kv_cache.shape
    d = d2 // 2
    flat = kv_cache.view(n, h, 2, bs * d)
    return flat[:, :, 0].view(n, h, d, bs).transpose(2, 3), flat[:, :, 1].view(n, h, bs, d)


def store_kv(views: CacheViews, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write this step's K/V ([T, Hkv, D]) at `slot_mapping` (negative slots are padding)."""
    keys, values = views
    n = min(slot_mapping.shape[0], key.shape[0])
    slots = slot_mapping[:n].long()
    key, value = key[:n], value[:n]
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    bs = keys.shape[2]
    blk, off = slots // bs, slots % bs
    keys[blk, :, off] = key.to(keys.dtype)
    values[blk, :, off] = value.to(values.dtype)


def gather_span(views: CacheViews, block_row: torch.Tensor, lo: int, hi: int,
                with_values: bool = True) -> CacheViews:
    """Tokens [lo, hi) of one sequence as head-major K and V: [Hkv, hi-lo, D] each (V None
    without `with_values`).

    Reads exactly the blocks that hold those tokens (entries of the block table
    outside them may be stale: freed blocks)."""
    keys, values = views
    h, bs = keys.shape[1], keys.shape[2]
    b0, b1 = lo // bs, (hi - 1) // bs + 1
    ids = block_row[b0:b1].long()

    def span(x: torch.Tensor) -> torch.Tensor:
        return x[ids].transpose(0, 1).reshape(h, (b1 - b0) * bs, -1)[:, lo - b0 * bs : hi - b0 * bs]

    return span(keys), span(values) if with_values else None


# -- query rows -----------------------------------------------------------------------
# Attention runs per kv head with rows (query head in its group, token): [Hkv, G*T, D].


def to_head_rows(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[T, Hq, D] -> [Hkv, G, T, D] (G = Hq / Hkv query heads per kv head)."""
    t, hq, d = q.shape
    return q.view(t, hkv, hq // hkv, d).permute(1, 2, 0, 3)


def from_head_rows(res: torch.Tensor, t: int) -> torch.Tensor:
    """[Hkv, G*T, Dv] -> [T, Hq, Dv]."""
    hkv = res.shape[0]
    return res.view(hkv, -1, t, res.shape[-1]).permute(2, 0, 1, 3).reshape(t, -1, res.shape[-1])


# -- softmax over the local span, then the global keys merged in ------------------------


def band_mask(pa: int, pb: int, lo: int, n_local: int, group: int) -> torch.Tensor:
    """Additive mask [group * T, pb + 1 - lo] for queries pa..pb over keys lo..pb: the
    query at position p sees keys (p - n_local, p]; rows are (head, token)."""
    rel_q = torch.arange(pa - lo, pb - lo + 1)[:, None]
    rel_k = torch.arange(pb + 1 - lo)[None, :]
    visible = (rel_k <= rel_q) & (rel_k > rel_q - n_local)
    return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")).repeat(group, 1)


def _flash(q, k, v, mask, scale):
    # torch's fused CPU kernel, which also returns the log-sum-exp
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], k[None], v[None], 0.0, False, attn_mask=mask, scale=scale
    )
    return out[0], lse[0]


def _dense(q, k, v, mask, scale):
    s = torch.bmm(q, k.transpose(1, 2)) * scale
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, dim=-1)
    return torch.bmm(torch.exp(s - lse[..., None]), v), lse


def attend_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [H, M, D] over k/v [H, N, D] with an additive mask [M, N]
    (or None); returns (output, log-sum-exp). Fused on CPU for many query rows (it does
    not pay off for one row, and mishandles a single key)."""
    fused = q.device.type == "cpu" and mask is not None
    return (_flash if fused else _dense)(q, k, v, mask, scale)


def global_seen(pa: int, pb: int, g_hi: int, n_local: int) -> torch.Tensor:
    """[T, g_hi] bool: global key j is seen by the query at p (pa <= p <= pb) iff j <= p - W
    (nearer keys are in its window)."""
    pos = torch.arange(pa, pb + 1)[:, None]
    return torch.arange(g_hi)[None, :] <= pos - n_local


def merge_partials(res: torch.Tensor, lse: torch.Tensor, res2: torch.Tensor,
                   lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax from two partial ones over disjoint key sets: (output [H, M, Dv],
    lse [H, M]) each; `lse` must be finite (every row sees its own key), `lse2` may be -inf."""
    top = torch.maximum(lse, lse2)
    w1, w2 = torch.exp(lse - top), torch.exp(lse2 - top)
    total = w1 + w2
    return (res * w1[..., None] + res2 * w2[..., None]) / total[..., None], top + torch.log(total)


def merge_into_rows(out: torch.Tensor, lse: torch.Tensor, part: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A partial softmax `part` ([Hkv, G*T, Dv], [Hkv, G*T], as `to_head_rows` orders rows)
    merged in place into a token-major result: out [T, Hq, Dv] and its log-sum-exp lse
    [T, Hq] (float32, contiguous); both updated."""
    tq, hq, dv = out.shape
    hkv = part[0].shape[0]
    group = hq // hkv
    res = to_head_rows(out.to(torch.float32), hkv).reshape(hkv, group * tq, dv)
    res_lse = lse.view(tq, hkv, group).permute(1, 2, 0).reshape(hkv, group * tq)
    merged, merged_lse = merge_partials(res, res_lse, *part)
    out.copy_(from_head_rows(merged, tq).to(out.dtype))
    lse.copy_(merged_lse.view(hkv, group, tq).permute(2, 0, 1).reshape(tq, hq))


def merge_global(res: torch.Tensor, lse: torch.Tensor, s_g: torch.Tensor,
                 v_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over local and global keys from the local result (res, lse) and the
    global logits s_g [H, M, g] (-inf where not seen; a row may see none) with v_g [H, g, Dv];
    returns the merged (output, lse)."""
    lse_g = torch.logsumexp(s_g, dim=-1)
    p_g = torch.exp(s_g - lse_g.clamp(min=-1e30)[..., None])  # rows with no global key stay 0
    return merge_partials(res, lse, torch.bmm(p_g, v_g.to(p_g.dtype)), lse_g)
