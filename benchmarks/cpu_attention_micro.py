"""Wall time of one layer's attention at SmolLM2 shapes (9 q / 3 kv heads, head 64,
block 128, bf16 cache, W = 8192, G = 10): the plugin's paths against vLLM's own CPU
kernel (full causal and its sliding window of the same W) on the same cache.

    python benchmarks/cpu_attention_micro.py [--threads 2]

Rows: one decode query at 8K / 32K / 64K; a 2048-query prefill chunk ending at 10K and
at 32K (the plugin's C++ kernel and its torch fallback; vLLM's kernels on the same chunk).
These repeat one layer, so its window stays in the CPU caches. In a real step every layer
reads its own window and evicts the others': the "cold" rows cycle through one cache per
layer (30, as SmolLM2) at 32K, closer to what a decode step sees; they include Λ with
top-k middle attention (exact and block mode, through the backend's entry point) and vLLM's
full causal attention with the ISA stock vLLM picks on this CPU ("amx" on AMX machines).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lminf_kernels.absolute_cpu import QueryPlan, lambda_attention_absolute
from lminf_kernels.paged import absolute_views
from lminf_kernels.raw_torch import lambda_paged_attention
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle
from lminf_kernels.topk import TopKRows, summarize_blocks


def wall_ms(fn, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat * 1e3


def vllm_isa() -> str:
    """The ISA stock vLLM picks for SmolLM2's bf16 cache on this CPU ("amx" where AMX exists)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(torch.bfloat16, 128, 64)


def ask_for_amx_state() -> None:
    """Linux hands a process AMX state only once asked; inside an engine oneDNN's first bf16
    matmul asks. Without it vLLM's "amx" kernel dies with SIGILL in this bare process."""
    x = torch.ones(64, 64, dtype=torch.bfloat16)
    (x @ x).sum()


