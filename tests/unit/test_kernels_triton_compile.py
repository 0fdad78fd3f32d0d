"""The Triton kernels compile to cubin for CUDA targets on a machine without a GPU (the
interpreter tests in test_kernels_triton.py check their results, not that they build)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "triton_compile.py"


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_cuda(arch):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(HELPER), "--arch", str(arch)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"42 kernels compiled for sm_{arch}" in out.stdout, out.stdout[-2000:]
