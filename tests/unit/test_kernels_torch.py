"""Λ attention math: the naive reference against the formula, the torch paged path
against the naive reference. No vLLM needed."""

from __future__ import annotations

import math

import pytest
import torch

from lminf_kernels.raw_torch import lambda_paged_attention
from lminf_kernels.naive import lambda_attention_dense, lambda_paged_attention_naive
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle

from helpers.kernel_cases import CASES, build_paged, case_inputs, make_inv_freq, poison_unread_blocks, rel_err


def rotation_matrix(delta: int, inv_freq: torch.Tensor, head: int, style: RopeStyle) -> torch.Tensor:
    """Explicit D x D rotation by `delta` (identity on channels past rotary_dim)."""
    r = style.rotary_dim
    m = torch.eye(head, dtype=torch.float64)
    for i in range(r // 2):
        ang = delta * inv_freq[i].item()
        a, b = (i, i + r // 2) if style.neox else (2 * i, 2 * i + 1)
        m[a, a], m[a, b] = math.cos(ang), -math.sin(ang)
        m[b, a], m[b, b] = math.sin(ang), math.cos(ang)
    return m


def formula_attention(q, k, v, q_pos, pattern, style, inv_freq, scale, middle=None):
    """LM-Infinite written out pair by pair with explicit rotation matrices. middle(t, h, p):
    for a row with top-k middle attention, (distance, the middle keys it also sees at that
    distance); None (or no `middle`): plain Λ."""
    tq, hq, dh = q.shape
    group = hq // k.shape[1]
    out = torch.zeros(tq, hq, v.shape[-1], dtype=torch.float64)
    for t in range(tq):
        p = int(q_pos[t])
        for h in range(hq):
            extra = middle(t, h, p) if middle is not None else None
            mid_distance, mid_keys = extra if extra is not None else (None, ())
            logits, vals = [], []
            for j in range(p + 1):
                if p - pattern.n_local < j:
                    delta = p - j
                elif j < pattern.n_global:
                    delta = pattern.distance_limit
                elif j in mid_keys:
                    delta = mid_distance
                else:
                    continue
                rq = rotation_matrix(delta, inv_freq, dh, style) @ q[t, h].double()
                logits.append(scale * torch.dot(rq, k[j, h // group].double()))
                vals.append(v[j, h // group].double())
            w = torch.softmax(torch.stack(logits), 0)
            out[t, h] = (w[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize(
    "neox,rotary_dim,hq,hkv,pattern",
    [
        (True, 8, 4, 2, LambdaPattern(2, 4, 4)),
        (False, 8, 2, 2, LambdaPattern(3, 5, 7)),
        (True, 4, 3, 1, LambdaPattern(0, 3, 3)),  # partial rotary, MQA, no global
        (False, 6, 4, 4, LambdaPattern(20, 4, 2)),  # G larger than the sequence
    ],
)
def test_naive_matches_formula(neox, rotary_dim, hq, hkv, pattern, seed):
    s, dh = 13, 8
    style = RopeStyle(rotary_dim, neox)
    q = torch.randn(s, hq, dh)
    k, v = torch.randn(s, hkv, dh), torch.randn(s, hkv, dh)
    q_pos = torch.arange(s)
    inv = make_inv_freq(rotary_dim)
    got = lambda_attention_dense(q, k, v, q_pos, pattern=pattern, style=style, inv_freq=inv, scale=0.4)
    want = formula_attention(q, k, v, q_pos, pattern, style, inv, 0.4)
    assert rel_err(got, want) < 1e-12


def test_naive_full_window_is_causal_rope(seed):
    """With n_local >= length, Λ attention is ordinary causal attention with RoPE
    applied at absolute positions (the stock formulation)."""
    s, h, dh = 20, 2, 16
    style = RopeStyle(dh, True)
    inv = make_inv_freq(dh).double()
    q, k, v = (torch.randn(s, h, dh, dtype=torch.float64) for _ in range(3))
    got = lambda_attention_dense(q, k, v, torch.arange(s), pattern=LambdaPattern(4, s, 3), style=style,
                                 inv_freq=inv, scale=0.25)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv
    c, sn = ang.cos()[:, None], ang.sin()[:, None]

    def rot(x):
        x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
        return torch.cat((x1 * c - x2 * sn, x2 * c + x1 * sn), -1)

    logits = torch.einsum("thd,shd->hts", rot(q), rot(k)) * 0.25
    logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("hts,shd->thd", logits.softmax(-1), v)
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_fast_matches_naive(case, neox, seed):
    seq_lens, q_lens, pattern, _, tile = case
    cache, table, qsl, query, kw = case_inputs(case, neox)
    want = lambda_paged_attention_naive(query, cache, table, qsl, seq_lens, **kw)
    poisoned = poison_unread_blocks(cache, table, seq_lens, q_lens, pattern)
    got = lambda_paged_attention(query, poisoned, table, qsl, seq_lens, query_tile=tile, **kw)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5


def test_per_sequence_frequencies_and_query_scale(seed):
    """CLEX hook: each sequence its own frequency table and query multiplier."""
    seq_lens, q_lens = [40, 70, 9], [40, 1, 3]
    hq, hkv, dh = 4, 2, 16
    style = RopeStyle(dh, True)
    pattern = LambdaPattern(2, 16, 16)
    cache, table = build_paged(seq_lens, hkv, dh, 32)
    qsl = [0, 40, 41, 44]
    query = torch.randn(44, hq, dh)
    inv = torch.stack([make_inv_freq(dh, base) for base in (1e4, 3e4, 5e5)])
    scales = [1.0, 1.3, 0.9]
    kw = dict(pattern=pattern, style=style, inv_freq=inv, scale=0.3, query_scale=scales)
    want = lambda_paged_attention_naive(query, cache, table, qsl, seq_lens, **kw)
    got = lambda_paged_attention(query, cache, table, qsl, seq_lens, **kw)
    assert rel_err(got, want) < 1e-5
    # and each sequence alone gives the same rows
    for i in range(3):
        alone = lambda_paged_attention(
            query[qsl[i] : qsl[i + 1]], cache, table[i : i + 1], [0, q_lens[i]], [seq_lens[i]],
            pattern=pattern, style=style, inv_freq=inv[i], scale=0.3, query_scale=[scales[i]],
        )
        assert torch.equal(alone, got[qsl[i] : qsl[i + 1]])


def test_bfloat16_inputs(seed):
    seq_lens, q_lens = [90, 33], [30, 1]
    cache, table = build_paged(seq_lens, 2, 32, 32, dtype=torch.bfloat16)
    query = torch.randn(31, 4, 32).to(torch.bfloat16)
    kw = dict(pattern=LambdaPattern(4, 24, 24), style=RopeStyle(32, True), inv_freq=make_inv_freq(32), scale=32**-0.5)
    want = lambda_paged_attention_naive(query, cache, table, [0, 30, 31], seq_lens, **kw)
    got = lambda_paged_attention(query, cache, table, [0, 30, 31], seq_lens, **kw)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) < 1e-2


def test_positions_past_one_million_keep_precision(seed):
    """A decode/chunk at position ~1.2M reads only the global and window blocks and
    gives the same result as a short sequence with the same global and window
    tokens: rotation angles never depend on the absolute position."""
    bs, hkv, hq, dh = 32, 2, 4, 16
    pattern = LambdaPattern(10, 64, 64)
    style = RopeStyle(dh, True)
    long_len, q_len = 1_200_007, 5
    short_len = 3 * bs + 64 + q_len  # globals in block 0, a gap, then the window
    # long sequence: block table mostly pointing at a NaN block (freed, stale ids)
    nb_long = -(-long_len // bs)
    cache = torch.randn(64, hkv, bs, 2 * dh)
    cache[1] = float("nan")
    table_long = torch.ones(1, nb_long, dtype=torch.int32)
    table_long[0, 0] = 2  # global block
    lo = pattern.local_start(long_len - q_len)
    first_w, last_w = lo // bs, (long_len - 1) // bs
    win_ids = list(range(3, 3 + last_w - first_w + 1))
    table_long[0, first_w : last_w + 1] = torch.tensor(win_ids, dtype=torch.int32)
    # short sequence with the same global block and the same window tokens
    lo_s = pattern.local_start(short_len - q_len)
    # build the short cache token by token from the long one
    short = torch.zeros(8, hkv, bs, 2 * dh)
    table_short = torch.arange(8, dtype=torch.int32)[None] + 0
    short[0] = cache[2]
    for t in range(lo_s, short_len):
        src = lo + (t - lo_s)
        short[t // bs, :, t % bs] = cache[table_long[0, src // bs], :, src % bs]
    query = torch.randn(q_len, hq, dh)
    kw = dict(pattern=pattern, style=style, inv_freq=make_inv_freq(dh), scale=0.25)
    got_long = lambda_paged_attention(query, cache, table_long, [0, q_len], [long_len], **kw)
    got_short = lambda_paged_attention(query, short, table_short, [0, q_len], [short_len], **kw)
    want = lambda_paged_attention_naive(query, short, table_short, [0, q_len], [short_len], **kw)
    assert torch.isfinite(got_long).all()
    assert rel_err(got_long, want) < 1e-5
    assert rel_err(got_long, got_short) < 1e-6
