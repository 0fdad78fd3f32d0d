"""The Triton Λ-attention kernel against the naive reference.

Without CUDA the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernel module is imported) on CPU tensors at small shapes; with CUDA a
larger grid runs on the GPU.
"""

from __future__ import annotations

import itertools
import math
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
# The interpreter must be chosen before triton.language is first imported (its own
# @jit helpers, e.g. tl.zeros, are built then); too late if something imported it.
_TOO_LATE = "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

_SKIP = None
try:
    import triton
    import triton.language as tl

    import lminf_kernels.raw_triton as triton_lambda
except Exception as exc:  # pragma: no cover - depends on the environment
    _SKIP = f"triton unavailable: {type(exc).__name__}: {exc}"
if _SKIP is None and not ON_GPU and _TOO_LATE:
    _SKIP = ("no CUDA, and triton was imported before this module without TRITON_INTERPRET=1, so its "
             "interpreter cannot be used; run this file alone or with TRITON_INTERPRET=1")
if _SKIP:
    print(_SKIP, file=sys.stderr)

from helpers.kernel_cases import poison_unread_blocks
from lminf_kernels.naive import lambda_paged_attention_naive
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle

pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def inv_freq_for(rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


def make_batch(seq_lens, q_lens, hq, hkv, dh, block_size, dtype, gen):
    """Random queries and a paged cache with a shuffled block table (block 0 unused)."""
    nblocks = [-(-s // block_size) for s in seq_lens]
    total = sum(nblocks) + 1
    cache = torch.randn(total, hkv, block_size, 2 * dh, generator=gen).to(dtype)
    ids = (torch.randperm(total - 1, generator=gen) + 1).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(nblocks) + 1, dtype=torch.int32)  # spare column
    pos = 0
    for i, nb in enumerate(nblocks):
        table[i, :nb] = ids[pos : pos + nb]
        pos += nb
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    query = torch.randn(qsl[-1], hq, dh, generator=gen).to(dtype)
    return query, cache, table, qsl


def poison_unread(cache, table, seq_lens, q_lens, pattern):
    """Copy of `cache` with every block that no query of this step may read set to NaN."""
    return poison_unread_blocks(cache, table, seq_lens, q_lens, pattern, tails=False)


def run_case(seq_lens, q_lens, pattern, bs, hq, hkv, dh, rot, neox, dtype, seed, **knobs):
    gen = torch.Generator().manual_seed(seed)
    style = RopeStyle(rot, neox)
    query, cache, table, qsl = make_batch(seq_lens, q_lens, hq, hkv, dh, bs, dtype, gen)
    kw = dict(pattern=pattern, style=style, inv_freq=inv_freq_for(rot), scale=dh**-0.5)
    want = lambda_paged_attention_naive(query, cache, table, qsl, seq_lens, **kw)
    poisoned = poison_unread(cache, table, seq_lens, q_lens, pattern)
    got = triton_lambda.lambda_paged_attention_triton(
        query.to(DEVICE), poisoned.to(DEVICE), table.to(DEVICE),
        torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), **kw, **knobs,
    )
    assert got.dtype == dtype and got.shape == query.shape
    assert torch.isfinite(got).all()
    err = rel_err(got, want)
    assert err < TOL[dtype], f"rel err {err:.3g} >= {TOL[dtype]:.3g}"
    return got


P = LambdaPattern
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (name, seq_lens, q_lens, pattern, block_size, hq, hkv, dh, rotary_dim, neox, knobs)
CPU_CASES = [
    ("prefill_below_window", [12], [12], P(4, 32, 32), 16, 2, 2, 16, 16, True, {}),
    ("prefill_at_window_tiles", [32], [32], P(4, 32, 32), 16, 4, 2, 16, 16, False, dict(block_m=4, block_n=16)),
    ("prefill_far_partial_gqa4", [90], [90], P(5, 16, 20), 16, 8, 2, 16, 8, True, dict(block_n=16)),
    ("decode_one_past_mqa", [65], [1], P(4, 64, 64), 32, 4, 1, 16, 16, False, {}),
    ("decode_far_splits", [300], [1], P(10, 32, 32), 32, 4, 2, 16, 16, True, dict(block_n=16, num_splits=3)),
    ("length_one", [1, 2], [1, 1], P(4, 8, 8), 32, 2, 1, 16, 16, True, {}),
    ("decode_batch_with_empty_row", [40, 9, 70], [1, 0, 1], P(2, 16, 16), 16, 4, 2, 16, 16, False, {}),
    ("mixed_batch_gptj_partial", [96, 5, 130, 33, 64], [20, 5, 1, 1, 0], P(3, 16, 20), 32, 6, 3, 16, 12, False,
     dict(block_m=8, block_n=16)),
    ("block128_g_odd", [128, 129, 200], [128, 1, 1], P(17, 40, 33), 128, 4, 2, 16, 16, True, {}),
    ("global_past_seq", [50], [50], P(100, 10, 10), 16, 2, 2, 16, 16, False, dict(block_n=16)),
    ("no_global_chunk", [96, 7, 300], [0, 7, 64], P(0, 24, 24), 32, 2, 1, 16, 16, True, {}),
    ("causal_unbounded", [70], [70], P.causal(), 16, 2, 2, 16, 16, True, {}),
    ("chunked_prefill_block_edges", [200, 48], [48, 16], P(4, 32, 32), 16, 4, 4, 16, 16, False, dict(block_m=16)),
    ("wide_head_pass", [80], [3], P(6, 24, 12), 16, 4, 2, 48, 32, True, dict(num_splits=2)),
]
CPU_DTYPE_CASES = {  # the half-precision runs, on a subset
    F16: ["prefill_far_partial_gqa4", "decode_far_splits", "mixed_batch_gptj_partial"],
    BF16: ["prefill_at_window_tiles", "block128_g_odd", "chunked_prefill_block_edges", "decode_one_past_mqa"],
}


def _gpu_cases():
    """Larger shapes for a real GPU; each shape in two (style, dtype) combinations,
    cycling so that every dtype meets both styles (the naive reference on the CPU and
    one Triton build per combination bound the size of this grid)."""
    base = [  # name, seq_lens, q_lens, pattern, block_size, hq, hkv, dh, rotary_dim
        ("decode_window_4k", [5000, 4200, 1500, 4097], [1, 1, 1, 1], P(8, 4096, 4096), 16, 32, 8, 128, 128),
        ("decode_mqa_b128", [3000, 700, 129], [1, 1, 1], P(4, 512, 512), 128, 16, 1, 128, 64),
        ("prefill_chunked", [600, 200], [64, 200], P(10, 256, 256), 32, 8, 2, 128, 128),
        ("mixed", [2000, 60, 900, 4100, 33], [32, 60, 1, 1, 1], P(4, 512, 400), 64, 8, 2, 64, 32),
        ("causal_prefill", [256], [256], P.causal(), 16, 4, 4, 128, 128),
        ("head256", [700, 1200], [32, 1], P(4, 256, 256), 16, 4, 2, 256, 256),
        ("head80_partial", [600], [96], P(7, 128, 100), 32, 6, 2, 80, 40),
    ]
    combos = [(True, BF16), (False, F16), (True, F32), (False, BF16), (True, F16), (False, F32)]
    out = []
    for i, (name, *rest) in enumerate(base):
        for neox, dt in (combos[(2 * i) % 6], combos[(2 * i + 1) % 6]):
            tag = f"{name}-{'neox' if neox else 'gptj'}-{str(dt).split('.')[-1]}"
            out.append(pytest.param(*rest, neox, dt, {}, id=tag))
    return out


def _cpu_params():
    out = []
    by_name = {c[0]: c for c in CPU_CASES}
    for c in CPU_CASES:
        out.append(pytest.param(*c[1:10], F32, c[10], id=f"{c[0]}-fp32"))
    for dt, names in CPU_DTYPE_CASES.items():
        for n in names:
            c = by_name[n]
            out.append(pytest.param(*c[1:10], dt, c[10], id=f"{n}-{str(dt).split('.')[-1]}"))
    return out


@pytest.mark.parametrize(
    "seq_lens,q_lens,pattern,bs,hq,hkv,dh,rot,neox,dtype,knobs", _gpu_cases() if ON_GPU else _cpu_params()
)
def test_matches_naive(seq_lens, q_lens, pattern, bs, hq, hkv, dh, rot, neox, dtype, knobs, seed):
    case = hash((tuple(seq_lens), tuple(q_lens), bs, hq, dh, rot, neox)) & 0xFFFF  # ints only: stable
    run_case(seq_lens, q_lens, pattern, bs, hq, hkv, dh, rot, neox, dtype, seed * 0x10000 + case, **knobs)


# Top-k middle attention on the Triton route (issue 15): the kernel gives Λ and its log-sum-exp,
# `raw_torch.merge_middle` merges the middle partial in.
# (name, seq_lens, q_lens, pattern, block_size, hq, hkv, dh, rotary_dim, neox, k, distance, blocks, rows, knobs)
TOP_K_CASES = [
    ("decode_exact_gqa", [200, 65, 9], [1, 1, 1], P(4, 32, 32), 16, 6, 2, 16, 16, True, 3, 16, False, "last", {}),
    ("chunks_exact_all_rows_gptj_splits", [150, 40, 90], [30, 40, 1], P(3, 24, 24), 16, 4, 2, 16, 12, False, 2, 12,
     False, "all", dict(num_splits=2)),
    ("decode_blocks_splits", [300, 100], [1, 1], P(4, 32, 32), 16, 4, 2, 16, 16, True, 2, 16, True, "last",
     dict(num_splits=3)),
    ("chunk_blocks_mqa_block_edge", [176, 64], [48, 64], P(4, 32, 32), 16, 4, 1, 16, 16, False, 2, 16, True, "all",
     dict(block_m=8)),
]


@pytest.mark.parametrize("case", TOP_K_CASES, ids=[c[0] for c in TOP_K_CASES])
def test_top_k_merged_into_the_triton_result_matches_dense(case, seed):
    """The kernel's log-sum-exp against the float64 one of each row's Λ logits, and the
    middle partial merged into the kernel's result against the dense float64 top-k rule
    (exact and block mode, the last row or every row, GQA/MQA, split decode)."""
    from lminf_kernels.naive import gather_paged, lambda_attention_dense
    from lminf_kernels.raw_torch import merge_middle, update_block_summaries
    from lminf_kernels.topk import TopKRows, filled_blocks

    _, seq_lens, q_lens, pattern, bs, hq, hkv, dh, rot, neox, k, distance, blocks, rows, knobs = case
    gen = torch.Generator().manual_seed(seed + 17)
    query, cache, table, qsl = make_batch(seq_lens, q_lens, hq, hkv, dh, bs, F32, gen)
    kw = dict(pattern=pattern, style=RopeStyle(rot, neox), inv_freq=inv_freq_for(rot), scale=dh**-0.5)
    first_pos = [0 if rows == "all" else s - 1 for s in seq_lens]
    want = lambda_paged_attention_naive(query, cache, table, qsl, seq_lens, top_k=(k, distance, first_pos),
                                        top_k_block_size=bs if blocks else None, **kw)
    lse = torch.full((qsl[-1], hq), float("nan"), device=DEVICE)
    got = triton_lambda.lambda_paged_attention_triton(query.to(DEVICE), cache.to(DEVICE), table.to(DEVICE), qsl,
                                                      seq_lens, lse=lse, **kw, **knobs)
    for i, s in enumerate(seq_lens):  # Λ only: the log-sum-exp the merge relies on
        a, b = qsl[i], qsl[i + 1]
        kk, vv = gather_paged(cache, table[i], s, dh)
        _, lse_want = lambda_attention_dense(query[a:b], kk, vv, torch.arange(s - (b - a), s), return_lse=True, **kw)
        assert (lse[a:b].double().cpu() - lse_want).abs().max().item() < 1e-4, i
    summary = None
    if blocks:  # what earlier steps summarized: every full block (NaN elsewhere, so reading one shows)
        summary = torch.full((cache.shape[0], hkv, 2, dh), float("nan"))
        update_block_summaries(cache, summary, filled_blocks(table, [0, *itertools.accumulate(seq_lens)], seq_lens, bs))
    rule = TopKRows(k, distance, first_pos, blocks=blocks, block_size=bs)
    merge_middle(query.to(DEVICE), cache.to(DEVICE), table.to(DEVICE), qsl, seq_lens, got, lse, top_k=rule,
                 block_summary=summary if summary is None else summary.to(DEVICE),
                 scores=triton_lambda.middle_scores_triton, **dict(kw, inv_freq=kw["inv_freq"].to(DEVICE)))
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < TOL[F32]
    plain = triton_lambda.lambda_paged_attention_triton(query.to(DEVICE), cache.to(DEVICE), table.to(DEVICE), qsl,
                                                        seq_lens, **kw, **knobs)
    assert rel_err(plain, want) > 10 * TOL[F32]  # the middle changed the result: the test can fail


@pytest.mark.parametrize("bs,dh,rows,keys,block_m,block_n", [(16, 16, 5, 70, 16, 64), (32, 80, 40, 300, 16, 32),
                                                              (128, 64, 1, 130, 16, 64)])
def test_middle_scores_match_float64(bs, dh, rows, keys, block_m, block_n, seed):
    """Exact mode's middle logits read in place from a shuffled paged cache (head sizes not a
    power of two, tiles that do not divide the rows or keys) against float64 products of the
    gathered keys; the cache is NaN outside the middle, so a read past it shows."""
    gen = torch.Generator().manual_seed(seed + 23)
    hkv, n_global, seq = 2, 3, 3 + keys + 7
    _, cache, table, _ = make_batch([seq], [1], 2, hkv, dh, bs, F32, gen)
    keys_all = torch.cat([cache[int(b)] for b in table[0, : -(-seq // bs)]], dim=1)[:, :, :dh]  # [H, S, D]
    mid = slice(n_global, n_global + keys)
    poisoned = cache.clone()
    for pos in [*range(n_global), *range(n_global + keys, -(-seq // bs) * bs)]:
        poisoned[int(table[0, pos // bs]), :, pos % bs, :dh] = float("nan")
    q = torch.randn(hkv, rows, dh, generator=gen)
    got = triton_lambda.middle_scores_triton(q.to(DEVICE), poisoned[..., :dh].to(DEVICE), table[0].to(DEVICE),
                                             n_global, keys, 0.3, block_m=block_m, block_n=block_n)
    want = torch.einsum("hmd,hnd->hmn", q.double(), keys_all[:, mid].double()) * 0.3
    assert got.shape == (hkv, rows, keys)
    assert (got.double().cpu() - want).abs().max().item() < 1e-4


def test_tiling_knobs_do_not_change_results(seed):
    """block_m / block_n / num_splits only change the schedule, not the math."""
    seq_lens, q_lens = [90, 40, 0, 77], [12, 1, 0, 1]
    pattern = P(5, 24, 24)
    gen = torch.Generator().manual_seed(seed + 7)
    query, cache, table, qsl = make_batch(seq_lens, q_lens, 4, 2, 16, 16, F32, gen)
    kw = dict(pattern=pattern, style=RopeStyle(16, True), inv_freq=inv_freq_for(16), scale=0.25)
    args = (query.to(DEVICE), cache.to(DEVICE), table.to(DEVICE), qsl, seq_lens)
    ref = triton_lambda.lambda_paged_attention_triton(*args, **kw)
    for knobs in (dict(block_m=1, block_n=16), dict(block_m=8, block_n=64), dict(block_m=1, num_splits=5),
                  dict(block_m=32, block_n=16, num_splits=2), dict(block_m=2, num_warps=2)):
        got = triton_lambda.lambda_paged_attention_triton(*args, **kw, **knobs)
        assert rel_err(got, ref) < 1e-6, knobs


def test_per_sequence_frequencies_query_scale_and_list_inputs(seed):
    """CLEX hook: [num_seqs, R/2] frequencies and a per-sequence query multiplier;
    list and tensor forms of the metadata give identical results."""
    seq_lens, q_lens = [40, 70, 9], [40, 1, 3]
    pattern = P(2, 16, 16)
    style = RopeStyle(16, True)
    gen = torch.Generator().manual_seed(seed + 11)
    query, cache, table, qsl = make_batch(seq_lens, q_lens, 4, 2, 16, 32, F32, gen)
    inv = torch.stack([inv_freq_for(16, base) for base in (1e4, 3e4, 5e5)])
    scales = [1.0, 1.3, 0.9]
    kw = dict(pattern=pattern, style=style, scale=0.3)
    want = lambda_paged_attention_naive(query, cache, table, qsl, seq_lens, inv_freq=inv, query_scale=scales, **kw)
    dev = (query.to(DEVICE), cache.to(DEVICE), table.to(DEVICE))
    got_list = triton_lambda.lambda_paged_attention_triton(
        *dev, qsl, seq_lens, inv_freq=inv, query_scale=scales, **kw)
    got_tensor = triton_lambda.lambda_paged_attention_triton(
        *dev, torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), inv_freq=inv.to(DEVICE),
        query_scale=torch.tensor(scales, device=DEVICE), **kw)
    assert rel_err(got_list, want) < TOL[F32]
    assert torch.equal(got_list, got_tensor)


def test_strided_cache_and_out(seed):
    """A cache view that is not contiguous (token-major storage permuted to the
    head-major layout) and a strided `out` are honoured."""
    seq_lens, q_lens = [70, 33], [6, 1]
    pattern = P(3, 20, 20)
    gen = torch.Generator().manual_seed(seed + 3)
    query, cache, table, qsl = make_batch(seq_lens, q_lens, 4, 2, 16, 16, F32, gen)
    kw = dict(pattern=pattern, style=RopeStyle(16, False), inv_freq=inv_freq_for(16), scale=0.25)
    want = lambda_paged_attention_naive(query, cache, table, qsl, seq_lens, **kw)
    storage = cache.permute(0, 2, 1, 3).contiguous().to(DEVICE)  # [nb, B, H, 2D]
    view = storage.permute(0, 2, 1, 3)  # [nb, H, B, 2D], not contiguous
    assert not view.is_contiguous()
    big = torch.full((query.shape[0], 4, 40), float("nan"), device=DEVICE)
    out = big[:, :, 5:21]
    ret = triton_lambda.lambda_paged_attention_triton(query.to(DEVICE), view, table.to(DEVICE), qsl, seq_lens,
                                                      out=out, **kw)
    assert ret.data_ptr() == out.data_ptr()
    assert rel_err(out, want) < TOL[F32]
    assert torch.isnan(big[:, :, :5]).all() and torch.isnan(big[:, :, 21:]).all()


def test_positions_past_one_million(seed):
    """A chunk at position ~1.2M, whose block table points at a NaN block everywhere
    outside the global and window blocks, equals a short sequence with the same
    global and window tokens."""
    gen = torch.Generator().manual_seed(seed + 5)
    bs, hkv, hq, dh = 32, 2, 4, 16
    pattern = P(10, 64, 64)
    style = RopeStyle(dh, True)
    long_len, q_len = 1_200_007, 5
    short_len = 3 * bs + 64 + q_len
    nb_long = -(-long_len // bs)
    cache = torch.randn(64, hkv, bs, 2 * dh, generator=gen)
    cache[1] = float("nan")
    table_long = torch.ones(1, nb_long, dtype=torch.int32)
    table_long[0, 0] = 2
    lo = pattern.local_start(long_len - q_len)
    first_w, last_w = lo // bs, (long_len - 1) // bs
    table_long[0, first_w : last_w + 1] = torch.arange(3, 3 + last_w - first_w + 1, dtype=torch.int32)
    lo_s = pattern.local_start(short_len - q_len)
    short = torch.zeros(8, hkv, bs, 2 * dh)
    table_short = torch.arange(8, dtype=torch.int32)[None]
    short[0] = cache[2]
    for t in range(lo_s, short_len):
        src = lo + (t - lo_s)
        short[t // bs, :, t % bs] = cache[table_long[0, src // bs], :, src % bs]
    query = torch.randn(q_len, hq, dh, generator=gen)
    kw = dict(pattern=pattern, style=style, inv_freq=inv_freq_for(dh), scale=0.25)
    want = lambda_paged_attention_naive(query, short, table_short, [0, q_len], [short_len], **kw)
    got = triton_lambda.lambda_paged_attention_triton(query.to(DEVICE), cache.to(DEVICE), table_long.to(DEVICE),
                                                      [0, q_len], [long_len], **kw)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < TOL[F32]


if _SKIP is None:

    @triton.jit
    def _sincos_probe(x_ptr, s_ptr, c_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        s, c = triton_lambda._sincos(tl.load(x_ptr + offs, mask=m, other=0.0))
        tl.store(s_ptr + offs, s, mask=m)
        tl.store(c_ptr + offs, c, mask=m)


def test_sincos_accuracy(seed):
    """The in-kernel sin/cos: within a few float32 ulps of the angle itself, from tiny
    angles to positions in the millions."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.cat([
        torch.linspace(-10, 10, 2001),
        torch.rand(2000, generator=gen) * 5000,
        torch.rand(1000, generator=gen) * 2e6,
        torch.arange(0, 4096, dtype=torch.float32) * 0.7,
    ]).float()
    s = torch.empty_like(x, device=DEVICE)
    c = torch.empty_like(x, device=DEVICE)
    xd = x.to(DEVICE)
    _sincos_probe[(triton.cdiv(x.numel(), 1024),)](xd, s, c, x.numel(), BLOCK=1024)
    ref = x.double()
    tol = 3e-7 + 2 * torch.abs(ref) * 2.0**-24  # ~ulp(x) beyond |x| of a few units
    assert ((s.cpu().double() - ref.sin()).abs() <= tol).all()
    assert ((c.cpu().double() - ref.cos()).abs() <= tol).all()
    assert math.isfinite(float(s.sum()))
