"""A/B of the C++ decode kernels at two git revisions, in one process: the kernel source
(`kernels/lminf_kernels/csrc/absolute_cpu.cpp`) at each revision is built under its own
extension name, and both are timed alternately on the same inputs, then their outputs are
compared bit for bit (a speed change must not change results).

Shapes: SmolLM2-135M (9 q / 3 kv heads, head 64, bf16 cache, block 128), W = 8K, G = 10,
one decode row at 32K; every call cycles through 30 layers' caches (cold, as in a real step).
Rows: the Λ kernel (`lambda_rows`), exact top-k's middle op (`middle_topk_merge`, k 5,
distance 4K) and block mode's (`middle_blocks_merge`, 4 blocks), both through the fast
path's `_kernel_merge`; ms per layer, median (min, max).

    python benchmarks/decode_kernels_ab.py c1ced5f HEAD [--rounds 11]

Run it on a quiet machine (2 threads, as the engine).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

import lminf_kernels.absolute_cpu as absolute_cpu
from lminf_kernels.absolute_cpu import QueryPlan
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle
from lminf_kernels.topk import TopKRows, summarize_blocks

SOURCE = "kernels/lminf_kernels/csrc/absolute_cpu.cpp"
ROOT = Path(__file__).resolve().parents[1]


def build(rev: str, workdir: Path) -> str:
    """The kernel source at `rev` built as its own torch library; returns its op namespace."""
    text = subprocess.run(["git", "show", f"{rev}:{SOURCE}"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout
    name = "lminf_ab_" + hashlib.sha1(text.encode()).hexdigest()[:10]
    src = workdir / f"{name}.cpp"
    src.write_text(text.replace("TORCH_LIBRARY(lminf_cpu,", f"TORCH_LIBRARY({name},")
                   .replace("TORCH_LIBRARY_IMPL(lminf_cpu,", f"TORCH_LIBRARY_IMPL({name},"))
    load(name=name, sources=[str(src)], extra_cflags=["-O3", "-march=native", "-fopenmp", "-DNDEBUG"],
         extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    return name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="git revision A (e.g. the base)")
    ap.add_argument("b", help="git revision B")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--seq-len", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=30)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        names = {f"A {a.a}": build(a.a, Path(tmp)), f"B {a.b}": build(a.b, Path(tmp))}
    hq, hkv, dh, bs, w = 9, 3, 64, 128, 8192
    inv = 1.0 / 1e5 ** (torch.arange(0, dh, 2).float() / dh)
    style, pattern, scale = RopeStyle(dh, True), LambdaPattern(10, w, w), dh**-0.5
    nb = -(-a.seq_len // bs)
    caches = [torch.randn(nb + 1, hkv, bs, 2 * dh).to(torch.bfloat16) for _ in range(a.layers)]
    table = torch.arange(1, nb + 1, dtype=torch.int32)[None]
    q = torch.randn(1, hq, dh)
    plan = QueryPlan.build([0], [0, 1], [a.seq_len], pattern, inv)
    top_k = TopKRows(k=5, distance=w // 2, first_pos=[0])
    blocks = TopKRows(k=4, distance=w // 2, first_pos=[0], blocks=True, block_size=bs)
    summaries = {id(c): summarize_blocks(absolute_cpu.absolute_views(c)[0].float()) for c in caches}
    row = table[0].long()  # int64: what every revision's middle ops accept

    def lam(ns):
        op = getattr(torch.ops, ns).lambda_rows
        return lambda c: op(q, plan.glob_cos, plan.glob_sin, c, table, plan.rows, plan.lo, plan.pos, plan.n_glob,
                            scale, style.rotary_dim, style.neox, plan.chunk_tokens, 16)

    def middle(ns, rule):
        name = "middle_blocks_merge" if rule.blocks else "middle_topk_merge"
        op = getattr(getattr(torch.ops, ns), name)
        attr = "middle_blocks_op" if rule.blocks else "middle_topk_op"

        def run(c):
            out, lse = torch.zeros(1, hq, dh), torch.full((1, hq), float("-inf"))
            original = getattr(absolute_cpu, attr)
            setattr(absolute_cpu, attr, lambda: op)
            try:
                absolute_cpu._kernel_merge(q, c, row, a.seq_len - 1, rule, 0, pattern, style, inv, scale, out,
                                           lse, summaries[id(c)])
            finally:
                setattr(absolute_cpu, attr, original)
            return out
        return run

    kinds = {"Λ kernel (lambda_rows)": lam,
             "exact top-k middle op": lambda ns: middle(ns, top_k),
             "block mode middle op": lambda ns: middle(ns, blocks)}
    for kind, make in kinds.items():
        fns = {rev: make(ns) for rev, ns in names.items()}
        times = {rev: [] for rev in fns}
        last = {}
        for fn in fns.values():  # warm-up: tables, first-touch of buffers
            fn(caches[0])
        for _ in range(a.rounds):
            for rev, fn in fns.items():
                t = time.perf_counter()
                for c in caches:
                    last[rev] = fn(c)
                times[rev].append((time.perf_counter() - t) / a.layers * 1e3)
        outs = [last[rev] if isinstance(last[rev], torch.Tensor) else last[rev][0] for rev in fns]
        same = torch.equal(outs[0], outs[1])
        for rev, ts in times.items():
            print(f"{kind:<24} {rev:>12}: {statistics.median(ts):.3f} ms/layer "
                  f"({min(ts):.3f}, {max(ts):.3f})")
        ta, tb = (statistics.median(ts) for ts in times.values())
        print(f"{kind:<24} A / B time = {ta / tb:.2f}x; outputs bit-identical: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
