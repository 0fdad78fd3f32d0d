"""Builds and loads the C++ kernels (`csrc/absolute_cpu.cpp`: Λ attention, top-k middle
attention in exact and block mode, CLEX's key re-rotation) on first use.

Compiled with the local compiler for this CPU (`-march=native`) into torch's extension
cache; later processes load the cached library. Where no compiler works, the ops are None
and callers use the torch paths, which compute the same result.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent / "csrc" / "absolute_cpu.cpp"
DISABLE_ENV = "LMINF_CPU_EXTENSION"  # "0" forces the torch path


@functools.cache
def _library_loaded() -> bool:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return False
    try:
        from torch.utils.cpp_extension import load

        load(
            name="lminf_absolute_cpu",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-DNDEBUG"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no headers: same results, slower
        log.warning("vllm-lminf: C++ kernel unavailable (%s); using the torch path", exc)
        return False
    return True


def lambda_op():
    """torch.ops.lminf_cpu.lambda_rows, or None (disabled or failed to build)."""
    return torch.ops.lminf_cpu.lambda_rows if _library_loaded() else None


def rerotate_op():
    """torch.ops.lminf_cpu.rerotate_keys, or None (disabled or failed to build)."""
    return torch.ops.lminf_cpu.rerotate_keys if _library_loaded() else None


def middle_topk_op():
    """torch.ops.lminf_cpu.middle_topk_merge, or None (disabled or failed to build)."""
    return torch.ops.lminf_cpu.middle_topk_merge if _library_loaded() else None


def middle_blocks_op():
    """torch.ops.lminf_cpu.middle_blocks_merge, or None (disabled or failed to build)."""
    return torch.ops.lminf_cpu.middle_blocks_merge if _library_loaded() else None
