"""Λ attention over a paged cache of raw keys: the Triton path (CUDA, or the Triton
interpreter on CPU).

Same semantics and entry-point signature as `raw_torch.lambda_paged_attention`.

Design
------
One program per (query tile, KV head, KV split). A query tile is up to BLOCK_M
consecutive query tokens of ONE sequence; the program handles all GROUP query heads
of its KV head, so its score rows are (token, head) pairs, ROWS = max(16,
BLOCK_M * next_pow2(GROUP)) of them. Each K/V token is therefore loaded once per KV
group (GQA/MQA friendly) and fed to tensor-core dots.

The grid's first axis needs no host-side knowledge of the query lengths: sequence s
owns tile slots [qsl[s] // BLOCK_M + s, qsl[s+1] // BLOCK_M + s + 1), an upper
bound on its ceil(q_len / BLOCK_M) tiles, so T // BLOCK_M + num_seqs slots cover any
batch (with BLOCK_M == 1, slots are simply tokens: [qsl[s], qsl[s+1]), T slots). A
program finds its sequence by binary search for the last start <= its slot; surplus
slots do no work.

Each program streams two key sets through one online softmax (log2 domain):
  1. global keys [0, global_end(last query of tile)), unrotated, against the query
     rotated by `distance_limit` (all global pairs sit at that one distance);
  2. the local span [local_start(first query), last query], with queries and keys
     rotated in-kernel at positions relative to the span start `lo` — angles stay
     below n_local + BLOCK_M whatever the absolute position.
Per-row masks make the two sets disjoint for every query row (global: j <= p - W,
local: j > p - W), so the tile-level spans may overlap without double counting.
Key rotation: cos/sin of (tile offset + n) * f are formed from cos/sin of the tile
offset angle (one [R/2] vector per tile) and a [BLOCK_N, R/2] table of the in-tile
offset angles computed once per program (angle addition in fp32), so the inner loop
has no per-element transcendental.

Rotary channels are split into the two halves of each rotation pair (neox: i and
i + R/2; GPT-J: 2i and 2i+1, de-interleaved by address arithmetic on the loads), plus
the pass-through channels past rotary_dim (partial rotary). Scores are the sum of up
to three dots over those channel groups.

Only blocks holding tokens in the two spans are addressed: block-table entries are
loaded with the token mask, so entries of the gap between them (stale or freed block
ids, possibly pointing at garbage) are never read, nor are their blocks.

Decode with few (sequence, KV head) programs splits the key tiles of each program
across NUM_SPLITS programs (flash-decoding); a small kernel merges the partial
(max, sum, accumulator) triples.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .pattern import LambdaPattern
from .rope import RopeStyle

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log-sum-exp back from log2 units inside the kernels


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


@triton.jit
def _sincos(x):
    """(sin x, cos x) in fp32 from FMAs only: Cody-Waite reduction by pi/2 (two-part
    constant) and Taylor polynomials on [-pi/4, pi/4] (truncation error < 2e-9). Avoids
    libdevice's slow path, which spills to local memory."""
    k = tl.floor(x * 0.6366197723675814 + 0.5)
    r = tl.fma(k, -1.5707963705062866, x)
    r = tl.fma(k, 4.371139000186241e-08, r)
    r2 = r * r
    sr = r + r * r2 * (-0.16666666666666666 + r2 * (0.008333333333333333 + r2 * (-1.984126984126984e-04
                                                                                + r2 * 2.755731922398589e-06)))
    cr = 1.0 + r2 * (-0.5 + r2 * (0.041666666666666664 + r2 * (-1.388888888888889e-03 + r2 * (
        2.48015873015873e-05 + r2 * -2.755731922398589e-07))))
    quad = k.to(tl.int32) & 3
    sin = tl.where(quad == 0, sr, tl.where(quad == 1, cr, tl.where(quad == 2, -sr, -cr)))
    cos = tl.where(quad == 0, cr, tl.where(quad == 1, -sr, tl.where(quad == 2, -cr, sr)))
    return sin, cos


