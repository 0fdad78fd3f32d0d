"""Throughput of `python -m vllm_lminf.batch` with 1 vs N engine replicas on this machine.

The same prompt set (random token ids, all past the model's trained length, LM-Infinite
on) runs through the batch command once per replica count, each run in a fresh output
file. Reported per run: end-to-end wall time (Ray and engine start-up included) and the
generation throughput over the window from the first engine call to the last result
(the batch command's --stats-json), plus the scaling ratio of each against 1 replica.

    python benchmarks/batch_scaling.py [--quick] [--model tiny|DIR] [--replicas 1 2]
                                       [--out runs/batch_scaling]

The default model is a tiny random Llama (trained length 128) so that a run takes a few
minutes on 2 CPU cores; `--model models/smollm2-135m --min-len 9000 --max-len 12000`
measures SmolLM2 past its 8192 positions (much slower on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: helpers.engine, helpers.tiny_checkpoint

from helpers.engine import TEST_ENV, with_harness_path  # noqa: E402
from helpers.tiny_checkpoint import make_tiny_llama  # noqa: E402


def write_prompts(path: Path, n: int, lo: int, hi: int, vocab: int, seed: int) -> int:
    rng = random.Random(seed)
    total = 0
    with open(path, "w") as f:
        for i in range(n):
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]
            total += len(ids)
            f.write(json.dumps({"id": i, "prompt_token_ids": ids}) + "\n")
    return total


def run_batch(model: str, prompts: Path, workdir: Path, replicas: int, a) -> dict:
    out = workdir / f"out_r{replicas}.jsonl"
    stats = workdir / f"stats_r{replicas}.json"
    engine = {"dtype": "float32", "enforce_eager": True, "seed": 0,
              "max_model_len": a.max_len + a.max_tokens + 16,
              "hf_overrides": {"lm_infinite": {"n_global": a.n_global, "n_local": a.n_local}}}
    cmd = [sys.executable, "-m", "vllm_lminf.batch", "--model", model, "--input", str(prompts),
           "--output", str(out), "--replicas", str(replicas), "--batch-size", str(a.batch_size),
           "--max-tokens", str(a.max_tokens), "--sampling", '{"ignore_eos": true}',
           "--engine-args", json.dumps(engine), "--num-cpus", str(a.num_cpus),
           "--env", f"VLLM_CPU_KVCACHE_SPACE={a.kv_gib}", "--stats-json", str(stats), "--no-progress",
           # all engines up before the first prompt: the window measures N engines at work
           "--wait-replicas", str(a.timeout)]
    env = with_harness_path(dict(os.environ, **TEST_ENV))
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"batch run with {replicas} replicas failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    s = json.loads(stats.read_text())
    return {
        "replicas": replicas,
        "wall_s": round(wall, 2),
        "prompts": s["completed"],
        "completion_tokens": s["completion_tokens"],
        "prompt_tokens": s["prompt_tokens"],
        "generate_window_s": s["generate_window_s"],
        "prompts_per_s": s["prompts_per_s"],
        "e2e_prompts_per_s": round(s["completed"] / wall, 4),
        "tokens_per_s": round((s["prompt_tokens"] + s["completion_tokens"]) / s["generate_window_s"], 1),
        "per_replica": s["replicas"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke: a few short prompts, 2 replicas only")
    ap.add_argument("--model", default="tiny", help="'tiny' (generated) or a checkpoint directory")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=768)
    ap.add_argument("--max-len", type=int, default=1536)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-global", type=int, default=4)
    ap.add_argument("--n-local", type=int, default=64)
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray cluster")
    ap.add_argument("--kv-gib", type=int, default=1, help="KV cache per replica (GiB)")
    ap.add_argument("--timeout", type=int, default=1800, help="per run (s)")
    ap.add_argument("--out", type=Path, default=Path("runs/batch_scaling"))
    a = ap.parse_args(argv)
    if a.quick:
        a.replicas, a.num_prompts, a.min_len, a.max_len, a.max_tokens, a.batch_size = [2], 4, 200, 300, 4, 2
    base = min(a.replicas)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.model == "tiny":
            model = str(make_tiny_llama(tmp / "tiny", max_position_embeddings=128, seed=1))
            trained, vocab = 128, 380
        else:
            model = a.model
            cfg = json.loads(Path(model, "config.json").read_text())
            trained, vocab = cfg["max_position_embeddings"], cfg["vocab_size"]
        prompts = tmp / "prompts.jsonl"
        n_tokens = write_prompts(prompts, a.num_prompts, a.min_len, a.max_len, vocab, seed=0)
        print(f"{a.num_prompts} prompts, {a.min_len}-{a.max_len} tokens ({n_tokens} in all, trained length "
              f"{trained}), {a.max_tokens} new tokens each, LM-Infinite G={a.n_global} W={a.n_local}, "
              f"batch size {a.batch_size}, {a.num_cpus} CPUs", flush=True)
        runs = []
        for r in a.replicas:
            res = run_batch(model, prompts, tmp, r, a)
            runs.append(res)
            print(f"  {r} replica(s): {res['wall_s']:.1f} s end to end, {res['prompts_per_s']} prompts/s "
                  f"while generating", flush=True)
        outputs = {r: sorted(Path(tmp, f"out_r{r}.jsonl").read_text().split("\n")[:-1]) for r in a.replicas}

    # The same greedy tokens whatever the replica count.
    def tokens(lines):
        return {json.loads(x)["id"]: json.loads(x)["token_ids"] for x in lines}

    same = all(tokens(outputs[r]) == tokens(outputs[base]) for r in a.replicas)
    ref = next(x for x in runs if x["replicas"] == base)
    for x in runs:
        x["scaling_generate"] = round(x["prompts_per_s"] / ref["prompts_per_s"], 3)
        x["scaling_e2e"] = round(ref["wall_s"] / x["wall_s"], 3)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "trained_length": trained,
        "prompt_tokens_total": n_tokens,
        "same_tokens_across_replica_counts": same,
        "runs": runs,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    head = f"{'replicas':>8} {'wall s':>8} {'gen window s':>13} {'prompts/s':>10} {'tok/s':>9} {'scaling (gen)':>14} {'scaling (e2e)':>14}"
    print(head)
    for x in runs:
        print(f"{x['replicas']:>8} {x['wall_s']:>8.1f} {x['generate_window_s']:>13.2f} {x['prompts_per_s']:>10.3f} "
              f"{x['tokens_per_s']:>9.1f} {x['scaling_generate']:>14.2f} {x['scaling_e2e']:>14.2f}")
    print(f"same tokens across replica counts: {same}; results in {a.out / 'results.json'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
