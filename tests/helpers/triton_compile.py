"""Compiles the Triton kernels for a CUDA target (PTX, then cubin with the ptxas that
ships in the triton wheel) without a GPU: catches what the interpreter cannot (type and
layout errors, constexpr branches, register pressure that fails ptxas).

    python tests/helpers/triton_compile.py [--arch 90]

Each case calls the real entry point `lambda_paged_attention_triton` on CPU tensors with
the kernel launches intercepted, so the compiled signature, constexprs and num_warps are
exactly what a launch would use. Must run without TRITON_INTERPRET (the interpreter
replaces @triton.jit functions). Prints one line per compiled kernel."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "kernels"))

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
           torch.int64: "i64"}


def _type_of(x) -> str:
    if isinstance(x, torch.Tensor):
        return "*" + _DTYPES[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if abs(x) < 2**31 else "i64"
    if isinstance(x, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(x).__name__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import lminf_kernels.raw_triton as rt
    from lminf_kernels.pattern import LambdaPattern
    from lminf_kernels.rope import RopeStyle

    launches = []

    class Intercept:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.fn, args, kw))

    rt._lambda_attn_fwd, rt._merge_splits = Intercept(rt._lambda_attn_fwd), Intercept(rt._merge_splits)
    rt._middle_scores = Intercept(rt._middle_scores)
    compiled = 0

    def compile_launches(label: str) -> None:
        """Compile every launch intercepted since `launches` was cleared."""
        nonlocal compiled
        for fn, args, kw in launches:
            kw = dict(kw)
            num_warps = kw.pop("num_warps", 4)
            names = fn.arg_names
            signature = {n: _type_of(x) for n, x in zip(names, args)}
            signature.update({n: "constexpr" for n in kw})
            source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in kw.items()})
            kernel = triton.compile(source, target=GPUTarget("cuda", a.arch, 32), options={"num_warps": num_warps})
            compiled += 1
            print(f"compiled {fn.__name__} {label}: sm_{a.arch} cubin {len(kernel.asm['cubin'])} bytes", flush=True)

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rotary_dim, head_size in ((64, 64), (32, 80)):  # full rotary; partial with pass-through channels
            for tokens, with_lse in ((1, False), (40, False), (1, True), (40, True)):
                # decode (split KV, merge kernel) and a prefill chunk; with the log-sum-exp (top-k) or not
                launches.clear()
                hq, hkv, block = 8, 2, 16
                rt.lambda_paged_attention_triton(
                    torch.zeros(tokens, hq, head_size, dtype=dtype),
                    torch.zeros(8, hkv, block, 2 * head_size, dtype=dtype),
                    torch.arange(8, dtype=torch.int32)[None], [0, tokens], [100],
                    pattern=LambdaPattern(4, 32, 32), style=RopeStyle(rotary_dim, True),
                    inv_freq=torch.ones(rotary_dim // 2), scale=0.1, num_splits=2 if tokens == 1 else None,
                    lse=torch.zeros(tokens, hq) if with_lse else None)
                compile_launches(f"{dtype} rotary {rotary_dim}/{head_size} tokens {tokens}{' lse' if with_lse else ''}")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # top-k exact mode's middle logits
        for head_size in (64, 80):
            launches.clear()
            rt.middle_scores_triton(torch.zeros(2, 5, head_size), torch.zeros(8, 2, 16, head_size, dtype=dtype),
                                    torch.arange(8, dtype=torch.int32), 3, 40, 0.1)
            compile_launches(f"{dtype} head {head_size}")
    print(f"{compiled} kernels compiled for sm_{a.arch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
