"""Benchmark the Triton Λ-attention kernel on a CUDA GPU.

    python benchmarks/bench_triton_kernels.py --out results.json [--quick] [--require-gpu]

(a) decode: achieved bandwidth (bytes of attended K/V plus q/out over the median
    time of triton.testing.do_bench) against a measured device-to-device copy
    bandwidth; target >= 70 %.
(b) prefill: TFLOP/s (4 * D * attended (query, key) pairs * query heads per second)
    against torch FlexAttention with a block mask for the same Λ pattern (no rotary),
    and against SDPA causal over a length with the same number of attended pairs.

Before timing, each configuration is checked against the naive float64 reference
(all keys of full-length sequences; a sample of query rows and heads for prefill).

Without CUDA the script says so and exits 0 (1 with --require-gpu).
`--compile-only` instead builds the kernel's default tile plans for sm_90 with
Triton's bundled toolchain (no GPU needed) and reports registers and spills.

Self-contained: torch + triton + lminf_kernels. When the project is not installed,
the repository's `kernels/` folder is registered as the package `lminf_kernels`.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch


def _import_kernels():
    try:
        import lminf_kernels.raw_triton  # noqa: F401
    except ImportError:
        kdir = Path(__file__).resolve().parent.parent / "kernels"
        spec = importlib.machinery.ModuleSpec("lminf_kernels", None, is_package=True)
        spec.submodule_search_locations = [str(kdir)]
        pkg = importlib.util.module_from_spec(spec)
        pkg.__path__ = [str(kdir)]
        sys.modules["lminf_kernels"] = pkg
    import lminf_kernels.naive as naive
    import lminf_kernels.raw_triton as triton_lambda
    from lminf_kernels.pattern import LambdaPattern
    from lminf_kernels.rope import RopeStyle

    return naive, triton_lambda, LambdaPattern, RopeStyle


if "--smoke" in sys.argv[1:] and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import
naive, triton_lambda, LambdaPattern, RopeStyle = _import_kernels()


def inv_freq_for(rotary_dim: int, base: float = 500000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


def attended_pairs(pattern, positions: torch.Tensor) -> int:
    """Number of (query, key) pairs the Λ pattern attends for queries at `positions`."""
    p = positions.to(torch.int64)
    return int((p + 1 - pattern.local_start(p) + pattern.global_end(p)).sum())


def attended_tokens(pattern, p: int) -> int:
    return p + 1 - pattern.local_start(p) + pattern.global_end(p)


def build_lambda_cache(seq_lens, pattern, hkv, dh, bs, dtype, device, gen, full=False):
    """Paged cache holding only the blocks a step can read (globals and the window of
    the last `q_len` queries is decided by the caller via `full`); the block table
    points every other entry at block 0 (finite random data, never read by the
    kernel; the naive reference reads and masks it)."""
    rows, nblocks = [], 1
    for s in seq_lens:
        nb = -(-s // bs)
        if full:
            needed = list(range(nb))
        else:
            g_blocks = set(range(-(-min(pattern.n_global, s) // bs)))
            lo = pattern.local_start(s - 1)
            needed = sorted(g_blocks | set(range(lo // bs, nb)))
        row = torch.zeros(nb, dtype=torch.int32)
        for b in needed:
            row[b] = nblocks
            nblocks += 1
        rows.append(row)
    table = torch.zeros(len(seq_lens), max(r.numel() for r in rows), dtype=torch.int32)
    for i, r in enumerate(rows):
        table[i, : r.numel()] = r
    cache = torch.randn(nblocks, hkv, bs, 2 * dh, generator=gen, dtype=torch.float32).to(dtype)
    return cache.to(device), table.to(device)


def reference_rows(query, cache, table, seq, seq_len, rows, row_pos, kv_heads, pattern, style, freq, scale):
    """Naive float64 reference (on the CPU) for query rows `rows` (positions `row_pos`)
    of sequence `seq`, restricted to KV heads `kv_heads` and their query heads; one
    row at a time to bound memory. Returns ([len(rows), len(q heads), D], q heads)."""
    hkv = cache.shape[1]
    group = query.shape[1] // hkv
    dh = query.shape[-1]
    k, v = naive.gather_paged(cache, table[seq], seq_len, dh)  # all tokens, gap included
    k, v = k[:, kv_heads].cpu(), v[:, kv_heads].cpu()
    qh = [h for kvh in kv_heads for h in range(kvh * group, (kvh + 1) * group)]
    outs = []
    for r, pos in zip(rows, row_pos):
        q = query[r : r + 1, qh].cpu()
        outs.append(naive.lambda_attention_dense(q, k[: pos + 1], v[: pos + 1], torch.tensor([pos]), pattern=pattern,
                                                 style=style, inv_freq=freq.cpu(), scale=scale))
    return torch.cat(outs), qh


def rel_err(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def bench_ms(fn, device) -> float:
    """Median milliseconds: triton.testing.do_bench on CUDA (L2 flushed between runs);
    one wall-clock run elsewhere (--smoke only, where the numbers mean nothing)."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def sync(device) -> None:
    if device.type == "cuda":
        sync(device)


