"""KV memory per sequence and concurrency for a fixed KV budget: stock vLLM vs the plugin.

Block counts are measured on real engines (a tiny random Llama; the count of KV blocks
a sequence holds does not depend on the model's width), by stepping the engine and
recording the blocks each request holds at its peak. Bytes are then reported for
SmolLM2-135M's KV geometry (30 layers x 3 KV heads x 64, bfloat16). Stock vLLM is
measured up to --stock-max-len (full attention prefill is quadratic on CPU); beyond it
the stock count is cdiv(len, block) (exactly what it measured below), marked "computed".

With top-k middle attention (issue 15) the top-k layers keep every block and the others
free their middle: measured on the tiny model with layer 0 Λ and layer 1 top-k (one KV-cache
group each), then weighed for SmolLM2 with the default layers (4 Λ + 26 top-k).

    python benchmarks/kv_memory.py [--quick] [--out runs/kv_memory]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: helpers.engine, helpers.probe

from helpers.engine import run_engine  # noqa: E402
from helpers.tiny_checkpoint import make_tiny_llama  # noqa: E402

BLOCK = 128
SMOL_LAYERS = 30
SMOL_BYTES_PER_TOKEN = SMOL_LAYERS * 3 * 64 * 2 * 2  # layers * kv heads * head * (K,V) * bf16
SMOL_TOP_K_FROM = 4  # the default top_k_from_layer: layers 0-3 Λ, 4-29 keep every block


def measure(model, plugin, overrides, lengths, chunk, pool, max_len, concurrency):
    """One engine: peak blocks held by one sequence of each length, then how many
    sequences of `concurrency[0]` tokens run at once (`concurrency[1]` submitted, each
    decoding `concurrency[2]` tokens)."""
    engine = dict(max_model_len=max_len, block_size=BLOCK, max_num_batched_tokens=chunk,
                  enable_prefix_caching=False, num_gpu_blocks_override=pool, max_num_seqs=256)
    if overrides:
        engine["hf_overrides"] = overrides
    return run_engine(model, [], engine=engine, probe=blocks_held, plugin=plugin,
                      probe_args={"lengths": list(lengths), "concurrency": list(concurrency)},
                      env={"VLLM_CPU_KVCACHE_SPACE": "4"}, timeout=4 * 3600)["extra"]


def blocks_held(llm, results, *, lengths, concurrency) -> dict:
    """run_engine probe (runs in the engine's process): see `measure`."""
    from helpers import probe

    rows = [probe.track(llm, [[5] * (n - 8)], max_tokens=8, logprobs=False) for n in lengths]
    # long decodes keep finished prefills resident, so memory (not the per-step token
    # budget) is what limits how many run at once
    n, count, decode = concurrency
    conc = probe.track(llm, [[5] * (n - 8)] * count, max_tokens=decode, logprobs=False)
    return {"per_length": [r["peak_held"]["r0"] for r in rows], "bound": rows[0]["bound"],
            "max_running": conc["max_running"], "group_managers": rows[0]["group_managers"],
            "per_length_by_group": [r["peak_held_by_group"]["r0"] for r in rows]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small lengths only (CI smoke)")
    ap.add_argument("--out", type=Path, default=Path("runs/kv_memory"))
    ap.add_argument("--n-local", type=int, default=8192)
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--stock-max-len", type=int, default=32768)
    ap.add_argument("--budget-gib", type=float, default=4.0, help="KV budget for the concurrency figure")
    a = ap.parse_args(argv)

    if a.quick:
        lengths, a.n_local, a.stock_max_len, a.chunk = [512, 1024, 2048], 256, 2048, 256
    else:
        lengths = [1024 * 2**i for i in range(8)]  # 1K .. 128K
    a.out.mkdir(parents=True, exist_ok=True)
    overrides = {"lm_infinite": {"n_global": a.n_global, "n_local": a.n_local, "distance_limit": a.n_local}}
    budget_blocks = int(a.budget_gib * 2**30 // (SMOL_BYTES_PER_TOKEN * BLOCK))

    stock_lengths = [n for n in lengths if n <= a.stock_max_len]
    check_len = 2 * a.n_local if not a.quick else 1024
    n_req = 24 if not a.quick else 4
    decode = 320 if not a.quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        # trained length set past every length so stock vLLM accepts them all
        model = make_tiny_llama(Path(tmp) / "m", max_position_embeddings=max(lengths) + 64, seed=0)
        runs = {}
        top_k = {"lm_infinite": dict(overrides["lm_infinite"], top_k=5, top_k_from_layer=1)}
        for name, plugin, ov, lens in tqdm([("plugin", True, overrides, lengths),
                                             ("plugin_topk", True, top_k, lengths),
                                             ("stock", False, None, stock_lengths)], desc="engines"):
            runs[name] = measure(model, plugin, ov, lens, a.chunk, budget_blocks + 1, max(lengths) + 64,
                                 (min(check_len, max(lens)), n_req, decode))
    rows = []
    tk = runs["plugin_topk"]
    lam_group = tk["group_managers"].index("LambdaAttentionManager")
    for i, n in enumerate(lengths):
        ob = runs["plugin"]["per_length"][i]
        # top-k: blocks of one Λ layer and of one top-k layer, weighed by SmolLM2's layer counts
        lam_blocks, keep_blocks = tk["per_length_by_group"][i][lam_group], tk["per_length_by_group"][i][1 - lam_group]
        topk_layer_blocks = SMOL_TOP_K_FROM * lam_blocks + (SMOL_LAYERS - SMOL_TOP_K_FROM) * keep_blocks
        if i < len(stock_lengths):
            stock_blocks, stock_how = runs["stock"]["per_length"][i], "measured"
        else:
            stock_blocks, stock_how = math.ceil(n / BLOCK), "computed"
        rows.append({
            "length": n,
            "plugin_blocks": ob, "plugin_bound": runs["plugin"]["bound"],
            "stock_blocks": stock_blocks, "stock": stock_how,
            "plugin_bytes_smollm2": ob * BLOCK * SMOL_BYTES_PER_TOKEN,
            "stock_bytes_smollm2": stock_blocks * BLOCK * SMOL_BYTES_PER_TOKEN,
            "plugin_max_concurrency": budget_blocks // ob,
            "topk_lambda_blocks": lam_blocks, "topk_keep_blocks": keep_blocks,
            "topk_bytes_smollm2": topk_layer_blocks * BLOCK * SMOL_BYTES_PER_TOKEN // SMOL_LAYERS,
            "topk_max_concurrency": budget_blocks * SMOL_LAYERS // topk_layer_blocks,
            "stock_max_concurrency": budget_blocks // stock_blocks,
        })
    conc = {"plugin": runs["plugin"]["max_running"], "stock": runs["stock"]["max_running"]}
    result = {
        "block_size": BLOCK, "n_local": a.n_local, "n_global": a.n_global, "chunk": a.chunk,
        "budget_gib": a.budget_gib, "budget_blocks": budget_blocks, "rows": rows,
        "concurrency_check": {"plugin_length": check_len, "stock_length": min(check_len, max(stock_lengths)),
                              "requests": n_req, "max_running": conc},
    }
    (a.out / "kv_memory.json").write_text(json.dumps(result, indent=2))
    print(f"{'length':>8} {'stock MiB':>10} {'plugin MiB':>11} {'ratio':>6} {'top-k MiB':>10} {'stock conc':>10} "
          f"{'plugin conc':>11} {'top-k conc':>10}")
    for r in rows:
        print(f"{r['length']:>8} {r['stock_bytes_smollm2'] / 2**20:>10.0f}{'*' if r['stock'] == 'computed' else ' '}"
              f"{r['plugin_bytes_smollm2'] / 2**20:>10.0f} {r['stock_blocks'] / r['plugin_blocks']:>6.1f}"
              f" {r['topk_bytes_smollm2'] / 2**20:>10.0f} {r['stock_max_concurrency']:>10}"
              f" {r['plugin_max_concurrency']:>11} {r['topk_max_concurrency']:>10}")
    print(f"(* computed: cdiv(len, {BLOCK}) blocks)  concurrency check on the {budget_blocks}-block pool, "
          f"{n_req} requests submitted: plugin ran {conc['plugin']} at once ({check_len} tokens each), "
          f"stock {conc['stock']} ({min(check_len, max(stock_lengths))} tokens each)")
    plot(result, a.out / "kv_memory.png")
    print(f"wrote {a.out / 'kv_memory.json'} and {a.out / 'kv_memory.png'}")
    return 0


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["length"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(x, [r["stock_bytes_smollm2"] / 2**20 for r in rows], "o-", label="stock vLLM")
    ax1.plot(x, [r["plugin_bytes_smollm2"] / 2**20 for r in rows], "s-", label="vllm-lminf")
    ax1.plot(x, [r["topk_bytes_smollm2"] / 2**20 for r in rows], "^-", label="vllm-lminf, top-k (layers 4-29 keep all)")
    for r in rows:
        if r["stock"] == "computed":
            ax1.plot([r["length"]], [r["stock_bytes_smollm2"] / 2**20], "o", mfc="white", color="C0")
    ax1.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="KV held per sequence (MiB)",
            title="KV per sequence (SmolLM2-135M geometry, bf16)")
    ax1.legend()
    ax2.plot(x, [r["stock_max_concurrency"] for r in rows], "o-", label="stock vLLM")
    ax2.plot(x, [r["plugin_max_concurrency"] for r in rows], "s-", label="vllm-lminf")
    ax2.plot(x, [r["topk_max_concurrency"] for r in rows], "^-", label="vllm-lminf, top-k")
    ax2.set(xscale="log", yscale="log", xlabel="sequence length (tokens)", ylabel="max concurrent sequences",
            title=f"concurrency in a {result['budget_gib']:g} GiB KV budget")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
