"""CLEX's t step: wall time to re-rotate 16K held keys in 30 layers (SmolLM2: 3 kv heads x 64,
bf16, block 128) with the C++ op, in vLLM's "vec" and "amx" key layouts; 5 alternating
repeats, median (min, max) in ms.

    python benchmarks/rerotation_micro.py
"""
import time, statistics, torch
from lminf_kernels import absolute_cpu
from lminf_kernels.rope import RopeStyle
torch.manual_seed(0); torch.set_num_threads(2)
n, h, bs, d, L, layers = 130, 3, 128, 64, 16384, 30
caches = [torch.randn(n, h, bs, 2 * d).to(torch.bfloat16) for _ in range(layers)]
row = torch.arange(1, n, dtype=torch.int32)
f = 1.0 / 1e5 ** (torch.arange(0, d, 2).double() / d)
plan = absolute_cpu.Rerotation.plan(row, 0, L, f * 0.01, bs)
style = RopeStyle(d, True)
res = {"vec": [], "amx": []}
for _ in range(5):
    for lay in res:
        t = time.perf_counter()
        for c in caches: absolute_cpu.rerotate_blocks(c, plan, style, key_layout=lay)
        res[lay].append((time.perf_counter() - t) * 1e3)
print({k: (round(statistics.median(v), 1), round(min(v), 1), round(max(v), 1)) for k, v in res.items()})
