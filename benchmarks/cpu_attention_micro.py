"""CPU time of one layer's Λ attention (torch path) at SmolLM2 shapes (9 q / 3 kv heads,
head 64, block 128, W = 8192, G = 10): a 2048-query prefill chunk at position 8K and one
decode query at 8K and 32K, with raw vs block-relative pre-rotated keys.

    python benchmarks/cpu_attention_micro.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from lminf_kernels.lambda_attention import lambda_paged_attention
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle


def cpu_ms(fn, repeat: int = 3) -> float:
    fn()  # warm-up (fills the cos/sin table cache)
    t = time.process_time()  # CPU time: robust to other jobs on a shared machine
    for _ in range(repeat):
        fn()
    return (time.process_time() - t) / repeat * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    hq, hkv, dh, bs = 9, 3, 64, 128
    inv = 1.0 / 1e5 ** (torch.arange(0, dh, 2).float() / dh)
    style, pattern = RopeStyle(dh, True), LambdaPattern(10, 8192, 8192)
    print(f"{'seq len':>8} {'queries':>8} {'keys':>11} {'ms/layer':>9}")
    for seq_len, n_q, pre in [(8192, 2048, False), (8192, 2048, True), (8192, 1, False), (8192, 1, True),
                              (32768, 1, True)]:
        nb = seq_len // bs + 1
        cache = torch.randn(nb + 1, hkv, bs, 2 * dh)
        table = torch.arange(1, nb + 1, dtype=torch.int32)[None]
        query = torch.randn(n_q, hq, dh)
        ms = cpu_ms(lambda: lambda_paged_attention(query, cache, table, [0, n_q], [seq_len], pattern=pattern,
                                                   style=style, inv_freq=inv, scale=dh**-0.5, prerotated=pre))
        print(f"{seq_len:>8} {n_q:>8} {'pre-rotated' if pre else 'raw':>11} {ms:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