@triton.jit
def _online_step(s, mask, v, m_i, l_i, acc, qk_scale, DOT_PREC: tl.constexpr):
    """One online-softmax update with raw scores `s` [ROWS, N] and values v [N, DV]."""
    s = tl.where(mask, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _key_tile_step(qa, qb, qp, ka, kb, base, jm, mask, col_p, p_ok, offs_v, v_ok, c_s3, m_i, l_i, acc, qk_scale,
                   HEAD_DIM: tl.constexpr, PASS_P2: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key tile of either span: scores of the rotated query halves (qa, qb) against the
    key halves (ka, kb) plus the pass-through channels, then one online-softmax update
    with the tile's values. Operands in qa's dtype."""
    s = tl.dot(qa, tl.trans(ka), input_precision=DOT_PREC)
    s = tl.dot(qb, tl.trans(kb), s, input_precision=DOT_PREC)
    if PASS_P2 > 0:
        kp = tl.load(base[:, None] + col_p[None, :] * c_s3, mask=jm[:, None] & p_ok[None, :], other=0.0)
        s = tl.dot(qp, tl.trans(kp.to(qp.dtype)), s, input_precision=DOT_PREC)
    vv = tl.load(base[:, None] + (HEAD_DIM + offs_v)[None, :] * c_s3, mask=jm[:, None] & v_ok[None, :], other=0.0)
    return _online_step(s, mask, vv.to(qa.dtype), m_i, l_i, acc, qk_scale, DOT_PREC)


@triton.jit
def _token_base(cache_ptr, bt_row_ptr, bt_s1, j, jm, kv_off, c_s0, c_s2, BLOCK_SIZE: tl.constexpr):
    """Address of token j's row for this KV head (only blocks of unmasked tokens)."""
    blk = tl.load(bt_row_ptr + (j // BLOCK_SIZE).to(tl.int64) * bt_s1, mask=jm, other=0).to(tl.int64)
    return cache_ptr + blk * c_s0 + kv_off + (j % BLOCK_SIZE).to(tl.int64) * c_s2


@triton.jit
def _lambda_attn_fwd(
    q_ptr, cache_ptr, bt_ptr, qsl_ptr, seqlen_ptr, freq_ptr, qscale_ptr,
    out_ptr, part_acc_ptr, part_ml_ptr, lse_ptr,
    num_seqs,
    q_s0, q_s1, q_s2,
    c_s0, c_s1, c_s2, c_s3,
    bt_s0, bt_s1,
    freq_s0,
    o_s0, o_s1, o_s2,
    n_global, n_local, distance_limit,
    qk_scale,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, HALF_P2: tl.constexpr,
    PASS_DIM: tl.constexpr, PASS_P2: tl.constexpr, DV_P2: tl.constexpr,
    NEOX: tl.constexpr, HAS_QSCALE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr, HAS_LSE: tl.constexpr,
):
    # dot operand dtype: the cache dtype; fp32 under the CPU interpreter for bf16,
    # whose interpreted dot multiplies raw bf16 bit patterns
    if DOT_UPCAST:
        dt = tl.float32
    else:
        dt = cache_ptr.dtype.element_ty
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # ---- which sequence / query tile this slot belongs to -----------------------
    lo_s = pid * 0  # a tensor, not a constant, in both compiled and interpreted runs
    hi_s = lo_s + num_seqs - 1
    while lo_s < hi_s:
        mid = (lo_s + hi_s + 1) // 2
        start_mid = tl.load(qsl_ptr + mid) // BLOCK_M
        if BLOCK_M > 1:
            start_mid += mid
        go_up = start_mid <= pid
        lo_s = tl.where(go_up, mid, lo_s)
        hi_s = tl.where(go_up, hi_s, mid - 1)
    seq = lo_s
    q_seq0 = tl.load(qsl_ptr + seq)
    q_seq1 = tl.load(qsl_ptr + seq + 1)
    seq_len = tl.load(seqlen_ptr + seq)
    if BLOCK_M > 1:
        tile = pid - (q_seq0 // BLOCK_M + seq)
    else:
        tile = pid - q_seq0
    q_start = q_seq0 + tile * BLOCK_M
    tile_len = tl.minimum(q_seq1 - q_start, BLOCK_M)  # <= 0 for surplus slots
    has_work = tile_len > 0
    p_first = seq_len - (q_seq1 - q_seq0) + (q_start - q_seq0)
    p_last = p_first + tile_len - 1

    # key spans of the tile
    lo = tl.maximum(p_first - n_local + 1, 0)
    hi = p_last + 1
    g_hi = tl.maximum(tl.minimum(n_global, p_last - n_local + 1), 0)
    n_gt = tl.where(has_work, (g_hi + BLOCK_N - 1) // BLOCK_N, 0)
    n_lt = tl.where(has_work, (hi - lo + BLOCK_N - 1) // BLOCK_N, 0)
    n_tot = n_gt + n_lt
    per_split = (n_tot + NUM_SPLITS - 1) // NUM_SPLITS
    v0 = split * per_split
    v1 = tl.minimum(v0 + per_split, n_tot)

    # ---- query rows: (token t, head g) ----------------------------------------
    r = tl.arange(0, ROWS)
    t = r // GROUP_P2
    g = r % GROUP_P2
    row_ok = (t < tile_len) & (g < GROUP)
    tok = (q_start + t).to(tl.int64)
    head = kvh * GROUP + g
    p = p_first + t  # query positions

    offs_h = tl.arange(0, HALF_P2)
    h_ok = offs_h < ROT_HALF
    if NEOX:
        col_a = offs_h
        col_b = offs_h + ROT_HALF
    else:
        col_a = 2 * offs_h
        col_b = 2 * offs_h + 1
    freq = tl.load(freq_ptr + seq.to(tl.int64) * freq_s0 + offs_h, mask=h_ok, other=0.0)

    q_row = q_ptr + tok * q_s0 + head.to(tl.int64) * q_s1
    qmask_h = row_ok[:, None] & h_ok[None, :]
    # raw queries stay in the input dtype; each key set rotates its own copy in fp32
    qa = tl.load(q_row[:, None] + col_a[None, :] * q_s2, mask=qmask_h, other=0.0)
    qb = tl.load(q_row[:, None] + col_b[None, :] * q_s2, mask=qmask_h, other=0.0)
    if HAS_QSCALE:
        qk_scale = qk_scale * tl.load(qscale_ptr + seq)  # q * c rotates to c * rot(q)
    if PASS_P2 > 0:
        offs_p = tl.arange(0, PASS_P2)
        p_ok = offs_p < PASS_DIM
        col_p = 2 * ROT_HALF + offs_p
        qp = tl.load(q_row[:, None] + col_p[None, :] * q_s2, mask=row_ok[:, None] & p_ok[None, :], other=0.0)
        qp = qp.to(dt)
    else:  # no pass-through channels: placeholders that _key_tile_step never reads
        p_ok = h_ok
        col_p = col_a
        qp = qa

    offs_v = tl.arange(0, DV_P2)
    v_ok = offs_v < HEAD_DIM

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DV_P2], tl.float32)

    bt_row = bt_ptr + seq.to(tl.int64) * bt_s0
    kv_off = kvh.to(tl.int64) * c_s1
    offs_n = tl.arange(0, BLOCK_N)

    # ---- 1. global keys, unrotated; queries at distance_limit -------------------
    g0 = v0
    g1 = tl.minimum(v1, n_gt)
    if g0 < g1:
        sg, cg = _sincos(distance_limit * freq)
        sg = sg[None, :]
        cg = cg[None, :]
        qa32 = qa.to(tl.float32)
        qb32 = qb.to(tl.float32)
        qga = (qa32 * cg - qb32 * sg).to(dt)
        qgb = (qb32 * cg + qa32 * sg).to(dt)
        for vt in range(g0, g1):
            j = vt * BLOCK_N + offs_n
            jm = j < g_hi
            base = _token_base(cache_ptr, bt_row, bt_s1, j, jm, kv_off, c_s0, c_s2, BLOCK_SIZE)
            kmask = jm[:, None] & h_ok[None, :]
            ka = tl.load(base[:, None] + col_a[None, :] * c_s3, mask=kmask, other=0.0).to(dt)
            kb = tl.load(base[:, None] + col_b[None, :] * c_s3, mask=kmask, other=0.0).to(dt)
            mask = (j[None, :] <= p[:, None] - n_local) & jm[None, :]
            m_i, l_i, acc = _key_tile_step(qga, qgb, qp, ka, kb, base, jm, mask, col_p, p_ok, offs_v, v_ok, c_s3,
                                           m_i, l_i, acc, qk_scale, HEAD_DIM, PASS_P2, DOT_PREC)

    # ---- 2. local span, rotated relative to its start `lo` ----------------------
    l0 = tl.maximum(v0, n_gt) - n_gt
    l1 = v1 - n_gt
    if l0 < l1:
        sq, cq = _sincos((p - lo).to(tl.float32)[:, None] * freq[None, :])
        qa32 = qa.to(tl.float32)
        qb32 = qb.to(tl.float32)
        qla = (qa32 * cq - qb32 * sq).to(dt)
        qlb = (qb32 * cq + qa32 * sq).to(dt)
        # in-tile offsets n: cos/sin((rel0 + n) f) by angle addition from this table
        so, co = _sincos(offs_n.to(tl.float32)[:, None] * freq[None, :])
        for vt in range(l0, l1):
            rel0 = vt * BLOCK_N
            j = lo + rel0 + offs_n
            jm = j < hi
            base = _token_base(cache_ptr, bt_row, bt_s1, j, jm, kv_off, c_s0, c_s2, BLOCK_SIZE)
            kmask = jm[:, None] & h_ok[None, :]
            ka = tl.load(base[:, None] + col_a[None, :] * c_s3, mask=kmask, other=0.0).to(tl.float32)
            kb = tl.load(base[:, None] + col_b[None, :] * c_s3, mask=kmask, other=0.0).to(tl.float32)
            sb, cb = _sincos(rel0.to(tl.float32) * freq)
            sb = sb[None, :]
            cb = cb[None, :]
            ck = cb * co - sb * so
            sk = sb * co + cb * so
            kra = (ka * ck - kb * sk).to(dt)
            krb = (kb * ck + ka * sk).to(dt)
            mask = (j[None, :] <= p[:, None]) & (j[None, :] > p[:, None] - n_local) & jm[None, :]
            m_i, l_i, acc = _key_tile_step(qla, qlb, qp, kra, krb, base, jm, mask, col_p, p_ok, offs_v, v_ok, c_s3,
                                           m_i, l_i, acc, qk_scale, HEAD_DIM, PASS_P2, DOT_PREC)

    # ---- write ------------------------------------------------------------------
    out_mask = row_ok[:, None] & v_ok[None, :]
    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / l_safe[:, None]
        o_row = out_ptr + tok * o_s0 + head.to(tl.int64) * o_s1
        tl.store(o_row[:, None] + offs_v[None, :] * o_s2, o.to(out_ptr.dtype.element_ty), mask=out_mask)
        if HAS_LSE:  # natural log; scores are kept in log2 units (qk_scale has log2(e) in it)
            hq = tl.num_programs(1) * GROUP
            lse = tl.where(l_i > 0.0, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
            tl.store(lse_ptr + tok * hq + head, lse, mask=row_ok)
    else:
        # partials: acc [T, Hq, S, D], (m, l) [T, Hq, S, 2], contiguous
        hq = tl.num_programs(1) * GROUP
        slot = (tok * hq + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + slot[:, None] * HEAD_DIM + offs_v[None, :], acc, mask=out_mask)
        tl.store(part_ml_ptr + slot * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + slot * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits(
    part_acc_ptr, part_ml_ptr, out_ptr, o_s0, o_s1, o_s2, lse_ptr,
    NUM_SPLITS: tl.constexpr, S_P2: tl.constexpr, HEAD_DIM: tl.constexpr, DV_P2: tl.constexpr,
    HAS_LSE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    hq = tl.num_programs(1)
    offs_s = tl.arange(0, S_P2)
    s_ok = offs_s < NUM_SPLITS
    offs_v = tl.arange(0, DV_P2)
    v_ok = offs_v < HEAD_DIM
    slot = (tok * hq + head) * NUM_SPLITS + offs_s
    m = tl.load(part_ml_ptr + slot * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + slot * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    a = tl.load(part_acc_ptr + slot[:, None] * HEAD_DIM + offs_v[None, :], mask=s_ok[:, None] & v_ok[None, :],
                other=0.0)
    num = tl.sum(a * w[:, None], 0)
    den = tl.sum(l * w, 0)
    if HAS_LSE:
        tl.store(lse_ptr + tok * hq + head, tl.where(den > 0.0, (m_max + tl.log2(tl.where(den > 0.0, den, 1.0))) * _LN2,
                                                     float("-inf")))
    den = tl.where(den > 0.0, den, 1.0)
    o = num / den
    tl.store(out_ptr + tok * o_s0 + head.to(tl.int64) * o_s1 + offs_v * o_s2, o.to(out_ptr.dtype.element_ty),
             mask=v_ok)


@triton.jit
def _middle_scores(
    q_ptr, cache_ptr, bt_ptr, out_ptr,
    num_rows, num_keys, n_global,
    q_s0, q_s1, q_s2, c_s0, c_s1, c_s2, c_s3, bt_s0, o_s0, o_s1, o_s2,
    scale,
    HEAD_DIM: tl.constexpr, D_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Top-k exact mode: out[h, m, i] = scale * <q[h, m], raw key n_global + i of kv head h>
    for a tile of rows and middle keys (queries already rotated to the scoring distance)."""
    # key tiles on grid axis 0 (up to 2^31 - 1 launches; axes 1 and 2 stop at 65535)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_P2)
    m_ok = offs_m < num_rows
    n_ok = offs_n < num_keys
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + h.to(tl.int64) * q_s0 + offs_m[:, None].to(tl.int64) * q_s1 + offs_d[None, :] * q_s2,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    j = n_global + offs_n
    blk = tl.load(bt_ptr + (j // BLOCK_SIZE).to(tl.int64) * bt_s0, mask=n_ok, other=0).to(tl.int64)
    base = cache_ptr + blk * c_s0 + h.to(tl.int64) * c_s1 + (j % BLOCK_SIZE).to(tl.int64) * c_s2
    k = tl.load(base[:, None] + offs_d[None, :] * c_s3, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=DOT_PREC) * scale
    tl.store(out_ptr + h.to(tl.int64) * o_s0 + offs_m[:, None].to(tl.int64) * o_s1 + offs_n[None, :] * o_s2, s,
             mask=m_ok[:, None] & n_ok[None, :])


def middle_scores_triton(q_mid: torch.Tensor, kv_cache: torch.Tensor, block_row: torch.Tensor, n_global: int,
                         num_keys: int, scale: float, *, block_m: int = 16, block_n: int = 64) -> torch.Tensor:
    """Top-k exact mode on the raw-key cache: logits [Hkv, M, num_keys] (float32) of rows
    q_mid [Hkv, M, D] (float32, rotated to the scoring distance, one sequence's rows per KV
    head) against its middle keys n_global .. n_global + num_keys - 1, read in place from
    the paged cache (no gathered copy). block_row: the sequence's block-table row."""
    hkv, rows, dh = q_mid.shape
    out = torch.empty((hkv, rows, num_keys), dtype=torch.float32, device=q_mid.device)
    if rows == 0 or num_keys == 0:
        return out
    q_mid = q_mid.to(torch.float32)
    block_row = block_row.to(device=q_mid.device)
    grid = (triton.cdiv(num_keys, block_n), hkv, triton.cdiv(rows, block_m))
    _middle_scores[grid](
        q_mid, kv_cache, block_row, out,
        rows, num_keys, n_global,
        q_mid.stride(0), q_mid.stride(1), q_mid.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_row.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        float(scale),
        HEAD_DIM=dh, D_P2=_pow2(dh), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=kv_cache.shape[2],
        DOT_PREC="ieee", num_warps=4,
    )
    return out


def _as_int32(x, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.int32).contiguous()
    return torch.tensor(list(x), dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class LaunchPlan:
    """Tile sizes and launch shape of one call (see `plan_launch`)."""

    block_m: int
    rows: int
    block_n: int
    num_splits: int
    num_warps: int
    grid0: int


def plan_launch(num_tokens: int, num_seqs: int, hq: int, hkv: int, head_size: int, dtype: torch.dtype,
                pattern: LambdaPattern, *, num_sms: int | None = None, block_m: int | None = None,
                block_n: int | None = None, num_splits: int | None = None,
                num_warps: int | None = None) -> LaunchPlan:
    """Heuristic tiles. Batches of single-token queries (decode) get one query per
    tile and, when (sequence, KV head) programs are fewer than the SMs, KV splits.
    The defaults were sized so that their sm_90 builds do not spill registers
    (`benchmarks/bench_triton_kernels.py --compile-only` checks this offline)."""
    group_p2 = triton.next_power_of_2(hq // hkv)
    decode_only = num_tokens <= num_seqs
    wide = dtype == torch.float32  # fp32 tiles take twice the registers
    if block_m is None:
        target_rows = 16 if wide else (64 if head_size <= 128 else 32)
        block_m = 1 if decode_only else max(1, target_rows // group_p2)
    rows = max(16, block_m * group_p2)
    if block_n is None:
        if wide:
            block_n = 16
        elif head_size <= 128:
            block_n = 64 if decode_only else 32
        else:
            block_n = 32 if decode_only else 16
    block_n = _pow2(block_n)
    if num_splits is None:
        num_splits = 1
        programs = num_seqs * hkv
        if decode_only and num_sms and 0 < programs < 4 * num_sms:
            # aim at >= 4 programs per SM, each split keeping >= 4 key tiles
            n_local = pattern.n_local
            max_tiles = -(-pattern.n_global // block_n) + -(-(n_local + block_m) // block_n)
            num_splits = max(1, min(16, max_tiles // 4, -(-4 * num_sms // programs)))
    if num_warps is None:
        num_warps = 4 if rows * max(block_n, _pow2(head_size)) <= 16 * 64 else 8
    # tile slots: sequence s starts at qsl[s] // BLOCK_M (+ s when a tile holds more
    # than one query, to absorb partial tiles)
    grid0 = num_tokens if block_m == 1 else num_tokens // block_m + num_seqs
    return LaunchPlan(block_m, rows, block_n, max(1, int(num_splits)), num_warps, grid0)


def lambda_paged_attention_triton(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc,
    seq_lens,
    *,
    pattern: LambdaPattern,
    style: RopeStyle,
    inv_freq: torch.Tensor,
    scale: float,
    query_scale=None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Λ attention for a batch of sequences (prefill chunks and decodes mixed).

    query: [T, Hq, D] raw queries; kv_cache: [num_blocks, Hkv, B, 2*D] (raw K then V
    on the last dim, any strides); block_table: [num_seqs, max_blocks] int;
    query_start_loc: [num_seqs+1], seq_lens: [num_seqs] (int32 device tensors or
    lists); inv_freq: [R/2] or [num_seqs, R/2]; query_scale: None or [num_seqs].
    Returns `out` ([T, Hq, D], query dtype unless `out` given). block_m/block_n/
    num_splits/num_warps are tuning knobs (heuristic defaults); results do not
    depend on them beyond rounding. lse: float32 [T, Hq] contiguous, given to also get
    each row's log-sum-exp of its Λ logits (so a top-k middle partial can be merged in).
    """
    num_tokens, hq, dh = query.shape
    nb, hkv, bs, two_d = kv_cache.shape
    if two_d != 2 * dh:
        raise ValueError(f"kv_cache last dim {two_d} != 2 * head_size {2 * dh}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads not a multiple of {hkv} KV heads")
    if style.rotary_dim > dh:
        raise ValueError(f"rotary_dim {style.rotary_dim} > head size {dh}")
    device = query.device
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=device)
    if query.dtype != kv_cache.dtype:
        query = query.to(kv_cache.dtype)
    num_seqs = block_table.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    qsl = _as_int32(query_start_loc, device)
    sl = _as_int32(seq_lens, device)
    if block_table.dtype not in (torch.int32, torch.int64):
        block_table = block_table.to(torch.int32)
    block_table = block_table.to(device)

    half = style.rotary_dim // 2
    freq = inv_freq.to(device=device, dtype=torch.float32)
    if freq.dim() == 1:
        freq = freq.contiguous()
        freq_s0 = 0
    else:
        freq = freq.contiguous()
        freq_s0 = freq.stride(0)
    if freq.shape[-1] != half:
        raise ValueError(f"inv_freq has {freq.shape[-1]} entries, rotary_dim/2 = {half}")
    if query_scale is not None:
        qscale = torch.as_tensor(query_scale, dtype=torch.float32).to(device).contiguous()
    else:
        qscale = freq  # unused placeholder pointer

    group = hq // hkv
    plan = plan_launch(
        num_tokens, num_seqs, hq, hkv, dh, kv_cache.dtype, pattern,
        num_sms=_num_sms(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda" else None,
        block_m=block_m, block_n=block_n, num_splits=num_splits, num_warps=num_warps,
    )
    num_splits = plan.num_splits
    if lse is not None and not (lse.dtype == torch.float32 and lse.is_contiguous()
                                and tuple(lse.shape) == (num_tokens, hq) and lse.device == device):
        raise ValueError(f"lse must be a contiguous float32 [{num_tokens}, {hq}] tensor on {device}")
    pass_dim = dh - style.rotary_dim
    wide = kv_cache.dtype == torch.float32

    if num_splits > 1:
        part_acc = torch.empty((num_tokens, hq, num_splits, dh), dtype=torch.float32, device=device)
        part_ml = torch.empty((num_tokens, hq, num_splits, 2), dtype=torch.float32, device=device)
    else:
        part_acc = part_ml = out  # unused

    grid = (plan.grid0, hkv, num_splits)
    _lambda_attn_fwd[grid](
        query, kv_cache, block_table, qsl, sl, freq, qscale,
        out, part_acc, part_ml, out if lse is None else lse,
        num_seqs,
        query.stride(0), query.stride(1), query.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_table.stride(0), block_table.stride(1),
        freq_s0,
        out.stride(0), out.stride(1), out.stride(2),
        pattern.n_global, pattern.n_local, float(pattern.distance_limit),
        float(scale) * _LOG2E,
        GROUP=group, GROUP_P2=triton.next_power_of_2(group), BLOCK_M=plan.block_m, ROWS=plan.rows,
        BLOCK_N=plan.block_n, BLOCK_SIZE=bs,
        HEAD_DIM=dh, ROT_HALF=half, HALF_P2=_pow2(half),
        PASS_DIM=pass_dim, PASS_P2=_pow2(pass_dim) if pass_dim > 0 else 0, DV_P2=_pow2(dh),
        NEOX=bool(style.neox), HAS_QSCALE=query_scale is not None, NUM_SPLITS=num_splits,
        DOT_PREC="ieee" if wide else None, DOT_UPCAST=device.type != "cuda" and kv_cache.dtype == torch.bfloat16,
        HAS_LSE=lse is not None, num_warps=plan.num_warps,
    )
    if num_splits > 1:
        _merge_splits[(num_tokens, hq)](
            part_acc, part_ml, out, out.stride(0), out.stride(1), out.stride(2), out if lse is None else lse,
            NUM_SPLITS=num_splits, S_P2=triton.next_power_of_2(num_splits), HEAD_DIM=dh, DV_P2=_pow2(dh),
            HAS_LSE=lse is not None, num_warps=4,
        )
    return out


__all__ = ["lambda_paged_attention_triton", "middle_scores_triton"]
