"""Top-k middle attention (issue 15, exact mode): the dense reference against the rule
written pair by pair, and both torch paths (raw keys; keys at absolute positions, as the
CPU fast path stores them) against the dense float64 reference. No vLLM needed."""

from __future__ import annotations

import itertools

import pytest
import torch

from lminf_kernels.absolute_cpu import lambda_attention_absolute
from lminf_kernels.naive import lambda_attention_dense, lambda_paged_attention_naive
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.raw_torch import lambda_paged_attention
from lminf_kernels.rope import RopeStyle
from lminf_kernels.topk import TopKRows, filled_blocks

from helpers.kernel_cases import (CASES, absolute_queries, build_paged, case_inputs, make_inv_freq,
                                  poison_unread_blocks, rel_err, to_absolute_layout)
from test_kernels_torch import formula_attention, rotation_matrix


def formula_top_k(q, k, v, q_pos, pattern, style, inv_freq, scale, top_k, distance, rows):
    """LM-Infinite with top-k written out per (row, head): the Λ keys at their distances,
    plus the `top_k` middle keys whose logit at `distance` is largest (Python sort)."""
    group = q.shape[1] // k.shape[1]

    def middle(t, h, p):
        keys = range(pattern.n_global, p - pattern.n_local + 1)
        if not rows[t] or len(keys) < top_k:
            return None
        rq = rotation_matrix(distance, inv_freq, q.shape[-1], style) @ q[t, h].double()
        return distance, set(sorted(keys, key=lambda j: -float(torch.dot(rq, k[j, h // group].double())))[:top_k])

    return formula_attention(q, k, v, q_pos, pattern, style, inv_freq, scale, middle)


@pytest.mark.parametrize(
    "neox,rotary_dim,hq,hkv,pattern,top_k,distance",
    [
        (True, 8, 4, 2, LambdaPattern(2, 4, 4), 3, 2),  # GQA
        (False, 8, 2, 2, LambdaPattern(3, 5, 7), 1, 5),
        (True, 4, 3, 1, LambdaPattern(0, 3, 3), 2, 1),  # partial rotary, MQA, no global
        (True, 8, 2, 1, LambdaPattern(2, 4, 4), 50, 2),  # k larger than any middle: plain Λ
    ],
)
def test_dense_reference_matches_the_rule(neox, rotary_dim, hq, hkv, pattern, top_k, distance, seed):
    s, dh = 17, 8
    style = RopeStyle(rotary_dim, neox)
    q, k, v = torch.randn(s, hq, dh), torch.randn(s, hkv, dh), torch.randn(s, hkv, dh)
    q_pos, inv = torch.arange(s), make_inv_freq(rotary_dim)
    rows = torch.arange(s) % 3 != 1  # some rows without top-k
    got = lambda_attention_dense(q, k, v, q_pos, pattern=pattern, style=style, inv_freq=inv, scale=0.4,
                                 top_k=(top_k, distance), top_k_rows=rows)
    want = formula_top_k(q, k, v, q_pos, pattern, style, inv, 0.4, top_k, distance, rows)
    assert rel_err(got, want) < 1e-12
    plain = lambda_attention_dense(q, k, v, q_pos, pattern=pattern, style=style, inv_freq=inv, scale=0.4)
    if top_k < 50:  # the rows that use top-k differ from Λ
        assert rel_err(got, plain) > 1e-3
    else:
        assert rel_err(got, plain) < 1e-12


def first_positions(seq_lens, q_lens, rows: str) -> list[int]:
    """"all": every row; "last": the step's last row of each sequence (as a last prompt
    row or a decode); "mid": from the middle of each sequence's rows (a tile of mixed rows)."""
    if rows == "all":
        return [0] * len(seq_lens)
    if rows == "last":
        return [s - 1 for s in seq_lens]
    return [s - max(1, n // 2) for s, n in zip(seq_lens, q_lens)]


TOP_K_CASES = [
    # (case index in CASES or an own case, k, distance)
    (0, 2, 5), (1, 3, 8), (3, 1, 30), (4, 5, 16), (6, 2, 10), (7, 4, 12), (8, 3, 20), (9, 1, 5),
]


def _case(index):
    return CASES[index]


def _poison_unread_by_plain_rows(cache, table, seq_lens, q_lens, pattern, top_k: TopKRows):
    """Poison what Λ does not read, but only in sequences none of whose rows uses top-k
    (the others read their middle)."""
    plain = [0 if top_k.uses(i, s - 1, pattern) else n for i, (s, n) in enumerate(zip(seq_lens, q_lens))]
    poisoned = poison_unread_blocks(cache, table, seq_lens, plain, pattern)
    for i, n in enumerate(plain):
        if n == 0 and q_lens[i]:  # restore the unwritten tail poisoning for top-k sequences too
            s, bs = seq_lens[i], cache.shape[2]
            if s % bs:
                poisoned[table[i, (s - 1) // bs], :, s % bs:] = float("nan")
    return poisoned


@pytest.mark.parametrize("rows", ["all", "last", "mid"])
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("index,k,distance", TOP_K_CASES, ids=[str(c[0]) for c in TOP_K_CASES])
def test_raw_torch_top_k_matches_dense(index, k, distance, neox, rows, seed):
    case = _case(index)
    seq_lens, q_lens, pattern, _, tile = case
    cache, table, qsl, query, kw = case_inputs(case, neox)
    rule = TopKRows(k, distance, first_positions(seq_lens, q_lens, rows))
    want = lambda_paged_attention_naive(query, cache, table, qsl, seq_lens, top_k=(k, distance, rule.first_pos), **kw)
    poisoned = _poison_unread_by_plain_rows(cache, table, seq_lens, q_lens, pattern, rule)
    got = lambda_paged_attention(query, poisoned, table, qsl, seq_lens, query_tile=tile, top_k=rule, **kw)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("use_extension", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("rows", ["all", "last", "mid"])
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("index,k,distance", TOP_K_CASES, ids=[str(c[0]) for c in TOP_K_CASES])
def test_absolute_top_k_matches_dense(index, k, distance, neox, rows, use_extension, seed):
    """Keys at absolute positions (the CPU fast path), rows with and without top-k in one
    call: on the C++ kernels (Λ, then the middle scored in the cache's own layout) and on the
    torch code (middle keys rotated back)."""
    case = _case(index)
    seq_lens, q_lens, pattern, _, tile = case
    raw, table, qsl, query, kw = case_inputs(case, neox)
    style, inv = kw["style"], kw["inv_freq"]
    rule = TopKRows(k, distance, first_positions(seq_lens, q_lens, rows))
    want = lambda_paged_attention_naive(query, raw, table, qsl, seq_lens, top_k=(k, distance, rule.first_pos), **kw)
    cache = to_absolute_layout(raw, table, seq_lens, inv, style)
    got = lambda_attention_absolute(absolute_queries(query, qsl, seq_lens, inv, style), cache, table, qsl, seq_lens,
                                    query_tile=tile, top_k=rule, use_extension=use_extension, **kw)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5


def test_top_k_changes_only_rows_that_use_it(seed):
    """Rows before first_pos, and sequences whose middle is shorter than k, are Λ bit for bit."""
    seq_lens, q_lens = [300, 40, 200], [64, 1, 1]
    pattern = LambdaPattern(4, 32, 32)
    cache, table = build_paged(seq_lens, 2, 16, 16)
    qsl = [0, 64, 65, 66]
    query = torch.randn(66, 6, 16)
    kw = dict(pattern=pattern, style=RopeStyle(16, True), inv_freq=make_inv_freq(16), scale=0.25)
    rule = TopKRows(8, 16, [280, 0, 10**9])  # seq 1's middle holds 5 keys < 8; seq 2 has no top-k row
    plain = lambda_paged_attention(query, cache, table, qsl, seq_lens, **kw)
    got = lambda_paged_attention(query, cache, table, qsl, seq_lens, top_k=rule, **kw)
    changed = (got - plain).abs().flatten(1).amax(1) > 0
    want_changed = torch.zeros(66, dtype=torch.bool)
    want_changed[280 - 236:64] = True  # positions 280..299 of sequence 0
    assert torch.equal(changed, want_changed)


def test_gqa_selects_per_query_head(seed):
    """Query heads sharing one kv head pick their own middle keys: each query aligned (at
    the scoring distance) with a different large middle key attends almost only to it."""
    s, dh = 200, 16
    pattern = LambdaPattern(2, 16, 16)
    style = RopeStyle(dh, True)
    inv = make_inv_freq(dh)
    k = torch.randn(s, 1, dh) * 0.1
    v = torch.randn(s, 1, dh)
    q = torch.zeros(1, 2, dh)
    # head 0 aligned with key 50 seen at distance 8, head 1 with key 120 (logit ~32, others ~1)
    for h, j in ((0, 50), (1, 120)):
        k[j, 0] = torch.randn(dh)
        q[0, h] = (rotation_matrix(8, inv.double(), dh, style).T @ k[j, 0].double() * 2).float()
    out = lambda_attention_dense(q, k, v, torch.tensor([s - 1]), pattern=pattern, style=style, inv_freq=inv,
                                 scale=1.0, top_k=(1, 8))
    assert rel_err(out[0, 0], v[50, 0]) < 1e-3 and rel_err(out[0, 1], v[120, 0]) < 1e-3


# -- block mode ----------------------------------------------------------------------

def formula_top_k_blocks(q, k, v, q_pos, pattern, style, inv_freq, scale, top_k, distance, block_size):
    """Block mode written out per (row, head): each middle block's bound from explicit
    rotation matrices and Python max/min loops, the k best blocks' middle keys at `distance`."""
    dh = q.shape[-1]
    group = q.shape[1] // k.shape[1]

    def middle(t, h, p):
        keys = range(pattern.n_global, p - pattern.n_local + 1)
        blocks = sorted({j // block_size for j in keys})
        if len(blocks) < top_k:
            return None
        rq = rotation_matrix(distance, inv_freq, dh, style) @ q[t, h].double()
        bound = {}
        for b in blocks:
            rows = [k[j, h // group].double() for j in range(b * block_size, (b + 1) * block_size)]
            bound[b] = sum(max(float(rq[c]) * max(float(r[c]) for r in rows),
                               float(rq[c]) * min(float(r[c]) for r in rows)) for c in range(dh))
        best = sorted(blocks, key=lambda b: -bound[b])[:top_k]
        return distance, {j for j in keys if j // block_size in best}

    return formula_attention(q, k, v, q_pos, pattern, style, inv_freq, scale, middle)


def test_dense_block_mode_matches_the_rule(seed):
    s, dh, bs = 60, 8, 4
    pattern = LambdaPattern(3, 8, 8)
    style = RopeStyle(8, True)
    q, k, v = torch.randn(s, 4, dh), torch.randn(s, 2, dh), torch.randn(s, 2, dh)
    inv = make_inv_freq(8)
    q_pos = torch.arange(40, s)
    got = lambda_attention_dense(q[40:], k, v, q_pos, pattern=pattern, style=style, inv_freq=inv, scale=0.4,
                                 top_k=(2, 5), top_k_block_size=bs)
    want = formula_top_k_blocks(q[40:], k, v, q_pos, pattern, style, inv, 0.4, 2, 5, bs)
    assert rel_err(got, want) < 1e-12


BLOCK_CASES = [
    # (seq_lens, q_lens, pattern, block_size, query_tile, k blocks, distance)
    ([300], [300], LambdaPattern(4, 32, 32), 16, 64, 2, 16),  # every row of a prefill
    ([400, 200, 90, 50], [1, 64, 1, 3], LambdaPattern(5, 32, 20), 16, 16, 3, 10),  # mixed, G not a block multiple
    ([600], [1], LambdaPattern(20, 64, 64), 32, 256, 4, 32),  # a decode
    ([130], [2], LambdaPattern(0, 64, 64), 32, 256, 2, 8),  # exactly 2 middle blocks, no globals
]


def block_inputs(case, neox):
    return case_inputs(case[:5], neox)  # the extra (k blocks, distance) are the test's


def every_full_block(table, seq_lens, bs):
    """What earlier steps filled: every full block of each sequence (ids, first positions, sequence)."""
    return filled_blocks(table, [0, *itertools.accumulate(seq_lens)], seq_lens, bs)


@pytest.mark.parametrize("layout", ["raw", "absolute_cpp", "absolute_torch"])
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=[str(i) for i in range(len(BLOCK_CASES))])
def test_block_mode_matches_dense(case, neox, layout, seed):
    """Raw keys (torch), and keys at absolute positions on the C++ ops or the torch code."""
    from lminf_kernels import absolute_cpu, raw_torch

    seq_lens, q_lens, pattern, bs, tile, kb, distance = case
    cache, table, qsl, query, kw = block_inputs(case, neox)
    style, inv = kw["style"], kw["inv_freq"]
    rule = TopKRows(kb, distance, [0] * len(seq_lens), blocks=True, block_size=bs)
    want = lambda_paged_attention_naive(query, cache, table, qsl, seq_lens, top_k=(kb, distance, rule.first_pos),
                                        top_k_block_size=bs, **kw)
    filled = every_full_block(table, seq_lens, bs)
    summary = torch.full((cache.shape[0], cache.shape[1], 2, cache.shape[-1] // 2), float("nan"))
    if layout == "raw":
        raw_torch.update_block_summaries(cache, summary, filled)
        got = lambda_paged_attention(query, cache, table, qsl, seq_lens, query_tile=tile, top_k=rule,
                                     block_summary=summary, **kw)
    else:
        abs_cache = to_absolute_layout(cache, table, seq_lens, inv, style)
        absolute_cpu.update_block_summaries(abs_cache, summary, filled, style, inv)
        got = lambda_attention_absolute(absolute_queries(query, qsl, seq_lens, inv, style), abs_cache, table, qsl,
                                        seq_lens, query_tile=tile, top_k=rule, block_summary=summary,
                                        use_extension=layout == "absolute_cpp", **kw)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5


def test_block_mode_with_every_middle_block_equals_exact_mode_with_every_middle_key(seed):
    seq_lens, q_lens, pattern, bs = [200], [1], LambdaPattern(8, 64, 64), 16
    cache, table, qsl, query, kw = block_inputs((seq_lens, q_lens, pattern, bs, 256, 0, 0), True)
    summary = torch.zeros(cache.shape[0], cache.shape[1], 2, cache.shape[-1] // 2)
    from lminf_kernels import raw_torch

    raw_torch.update_block_summaries(cache, summary, every_full_block(table, seq_lens, bs))
    p = 199
    n_mid, n_blocks = p - 64 + 1 - 8, (p - 64) // bs - 8 // bs + 1
    blocks = lambda_paged_attention(query, cache, table, qsl, seq_lens, block_summary=summary,
                                    top_k=TopKRows(n_blocks, 20, [0], blocks=True, block_size=bs), **kw)
    exact = lambda_paged_attention(query, cache, table, qsl, seq_lens, top_k=TopKRows(n_mid, 20, [0]), **kw)
    assert rel_err(blocks, exact) < 1e-6


def test_filled_blocks_are_the_blocks_whose_last_slot_this_step_writes():
    table = torch.arange(40).view(4, 10)
    ids, first, seq = filled_blocks(table, [0, 1, 41, 41, 44], [16, 57, 5, 48], 16)
    # seq 0: token 15 fills block 0; seq 1: tokens 17..56 fill blocks 1, 2; seq 2: nothing; seq 3: 45..47 fill block 2
    assert ids.tolist() == [0, 11, 12, 32] and first.tolist() == [0, 16, 32, 32] and seq.tolist() == [0, 1, 1, 3]
