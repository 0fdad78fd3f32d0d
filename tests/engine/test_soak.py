"""The server soak (`benchmarks/soak.py --quick`) in the suite: a tiny model behind
`python -m vllm_lminf serve`, 64 concurrent requests (streaming and not, client hang-ups
before the first token and mid-decode, bad inputs, prompts past the trained length) on a
pool one sequence's bound plus 3 blocks; every completed request equals the same request
sent alone, the idle server holds no KV, it stays up and shuts down cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.engine import TEST_ENV, with_harness_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_soak_quick(tmp_path, seed):
    env = with_harness_path(dict(os.environ, **TEST_ENV))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--quick", "--seed", str(seed),
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=1200)
    out = json.loads((tmp_path / "soak.json").read_text())
    fig = out["figures"]
    assert proc.returncode == 0, (fig["checks"], out["mismatches"], proc.stdout[-3000:], proc.stderr[-3000:])
    assert all(fig["checks"].values())
    assert fig["requests"] == 64 and fig["completed_compared"] >= 30
    assert fig["past_trained_length"] >= 1 and fig["bad_inputs"] >= 1
    assert fig["aborts_before_first_token"] + fig["aborts_mid_decode"] >= 1