def free(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device, n: int) -> float:
    """Bytes/s of a device-to-device copy of n bf16 elements (read + write)."""
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    del src, dst
    free(device)
    return 2 * n * 2 / (ms * 1e-3)


def num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None


def bench_decode(args, device, copy_bw, results):
    hq, hkv, dh, bs = (4, 2, 32, 16) if args.smoke else (32, 8, 128, 16)
    dtype = torch.bfloat16
    w = 64 if args.smoke else 4096
    pattern = LambdaPattern(n_global=4, n_local=w, distance_limit=w)
    style = RopeStyle(dh, True)
    freq = inv_freq_for(dh).to(device)
    scale = dh**-0.5
    gen = torch.Generator().manual_seed(0)
    batches = [1, 3] if args.smoke else [1, 8, 32] if args.quick else [1, 8, 32, 128, 256]
    rows = []
    for batch in batches:
        seq_lens = [(300 if args.smoke else 32768) + 977 * i for i in range(batch)]
        cache, table = build_lambda_cache(seq_lens, pattern, hkv, dh, bs, dtype, device, gen)
        query = torch.randn(batch, hq, dh, generator=gen).to(dtype).to(device)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
        sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        out = torch.empty_like(query)
        kw = dict(pattern=pattern, style=style, inv_freq=freq, scale=scale, out=out)

        def run():
            return triton_lambda.lambda_paged_attention_triton(query, cache, table, qsl, sl, **kw)

        run()
        sync(device)
        errs = []
        for i in range(min(batch, 2)):
            ref, qh = reference_rows(query, cache, table, i, seq_lens[i], [i], [seq_lens[i] - 1], [0, hkv - 1],
                                     pattern, style, freq, scale)
            errs.append(rel_err(out[i : i + 1, qh], ref))
        ms = bench_ms(run, device)
        kv_bytes = sum(attended_tokens(pattern, s - 1) for s in seq_lens) * hkv * 2 * dh * cache.element_size()
        qo_bytes = 2 * query.numel() * query.element_size()
        bw = (kv_bytes + qo_bytes) / (ms * 1e-3)
        plan = triton_lambda.plan_launch(batch, batch, hq, hkv, dh, dtype, pattern,
                                         num_sms=num_sms(device))
        row = dict(batch=batch, seq_len=seq_lens[0], ms=ms, gbps=bw / 1e9, frac_of_copy=bw / copy_bw,
                   max_rel_err=max(errs), splits=plan.num_splits, block_n=plan.block_n, warps=plan.num_warps)
        if not args.quick and batch in ((3,) if args.smoke else (8, 32)):
            # tuning data: the same step with other KV split counts
            sweep = {}
            for sp in (1, 3) if args.smoke else (1, 2, 4, 8, 16):
                if sp == plan.num_splits:
                    continue
                f = lambda: triton_lambda.lambda_paged_attention_triton(  # noqa: E731
                    query, cache, table, qsl, sl, num_splits=sp, **kw)
                sweep[sp] = (kv_bytes + qo_bytes) / (bench_ms(f, device) * 1e-3) / copy_bw
            row["frac_of_copy_by_splits"] = sweep
        rows.append(row)
        print(f"decode  batch {batch:4d}  {ms * 1e3:8.1f} us  {bw / 1e9:7.0f} GB/s  {100 * bw / copy_bw:5.1f}% of copy"
              f"  splits {plan.num_splits:2d}  err {max(errs):.2e}", flush=True)
        del cache, table, query, out
        free(device)
    results["decode"] = dict(
        config=dict(hq=hq, hkv=hkv, head_size=dh, block_size=bs, dtype=str(dtype), n_global=pattern.n_global,
                    n_local=pattern.n_local),
        rows=rows, target_frac=0.7, best_frac=max(r["frac_of_copy"] for r in rows),
        target_met_at_largest_batch=rows[-1]["frac_of_copy"] >= 0.7,
    )


