"""The CPU fast path (vLLM's CPU cache layout, keys rotated at absolute positions, C++
kernel) against the naive float64 reference. No vLLM engine needed."""

from __future__ import annotations


import pytest
import torch

from lminf_kernels import absolute_cpp, absolute_cpu
from lminf_kernels.absolute_cpu import lambda_attention_absolute
from lminf_kernels.paged import absolute_views, store_kv
from lminf_kernels.naive import lambda_paged_attention_naive
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle
from helpers.kernel_cases import (CASES, absolute_queries, build_paged, case_inputs, make_inv_freq,
                                  poison_unread_whole_blocks, rel_err, rotate64, to_absolute_layout)


@pytest.mark.parametrize("use_extension", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_absolute_path_matches_naive(case, neox, use_extension, seed):
    seq_lens, q_lens, pattern, _, tile = case
    raw, table, qsl, query, kw = case_inputs(case, neox)
    style, inv = kw["style"], kw["inv_freq"]
    want = lambda_paged_attention_naive(query, raw, table, qsl, seq_lens, **kw)
    cache = poison_unread_whole_blocks(to_absolute_layout(raw, table, seq_lens, inv, style), table, seq_lens, q_lens, pattern)
    got = lambda_attention_absolute(absolute_queries(query, qsl, seq_lens, inv, style), cache, table, qsl, seq_lens,
                                    query_tile=tile, use_extension=use_extension, **kw)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("whole_window_queries", [0, 1 << 30], ids=["whole-window", "split"])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_prefill_tiles(group, whole_window_queries, monkeypatch, seed):
    """Prefill chunks past the window through the C++ kernel's query tiles: a chunk that
    is not a multiple of the tile, starting mid-block, beside a decode and a second chunk
    that crosses the window edge; each key chunking of the kernel; GQA group 1, 3 and 8
    (tiles of 16, 5 and 2 queries)."""
    monkeypatch.setattr(absolute_cpu, "WHOLE_WINDOW_QUERIES", whole_window_queries)
    seq_lens, q_lens = [517, 300, 90], [203, 1, 77]
    pattern = LambdaPattern(7, 64, 50)
    hkv, dh, bs = 2, 32, 16
    hq = hkv * group
    style = RopeStyle(dh, True)
    raw, table = build_paged(seq_lens, hkv, dh, bs)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    query = torch.randn(qsl[-1], hq, dh)
    inv = make_inv_freq(dh)
    kw = dict(pattern=pattern, style=style, inv_freq=inv, scale=dh**-0.5)
    want = lambda_paged_attention_naive(query, raw, table, qsl, seq_lens, **kw)
    cache = poison_unread_whole_blocks(to_absolute_layout(raw, table, seq_lens, inv, style), table, seq_lens, q_lens,
                                       pattern)
    got = lambda_attention_absolute(absolute_queries(query, qsl, seq_lens, inv, style), cache, table, qsl, seq_lens,
                                    **kw)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_cache(dtype, tol, seed):
    """bf16/fp16 caches and queries; a long decode window split across kernel chunks,
    GQA 4:1, B=128, globals in the first block."""
    seq_lens, q_lens = [3000, 5000, 700], [1, 1, 40]
    pattern = LambdaPattern(10, 2048, 2048)
    hq, hkv, dh, bs = 8, 2, 64, 128
    style = RopeStyle(dh, True)
    raw, table = build_paged(seq_lens, hkv, dh, bs)
    qsl = [0, 1, 2, 42]
    query = torch.randn(42, hq, dh)
    inv = make_inv_freq(dh)
    kw = dict(pattern=pattern, style=style, inv_freq=inv, scale=dh**-0.5)
    want = lambda_paged_attention_naive(query, raw.to(dtype).float(), table, qsl, seq_lens, **kw)
    cache = to_absolute_layout(raw, table, seq_lens, inv, style).to(dtype)
    got = lambda_attention_absolute(absolute_queries(query, qsl, seq_lens, inv, style).to(dtype), cache, table, qsl,
                                    seq_lens, **kw)
    assert got.dtype == dtype
    assert rel_err(got, want) < tol


def test_positions_past_one_million(seed):
    """Decode and a short chunk at ~1.2M: float64 angles keep the result equal to the
    reference on the same global and window tokens; stale blocks are never read."""
    bs, hkv, hq, dh = 32, 2, 4, 32
    pattern = LambdaPattern(10, 64, 64)
    style = RopeStyle(dh, True)
    inv = make_inv_freq(dh)
    long_len = 1_200_007
    nb = -(-long_len // bs)
    g_blk, lo = 2, pattern.local_start(long_len - 5)
    win = list(range(lo // bs, nb))
    cache = torch.full((4 + len(win), hkv, bs, 2 * dh), float("nan"))
    table = torch.ones(1, nb, dtype=torch.int32)  # block 1: NaN, stands for freed blocks
    table[0, 0] = g_blk
    table[0, win[0]:] = torch.arange(4, 4 + len(win), dtype=torch.int32)
    k_raw, v = torch.randn(long_len - lo + 10, hkv, dh), torch.randn(long_len - lo + 10, hkv, dh)
    pos = torch.cat([torch.arange(10), torch.arange(lo, long_len)])
    slots = table[0][pos // bs].long() * bs + pos % bs
    store_kv(absolute_views(cache), slots, rotate64(k_raw[: len(pos)], pos, inv, style).float(), v[: len(pos)])
    query = torch.randn(5, hq, dh)
    # reference: the same global and window tokens in a short sequence (a gap of unread
    # zeros between them); Λ distances depend only on p - j and d, not on the position
    from lminf_kernels.naive import lambda_attention_dense
    gap = 50
    short_len = 10 + gap + (long_len - lo)
    dense_k = torch.zeros(short_len, hkv, dh)
    dense_v = torch.zeros(short_len, hkv, dh)
    short_pos = torch.cat([torch.arange(10), torch.arange(lo, long_len) - lo + 10 + gap])
    dense_k[short_pos], dense_v[short_pos] = k_raw[: len(pos)], v[: len(pos)]
    for q_len, use_ext in ((1, True), (1, False), (5, True), (5, False)):
        qpos = torch.arange(long_len - q_len, long_len)
        want = lambda_attention_dense(query[-q_len:], dense_k, dense_v, qpos - long_len + short_len, pattern=pattern,
                                      style=style, inv_freq=inv, scale=dh**-0.5)
        q_abs = rotate64(query[-q_len:], qpos, inv, style).float()
        got = lambda_attention_absolute(q_abs, cache, table, [0, q_len], [long_len], pattern=pattern, style=style,
                                        inv_freq=inv, scale=dh**-0.5, use_extension=use_ext)
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 1e-5, (q_len, use_ext)


def test_store_matches_vllm_cpu_layout(seed):
    """Our writer and vLLM's cpu_attn_reshape_and_cache (ISA "vec") fill the same bytes."""
    ops = pytest.importorskip("vllm._custom_ops")
    for dtype in (torch.float32, torch.bfloat16):
        nb, h, bs, dh = 6, 2, 32, 64
        ours, theirs = torch.zeros(nb, h, bs, 2 * dh, dtype=dtype), torch.zeros(nb, h, bs, 2 * dh, dtype=dtype)
        slots = torch.randperm(nb * bs)[:77]
        k, v = torch.randn(77, h, dh, dtype=dtype), torch.randn(77, h, dh, dtype=dtype)
        store_kv(absolute_views(ours), slots, k, v)
        kc, vc = theirs.view(nb, h, 2 * bs, dh).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, "vec", k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        assert torch.equal(ours, theirs)


def test_extension_builds_here():
    """On this project's machines (x86-64, g++) the C++ kernel must build: the torch
    fallback would hide a broken build behind slower decoding."""
    assert absolute_cpp.lambda_op() is not None


@pytest.mark.parametrize("use_extension", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("neox,rotary_dim,dtype", [(True, 64, torch.float32), (False, 64, torch.float32),
                                                   (True, 32, torch.bfloat16), (False, 48, torch.bfloat16)])
def test_block_rerotation_against_float64_and_the_per_position_reference(neox, rotary_dim, dtype, use_extension,
                                                                         seed):
    """CLEX's t step: keys at [lo, hi) of one sequence, rotated with f, become keys rotated with
    f + δ (a float64 rotation from the raw keys); every other slot (other positions of the same
    blocks, NaN where no token lives, other sequences, values) stays bit for bit. The per-position
    `rerotate_keys` gives the same bits."""
    style = RopeStyle(rotary_dim, neox)
    bs, dh, hkv = 32, 64, 2
    seq_lens = [300, 77]
    raw, table = build_paged(seq_lens, hkv, dh, bs)
    f = make_inv_freq(rotary_dim, 10000.0)
    delta = make_inv_freq(rotary_dim, 500.0) - f  # as CLEX: frequencies grow with t
    cache = to_absolute_layout(raw, table, seq_lens, f, style).to(dtype)
    for lo, hi in [(0, 300), (37, 261), (5, 6), (64, 96), (31, 33)]:
        fast, slow = cache.clone(), cache.clone()
        plan = absolute_cpu.Rerotation.plan(table[0], lo, hi, delta, bs)
        absolute_cpu.rerotate_blocks(fast, plan, style, use_extension=use_extension)
        absolute_cpu.rerotate_keys(slow, table[0], lo, hi, delta, style)
        assert torch.equal(fast.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           slow.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
        keys, values = absolute_views(fast)
        keys0, values0 = absolute_views(cache)
        pos = torch.arange(lo, hi)
        blk, off = table[0][pos // bs].long(), pos % bs
        want = rotate64(raw[blk, :, off, :dh], pos, f + delta, style)
        tol = 2e-6 if dtype == torch.float32 else 2e-2
        assert (keys[blk, :, off].double() - want).abs().max().item() <= tol * want.abs().max().item()
        changed = torch.zeros(keys.shape[:3], dtype=torch.bool)
        changed[blk, :, off] = True
        same = (keys == keys0) | (keys.isnan() & keys0.isnan())
        assert bool(same.all(-1)[~changed].all())
        assert torch.equal(values.nan_to_num(7.0), values0.nan_to_num(7.0))
    assert absolute_cpu.Rerotation.plan(table[0], 10, 10, delta, bs) is None


def _in_vllm_layout(vec_cache: torch.Tensor, isa: str) -> torch.Tensor:
    """The same keys and values written by vLLM's own cpu_attn_reshape_and_cache for `isa`
    (vLLM defines that layout; this test does not restate it)."""
    ops = pytest.importorskip("vllm._custom_ops")
    n, h, bs, d2 = vec_cache.shape
    keys, values = absolute_views(vec_cache)  # [n, H, B, D]
    out = torch.zeros_like(vec_cache)
    kc, vc = out.view(n, h, 2 * bs, d2 // 2).chunk(2, dim=2)
    k, v = keys.permute(0, 2, 1, 3).reshape(n * bs, h, -1), values.permute(0, 2, 1, 3).reshape(n * bs, h, -1)
    ops.cpu_attn_reshape_and_cache(k.contiguous(), v.contiguous(), kc, vc, torch.arange(n * bs), isa, k_scale=1.0,
                                   v_scale=1.0, kv_cache_dtype="auto")
    return out


@pytest.mark.parametrize("use_extension", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("neox,rotary_dim,dh", [(True, 64, 64), (False, 48, 64), (True, 32, 32)])
def test_block_rerotation_in_vllm_amx_layout(neox, rotary_dim, dh, use_extension, seed):
    """CLEX alone keeps vLLM's "amx" cache layout on AMX CPUs: the t step re-rotates keys in
    that layout to the same bits as the per-position reference does in the "vec" layout
    (both caches written by vLLM's own store op); values and other slots stay bit for bit."""
    style = RopeStyle(rotary_dim, neox)
    bs, hkv = 32, 2  # vLLM's amx layout: bf16, block size % 32 == 0
    seq_lens = [300, 77]
    raw, table = build_paged(seq_lens, hkv, dh, bs)
    f = make_inv_freq(rotary_dim, 10000.0)
    delta = make_inv_freq(rotary_dim, 500.0) - f
    cache = to_absolute_layout(raw, table, seq_lens, f, style).nan_to_num(0.0).to(torch.bfloat16)
    amx0 = _in_vllm_layout(cache, "amx")
    assert not torch.equal(amx0, _in_vllm_layout(cache, "vec"))  # the layouts differ: the test can tell
    for lo, hi in [(0, 300), (37, 261), (5, 6), (31, 33)]:
        want = cache.clone()
        absolute_cpu.rerotate_keys(want, table[0], lo, hi, delta, style)  # the reference, "vec" layout
        got = amx0.clone()
        plan = absolute_cpu.Rerotation.plan(table[0], lo, hi, delta, bs)
        absolute_cpu.rerotate_blocks(got, plan, style, use_extension=use_extension, key_layout="amx")
        assert torch.equal(got.view(torch.int16), _in_vllm_layout(want, "amx").view(torch.int16)), (lo, hi)
    with pytest.raises(ValueError, match="key_layout"):
        absolute_cpu.rerotate_blocks(amx0, plan, style, key_layout="vec16")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", [1, 12], ids=["decode", "chunk"])
def test_exact_top_k_ties_go_to_the_earliest_middle_keys(rows, threads, seed):
    """Every middle key zero, so every middle logit is exactly 0: the C++ exact mode must
    take the first k middle positions (the rule's tie order) whether one row scores in
    registers with each thread keeping its own k best (decode) or many rows go through the
    logit buffer (chunk), on one thread or two (the middle kv head's blocks split between them)."""
    if not absolute_cpp._library_loaded():
        pytest.skip("C++ kernel unavailable")
    from lminf_kernels.topk import TopKRows

    hq, hkv, dh, bs, k, seq_len = 6, 3, 32, 16, 5, 700  # 3 kv heads: two threads split one
    pattern = LambdaPattern(3, 64, 64)
    style, inv = RopeStyle(dh, True), make_inv_freq(dh)
    n_blocks = -(-seq_len // bs)
    cache = torch.zeros(n_blocks + 2, hkv, bs, 2 * dh, dtype=torch.bfloat16)
    table = torch.randperm(n_blocks + 2)[:n_blocks].to(torch.int32)
    values = torch.randn(seq_len, hkv, dh).to(torch.bfloat16)
    keys = torch.randn(seq_len, hkv, dh).to(torch.bfloat16)
    middle_end = seq_len - pattern.n_local  # the last row's middle ends here; earlier rows' sooner
    keys[pattern.n_global:middle_end + 1] = 0.0
    slots = table.long()[torch.arange(seq_len) // bs] * bs + torch.arange(seq_len) % bs
    store_kv(absolute_views(cache), slots, keys, values)
    query = torch.randn(rows, hq, dh)
    out = torch.zeros(rows, hq, dh)
    lse = torch.full((rows, hq), float("-inf"))
    rule = TopKRows(k, 32, [0])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert absolute_cpu._kernel_merge(query, cache, table, seq_len - rows, rule, 0, pattern, style, inv,
                                          dh**-0.5, out, lse, None)
    finally:
        torch.set_num_threads(old)
    first = values[pattern.n_global:pattern.n_global + k].float().mean(0)  # [Hkv, D]
    want = first.repeat_interleave(hq // hkv, 0).expand(rows, hq, dh)
    # Λ's part is absent (lse -inf), so the merged rows are the middle partial itself
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("blocks", [False, True], ids=["exact", "blocks"])
def test_middle_inputs_made_by_one_kv_group_serve_another(blocks):
    """vLLM gives each KV-cache group its own block table, and the step's middle inputs are
    made once and shared by the groups (`TopKRows.memo`): a second group, whose cache holds
    the same keys in other physical blocks, must get the same result from a memo hit (a memo
    that kept the first group's block row would read the wrong blocks), and its own result
    when its keys differ. Seed 3."""
    if not absolute_cpp._library_loaded():
        pytest.skip("C++ kernel unavailable")
    from lminf_kernels.topk import TopKRows

    torch.manual_seed(3)
    hq, hkv, dh, bs, seq_len = 6, 2, 64, 64, 1000
    pattern = LambdaPattern(4, 128, 128)
    style, inv = RopeStyle(dh, True), make_inv_freq(dh)
    n_blocks = -(-seq_len // bs)
    keys = torch.randn(seq_len, hkv, dh).to(torch.bfloat16)
    values = torch.randn(seq_len, hkv, dh).to(torch.bfloat16)

    def group(keys):
        cache = torch.zeros(n_blocks + 3, hkv, bs, 2 * dh, dtype=torch.bfloat16)
        table = torch.randperm(n_blocks + 3)[:n_blocks].to(torch.int32)
        slots = table.long()[torch.arange(seq_len) // bs] * bs + torch.arange(seq_len) % bs
        store_kv(absolute_views(cache), slots, keys, values)
        summary = torch.zeros(n_blocks + 3, hkv, 2, dh)
        full = seq_len // bs
        absolute_cpu.update_block_summaries(cache, summary, (table[:full].long(), torch.arange(full) * bs,
                                                             torch.zeros(full, dtype=torch.long)), style, inv)
        return cache, table, summary

    rule = TopKRows(2 if blocks else 5, 64, [0], blocks=blocks, block_size=bs if blocks else 0)
    query = torch.randn(1, hq, dh)

    def merged(cache, table, summary):
        out, lse = torch.zeros(1, hq, dh), torch.full((1, hq), float("-inf"))
        assert absolute_cpu._kernel_merge(query, cache, table, seq_len - 1, rule, 0, pattern, style, inv,
                                          dh**-0.5, out, lse, summary)
        return out, lse

    first = merged(*group(keys))
    second = merged(*group(keys))
    assert len(rule.memo) == 1  # the second group's call was a memo hit
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[0].abs().amin(dim=-1).gt(0).all()  # every head's middle was merged (Λ's part left out)
    other = keys.clone()
    other[pattern.n_global:seq_len - pattern.n_local] = torch.randn(seq_len - pattern.n_local - pattern.n_global, hkv,
                                                                     dh).to(torch.bfloat16)
    assert not torch.equal(merged(*group(other))[0], first[0])  # a hit still reads this group's blocks