def vllm_kernel(query, cache, table, seq_len, n_q, window, scale, isa="vec"):
    """vLLM's CPU attention on `cache` (random values: only the timing is read, so its
    bytes need not be in the ISA's packed layout)."""
    from vllm import _custom_ops as ops

    nb, hkv, bs, _ = cache.shape
    kc, vc = cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)
    qsl, lens = torch.tensor([0, n_q], dtype=torch.int32), torch.tensor([seq_len], dtype=torch.int32)
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=query.shape[1], num_kv_heads=hkv, head_dim=query.shape[2], seq_lens=lens,
        dtype=query.dtype, query_start_loc=qsl, causal=True, sliding_window_size=window, isa=isa,
        enable_kv_split=True)
    out = torch.empty_like(query)
    return lambda: ops.cpu_attention_with_kv_cache(
        query=query, key_cache=kc, value_cache=vc, output=out, query_start_loc=qsl, seq_lens=lens, scale=scale,
        causal=True, alibi_slopes=None, sliding_window=window, block_table=table, softcap=0.0,
        scheduler_metadata=sched, s_aux=None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CI smoke)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    hq, hkv, dh, bs, w = 9, 3, 64, 128, 8192
    lengths, chunk, repeat = [8192, 32768, 65536], 2048, 20
    if a.quick:
        lengths, chunk, repeat, w = [512, 1024], 64, 2, 256
    inv = 1.0 / 1e5 ** (torch.arange(0, dh, 2).float() / dh)
    style, pattern, scale = RopeStyle(dh, True), LambdaPattern(10, w, w), dh**-0.5
    rows = []
    ask_for_amx_state()
    isa = vllm_isa()  # what stock vLLM runs here; the rows without "(isa)" use the portable "vec"

    def paged_cache(seq_len):
        """A bf16 cache of random keys/values holding seq_len tokens, and its block table."""
        nb = -(-seq_len // bs)
        return torch.randn(nb + 1, hkv, bs, 2 * dh).to(torch.bfloat16), torch.arange(1, nb + 1, dtype=torch.int32)[None]

    for seq_len, n_q in [(n, 1) for n in lengths] + [(w + chunk, chunk), (lengths[1], chunk)]:
        cache, table = paged_cache(seq_len)
        query = torch.randn(n_q, hq, dh).to(torch.bfloat16)
        out = torch.empty_like(query)
        kw = dict(pattern=pattern, style=style, inv_freq=inv, scale=scale, out=out)
        r = 1 if n_q > 1 else repeat
        timings = {}
        plan = QueryPlan.build([0], [0, n_q], [seq_len], pattern, inv)  # built once per step, shared by layers
        timings["plugin (C++)"] = wall_ms(
            lambda: lambda_attention_absolute(query, cache, table, [0, n_q], [seq_len], plan=plan, **kw), r)
        timings["plugin (torch fallback)"] = wall_ms(
            lambda: lambda_attention_absolute(query, cache, table, [0, n_q], [seq_len], use_extension=False, **kw),
            max(1, r // 4))
        timings["plugin raw keys (torch, CLEX path)"] = wall_ms(
            lambda: lambda_paged_attention(query, cache, table, [0, n_q], [seq_len], **kw), max(1, r // 4))
        timings["vLLM full causal"] = wall_ms(vllm_kernel(query, cache, table, seq_len, n_q, -1, scale), r)
        timings[f"vLLM sliding window {w}"] = wall_ms(vllm_kernel(query, cache, table, seq_len, n_q, w, scale), r)
        if isa != "vec":
            timings[f"vLLM full causal ({isa})"] = wall_ms(
                vllm_kernel(query, cache, table, seq_len, n_q, -1, scale, isa), r)
        for name, ms in timings.items():
            rows.append((seq_len, n_q, name, ms))
            print(f"{seq_len:>7} tokens {n_q:>5} queries  {name:<36} {ms:8.3f} ms/layer", flush=True)
    # decode with every layer's own cache (cold), as inside a real step
    seq_len, layers = lengths[1], 3 if a.quick else 30
    caches, tables = zip(*(paged_cache(seq_len) for _ in range(layers)))
    table = tables[0]  # same block ids in every layer's cache
    query = torch.randn(1, hq, dh).to(torch.bfloat16)
    kw = dict(pattern=pattern, style=style, inv_freq=inv, scale=scale, out=torch.empty_like(query))
    plan = QueryPlan.build([0], [0, 1], [seq_len], pattern, inv)
    per_layer = {
        "plugin (C++)": [lambda c=c: lambda_attention_absolute(query, c, table, [0, 1], [seq_len], plan=plan, **kw)
                         for c in caches],
        f"vLLM sliding window {w}": [vllm_kernel(query, c, table, seq_len, 1, w, scale) for c in caches],
    }
    # top-k middle attention (issue 15) on top of Λ: every middle key scored (exact, k 5) or
    # 4 blocks chosen by their summaries, at distance W/2, through the same entry point the
    # backend calls (its per-layer Python included); stock's full attention with the ISA it uses
    top_k = TopKRows(k=5, distance=w // 2, first_pos=[0])
    blocks = TopKRows(k=4, distance=w // 2, first_pos=[0], blocks=True, block_size=bs)
    summaries = [summarize_blocks(absolute_views(c)[0]) for c in caches]
    per_layer["plugin Λ + exact top-k 5 (C++)"] = [
        lambda c=c: lambda_attention_absolute(query, c, table, [0, 1], [seq_len], plan=plan, top_k=top_k, **kw)
        for c in caches]
    per_layer["plugin Λ + block mode 4 (C++)"] = [
        lambda c=c, m=m: lambda_attention_absolute(query, c, table, [0, 1], [seq_len], plan=plan, top_k=blocks,
                                                   block_summary=m, **kw)
        for c, m in zip(caches, summaries)]
    per_layer[f"vLLM full causal ({isa})"] = [vllm_kernel(query, c, table, seq_len, 1, -1, scale, isa) for c in caches]
    for name, fns in per_layer.items():
        ms = wall_ms(lambda: [f() for f in fns], max(1, repeat // 4)) / layers
        name = f"{name}, cold ({layers} layers' caches)"
        rows.append((seq_len, 1, name, ms))
        print(f"{seq_len:>7} tokens {1:>5} queries  {name:<36} {ms:8.3f} ms/layer", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "cpu_attention_micro.json").write_text(json.dumps({
        "threads": a.threads, "machine": platform.processor() or platform.machine(), "window": w,
        "rows": [{"seq_len": n, "queries": q, "path": name, "ms_per_layer": ms} for n, q, name, ms in rows],
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