def bench_prefill(args, device, results):
    import torch.nn.functional as F

    hq, hkv, dh, bs = (4, 2, 32, 16) if args.smoke else (32, 8, 128, 16)
    dtype = torch.bfloat16
    w = 64 if args.smoke else 4096
    pattern = LambdaPattern(n_global=4, n_local=w, distance_limit=w)
    style = RopeStyle(dh, True)
    freq = inv_freq_for(dh).to(device)
    scale = dh**-0.5
    gen = torch.Generator().manual_seed(1)
    lengths = [160] if args.smoke else [8192] if args.quick else [8192, 32768]
    flex = None
    try:
        if device.type != "cuda":
            raise RuntimeError("FlexAttention is timed on CUDA only")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        print(f"FlexAttention unavailable: {exc}")
    rows = []
    for length in lengths:
        seq_lens = [length]
        cache, table = build_lambda_cache(seq_lens, pattern, hkv, dh, bs, dtype, device, gen, full=True)
        query = torch.randn(length, hq, dh, generator=gen).to(dtype).to(device)
        qsl = torch.tensor([0, length], dtype=torch.int32, device=device)
        sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        out = torch.empty_like(query)
        kw = dict(pattern=pattern, style=style, inv_freq=freq, scale=scale, out=out)

        def run():
            return triton_lambda.lambda_paged_attention_triton(query, cache, table, qsl, sl, **kw)

        run()
        sync(device)
        sample = sorted({0, 1, 17, pattern.n_local - 1, pattern.n_local, pattern.n_local + 5, length // 2,
                         length - 2, length - 1})
        ref, qh = reference_rows(query, cache, table, 0, length, sample, sample, [0, hkv - 1], pattern, style,
                                 freq, scale)
        err = rel_err(out[sample][:, qh], ref)
        pairs = attended_pairs(pattern, torch.arange(length))
        flops = 4 * dh * hq * pairs
        ms = bench_ms(run, device)
        row = dict(length=length, pairs_per_head=pairs, lambda_ms=ms, lambda_tflops=flops / (ms * 1e-3) / 1e12,
                   max_rel_err=err)

        # the same Λ mask in FlexAttention (no rotary), GQA
        k_flat, v_flat = naive.gather_paged(cache, table[0], length, dh)  # [L, Hkv, D]
        q4 = query.transpose(0, 1)[None].contiguous()
        k4 = k_flat.transpose(0, 1)[None].contiguous()
        v4 = v_flat.transpose(0, 1)[None].contiguous()
        if flex is not None:
            try:
                n_local, n_global = pattern.n_local, pattern.n_global

                def lambda_mask(b, h, q_idx, kv_idx):
                    return (kv_idx <= q_idx) & ((q_idx - kv_idx < n_local) | (kv_idx < n_global))

                bm = create_block_mask(lambda_mask, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)
                fl = lambda: flex(q4, k4, v4, block_mask=bm, scale=scale, enable_gqa=True)  # noqa: E731
                fl()
                sync(device)
                fms = bench_ms(fl, device)
                row.update(flex_ms=fms, flex_tflops=flops / (fms * 1e-3) / 1e12)
            except Exception as exc:  # pragma: no cover
                row.update(flex_error=f"{type(exc).__name__}: {exc}"[:300])
        # SDPA causal over a length with the same number of attended pairs
        lc = int(round((math.sqrt(8 * pairs + 1) - 1) / 2))
        qc = torch.randn(1, hq, lc, dh, device=device, dtype=dtype)
        kc = torch.randn(1, hq, lc, dh, device=device, dtype=dtype)  # heads pre-expanded: flash path
        vc = torch.randn(1, hq, lc, dh, device=device, dtype=dtype)
        sd = lambda: F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale)  # noqa: E731
        sms = bench_ms(sd, device)
        sflops = 4 * dh * hq * (lc * (lc + 1) // 2)
        row.update(sdpa_causal_len=lc, sdpa_ms=sms, sdpa_tflops=sflops / (sms * 1e-3) / 1e12)
        rows.append(row)
        msg = (f"prefill L {length:6d}  Λ {row['lambda_tflops']:6.1f} TF/s ({ms:7.2f} ms)  "
               f"flex {row.get('flex_tflops', float('nan')):6.1f}  sdpa-causal(L={lc}) {row['sdpa_tflops']:6.1f}"
               f"  err {err:.2e}")
        print(msg, flush=True)
        del cache, table, query, out, q4, k4, v4, qc, kc, vc
        free(device)
    results["prefill"] = dict(
        config=dict(hq=hq, hkv=hkv, head_size=dh, block_size=bs, dtype=str(dtype), n_global=pattern.n_global,
                    n_local=pattern.n_local), rows=rows)


def compile_only(results) -> int:
    """Build the default tile plans for sm_90 (no GPU needed) and report registers."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tl_mod = triton_lambda
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    shapes = [  # (label, num_tokens, num_seqs, hq, hkv, D, rotary_dim, neox, dtype)
        ("decode gqa4 d128", 64, 64, 32, 8, 128, 128, True, torch.bfloat16),
        ("decode mqa d128", 64, 64, 16, 1, 128, 128, True, torch.bfloat16),
        ("decode gqa8 d128 gptj partial", 64, 64, 64, 8, 128, 64, False, torch.float16),
        ("decode d256", 64, 64, 8, 4, 256, 256, True, torch.bfloat16),
        ("prefill gqa4 d128", 4096, 1, 32, 8, 128, 128, True, torch.bfloat16),
        ("prefill mha d128 gptj", 4096, 1, 16, 16, 128, 128, False, torch.float16),
        ("prefill gqa8 d64", 4096, 1, 32, 4, 64, 64, True, torch.bfloat16),
        ("prefill d256", 4096, 1, 8, 4, 256, 256, True, torch.bfloat16),
        ("prefill d80 partial", 4096, 1, 12, 4, 80, 40, True, torch.bfloat16),
        ("decode fp32", 64, 64, 32, 8, 128, 128, True, torch.float32),
        ("prefill fp32", 4096, 1, 32, 8, 128, 128, True, torch.float32),
    ]
    tname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    pattern = LambdaPattern(4, 4096, 4096)
    rows, worst = [], 0
    for label, t, nseq, hq, hkv, dh, rot, neox, dtype in shapes:
        plan = tl_mod.plan_launch(t, nseq, hq, hkv, dh, dtype, pattern, num_sms=132)
        group = hq // hkv
        half, pass_dim = rot // 2, dh - rot
        consts = dict(GROUP=group, GROUP_P2=triton.next_power_of_2(group), BLOCK_M=plan.block_m, ROWS=plan.rows,
                      BLOCK_N=plan.block_n, BLOCK_SIZE=16, HEAD_DIM=dh, ROT_HALF=half, HALF_P2=tl_mod._pow2(half),
                      PASS_DIM=pass_dim, PASS_P2=tl_mod._pow2(pass_dim) if pass_dim else 0,
                      DV_P2=tl_mod._pow2(dh), NEOX=neox, HAS_QSCALE=False, NUM_SPLITS=plan.num_splits,
                      DOT_PREC="ieee" if dtype == torch.float32 else None, DOT_UPCAST=False)
        fn = tl_mod._lambda_attn_fwd
        sig = {}
        for n in fn.arg_names:
            if n in consts:
                sig[n] = "constexpr"
            elif n in ("q_ptr", "cache_ptr", "out_ptr"):
                sig[n] = "*" + tname[dtype]
            elif n in ("bt_ptr", "qsl_ptr", "seqlen_ptr"):
                sig[n] = "*i32"
            elif n.endswith("_ptr"):
                sig[n] = "*fp32"
            elif n in ("distance_limit", "qk_scale"):
                sig[n] = "fp32"
            else:
                sig[n] = "i32"
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        t0 = time.time()
        try:
            kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": plan.num_warps})
            with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
                f.write(kern.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True).stdout
            os.unlink(f.name)
            line = next((ln.strip() for ln in usage.splitlines() if "REG:" in ln), "")
            fields = dict(kv.split(":") for kv in line.split() if ":" in kv)
            regs, stack = int(fields.get("REG", -1)), int(fields.get("STACK", -1))
            row = dict(label=label, plan=plan.__dict__, regs=regs, stack_bytes=stack, shared=kern.metadata.shared,
                       seconds=round(time.time() - t0, 1))
            worst = max(worst, stack)
        except Exception as exc:
            row = dict(label=label, plan=plan.__dict__, error=f"{type(exc).__name__}: {exc}"[:500])
            worst = max(worst, 1 << 30)
        rows.append(row)
        print(f"{label:32s} rows {plan.rows:3d} block_n {plan.block_n:3d} warps {plan.num_warps}  "
              + (f"regs {row['regs']:3d} stack {row['stack_bytes']:5d} B  smem {row['shared']:6d} B"
                 if "regs" in row else row["error"]), flush=True)
    results["compile_only"] = dict(target="sm_90", rows=rows)
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer sizes (for short device sessions)")
    ap.add_argument("--require-gpu", action="store_true", help="exit 1 when no CUDA device is present")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, also on CPU through TRITON_INTERPRET=1: checks the script, not speed")
    ap.add_argument("--compile-only", action="store_true",
                    help="no GPU needed: build the default plans for sm_90, report registers/spills")
    args = ap.parse_args(argv)
    results: dict = dict(torch=torch.__version__)
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        print("triton is not installed")
        return 1 if args.require_gpu else 0

    if args.compile_only:
        worst = compile_only(results)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
        print("spills:", "none" if worst == 0 else f"up to {worst} bytes of stack")
        return 0

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke:
        device = torch.device("cpu")
    else:
        print("No CUDA device: the Triton kernel benchmark needs a GPU (nothing measured). "
              "Use --compile-only for an offline sm_90 build check, --smoke for a CPU run of the script.")
        if args.out:
            args.out.write_text(json.dumps(dict(results, skipped="no CUDA device"), indent=2))
        return 1 if args.require_gpu else 0
    results["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    copy_bw = copy_bandwidth(device, (1 << 20) if args.smoke else (1 << 30))
    results["copy_gbps"] = copy_bw / 1e9
    print(f"{results['device']}: device-to-device copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    bench_decode(args, device, copy_bw, results)
    bench_prefill(args, device, results)

    bad = [r for part in ("decode", "prefill") for r in results[part]["rows"] if not r["max_rel_err"] < 2e-2]
    results["correct"] = not bad
    print()
    print(f"decode: best {100 * results['decode']['best_frac']:.1f}% of copy bandwidth "
          f"(target 70%: {'met' if results['decode']['target_met_at_largest_batch'] else 'NOT met'} "
          f"at the largest batch)")
    print("correctness:", "ok" if not bad else f"FAILED for {bad}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return 0 if not bad else 2


if __name__ == "__main__":
    sys.exit(main())
