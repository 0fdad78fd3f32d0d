"""Multi-turn long conversations with prefix caching: how much of a follow-up turn the
prefix cache answers, stock vLLM vs vllm-lminf, on one pool that holds fewer than C
full histories.

For each length N: C conversations each send a first turn of N tokens and get an answer,
one after another; then each sends a follow-up (its history: prompt + answer, plus 64 new
tokens) after the other conversations have churned the pool. Per turn: time to first
token, tokens answered from the prefix cache (`num_cached_tokens`), and vLLM's own
prefix-cache counters (queries / hits, `disable_log_stats=False`); per conversation the
KV blocks held at the peak. One engine per (config, N), prefix caching on, the same pool
size for both configs: enough for one sequence of the longest turn plus, for the plugin,
every conversation's global blocks and window (so the pool holds fewer than C histories).

    python benchmarks/multiturn.py                          # SmolLM2-135M, N = 16K, 32K, C = 3
    python benchmarks/multiturn.py --lengths 16384 --conversations 4
    python benchmarks/multiturn.py --quick                  # tiny random model, a minute (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: helpers.engine, helpers.probe

from helpers.engine import run_engine  # noqa: E402

CONFIG_NAMES = ("stock", "lminf")


def conversation_ids(conv: int, n: int, salt: int = 0) -> list[int]:
    """Deterministic token ids, different for every conversation (so no shared prefix)."""
    return [(7919 * (conv + 1) + 104729 * salt + 31 * j + (j * j) % 97) % 20000 + 100 for j in range(n)]


def timed_turns(llm, results, *, cfg: dict) -> dict:
    """run_engine probe: the first turns, then the follow-ups, one request at a time."""
    from vllm import SamplingParams, TokensPrompt

    from helpers import probe

    mgr = probe.kv_manager(llm)
    single = mgr.coordinator.single_type_managers[0]
    pool = mgr.block_pool
    params = SamplingParams(max_tokens=cfg["answer_tokens"], temperature=0.0, ignore_eos=True)

    def prefix_counters() -> tuple[float, float]:
        """vLLM's Prometheus counters vllm:prefix_cache_queries / _hits (tokens)."""
        got = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:prefix_cache_")}
        return got.get("vllm:prefix_cache_queries", 0.0), got.get("vllm:prefix_cache_hits", 0.0)

    def serve(name: str, ids: list[int]) -> dict:
        queries0, hits0 = prefix_counters()
        llm.llm_engine.add_request(name, TokensPrompt(prompt_token_ids=ids), params)
        t0 = time.perf_counter()
        first, peak, out = None, 0, None
        while llm.llm_engine.has_unfinished_requests():
            for o in llm.llm_engine.step():
                if o.finished:
                    out = o
            peak = max(peak, sum(sum(not b.is_null for b in blocks) for blocks in single.req_to_blocks.values()))
            running = probe._core(llm).scheduler.running
            if first is None and running and all(r.num_output_tokens > 0 for r in running):
                first = time.perf_counter()
        t1 = time.perf_counter()
        queries1, hits1 = prefix_counters()
        return {"prompt_tokens": len(ids), "ttft_s": (first or t1) - t0, "total_s": t1 - t0,
                "cached_tokens": out.num_cached_tokens or 0, "answer": list(out.outputs[0].token_ids),
                "vllm_prefix_queries": queries1 - queries0, "vllm_prefix_hits": hits1 - hits0,
                "peak_kv_blocks": peak, "blocks_in_use_after": pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()}

    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.llm_engine.add_request("warm", TokensPrompt(prompt_token_ids=[7] * 64), warm)
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    n, c = cfg["length"], cfg["conversations"]
    firsts = []
    for i in range(c):
        firsts.append(serve(f"c{i}-t1", conversation_ids(i, n)))
    follow = []
    for i in range(c):
        history = conversation_ids(i, n) + firsts[i]["answer"]
        follow.append(serve(f"c{i}-t2", history + conversation_ids(i, cfg["new_tokens"], salt=1)))
    for row in firsts + follow:
        row.pop("answer")
    return {"first": firsts, "follow_up": follow, "pool_blocks": pool.num_gpu_blocks,
            "block_size": single.block_size, "page_bytes": single.kv_cache_spec.page_size_bytes}


def pool_tokens(n: int, c: int, window: int, n_global: int, chunk: int, block: int, turn_extra: int) -> int:
    """One sequence of the longest turn (prompt + new tokens + answer) with a chunk of slack,
    and room for every conversation's global blocks and window (with a block at each edge)."""
    one_sequence = n + turn_extra + chunk
    per_conversation = window + n_global + 2 * block
    return max(one_sequence, c * per_conversation + window + chunk + 2 * block)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2-135m"))
    ap.add_argument("--lengths", default="16384,32768")
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--window", type=int, default=None, help="n_local = distance_limit (default: trained length)")
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--configs", default="stock,lminf")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--out", type=Path, default=Path("runs/multiturn"))
    a = ap.parse_args(argv)
    wanted = a.configs.split(",")
    if bad := [n for n in wanted if n not in CONFIG_NAMES]:
        ap.error(f"--configs: unknown {bad}; allowed: {', '.join(CONFIG_NAMES)}")
    if a.conversations < 2:
        ap.error(f"--conversations must be >= 2 (a follow-up must come after another conversation), "
                 f"got {a.conversations}")

    tmp = tempfile.TemporaryDirectory()
    if a.quick:
        from helpers.tiny_checkpoint import make_tiny_llama

        model = make_tiny_llama(Path(tmp.name) / "m", max_position_embeddings=256, vocab_size=20200)
        a.lengths, a.window, a.dtype, a.chunk, a.block_size, a.n_global = "2048", 128, "float32", 256, 32, 4
    else:
        from vllm_lminf.tools import smollm2

        smollm2.main(["--out", str(a.model_dir)])
        model = a.model_dir
    cfg_json = json.loads((Path(model) / "config.json").read_text())
    trained = cfg_json["max_position_embeddings"]
    window = a.window or trained
    lengths = [int(x) for x in a.lengths.split(",")]
    turn_extra = a.answer_tokens + a.new_tokens
    cores = os.cpu_count() or 1
    env = {"OMP_NUM_THREADS": str(cores), "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_KVCACHE_SPACE": "8"}
    a.out.mkdir(parents=True, exist_ok=True)
    results = {"model": str(model), "window": window, "n_global": a.n_global, "dtype": a.dtype, "chunk": a.chunk,
               "conversations": a.conversations, "new_tokens": a.new_tokens, "answer_tokens": a.answer_tokens,
               "date": time.strftime("%Y-%m-%d"), "cores": cores, "num_layers": cfg_json["num_hidden_layers"],
               "runs": {}}
    jobs = [(n, name) for n in lengths for name in wanted]
    for n, name in tqdm(jobs, desc="lengths x configs"):
        tokens = pool_tokens(n, a.conversations, window, a.n_global, a.chunk, a.block_size, turn_extra)
        blocks = -(-tokens // a.block_size) + 1  # + vLLM's null block
        max_len = n + turn_extra + 8
        overrides = {}
        if name == "lminf":
            overrides["lm_infinite"] = {"n_global": a.n_global, "n_local": window, "distance_limit": window}
        elif max_len > trained:
            overrides["max_position_embeddings"] = max_len  # let stock accept the long prompts
        engine = dict(max_model_len=max_len, dtype=a.dtype, max_num_batched_tokens=a.chunk, max_num_seqs=4,
                      block_size=a.block_size, enable_prefix_caching=True, num_gpu_blocks_override=blocks,
                      disable_log_stats=False, hf_overrides=overrides, skip_tokenizer_init=True,
                      enforce_eager=a.quick)
        spec = {"length": n, "conversations": a.conversations, "new_tokens": a.new_tokens,
                "answer_tokens": a.answer_tokens}
        t = time.time()
        out = run_engine(model, [], engine=engine, plugin=name != "stock", env=env, probe=timed_turns,
                         probe_args={"cfg": spec}, timeout=6 * 3600)["extra"]
        results["runs"].setdefault(str(n), {})[name] = out
        tqdm.write(f"{name} N={n}: {time.time() - t:.0f}s")
        (a.out / "multiturn.json").write_text(json.dumps(results, indent=2))
    report(results, a.out)
    return 0


def report(results: dict, out: Path) -> None:
    summary = {}
    print(f"{'N':>6} {'config':>6} | {'turn-1 TTFT s':>13} | {'follow-up TTFT s':>16} | {'ratio':>11} | "
          f"{'cached / prompt tokens':>22} | {'peak KV MiB':>11}")
    for n, runs in results["runs"].items():
        for name, run in runs.items():
            first = [r["ttft_s"] for r in run["first"]]
            follow = [r["ttft_s"] for r in run["follow_up"]]
            ratios = [f / t for f, t in zip(follow, first)]
            cached = sum(r["cached_tokens"] for r in run["follow_up"])
            prompt = sum(r["prompt_tokens"] for r in run["follow_up"])
            peak_blocks = max(r["peak_kv_blocks"] for r in run["first"] + run["follow_up"])
            peak = peak_blocks * run["page_bytes"] * results["num_layers"]
            summary.setdefault(n, {})[name] = {
                "first_ttft_s": first, "follow_up_ttft_s": follow, "follow_over_first": ratios,
                "follow_over_first_median": statistics.median(ratios),
                "follow_up_cached_tokens": [r["cached_tokens"] for r in run["follow_up"]],
                "follow_up_prompt_tokens": [r["prompt_tokens"] for r in run["follow_up"]],
                "follow_up_hit_rate": cached / prompt,
                "vllm_hit_rate": (sum(r["vllm_prefix_hits"] for r in run["follow_up"])
                                  / max(1, sum(r["vllm_prefix_queries"] for r in run["follow_up"]))),
                "pool_blocks": run["pool_blocks"], "block_size": run["block_size"],
                "peak_kv_blocks": peak_blocks, "peak_kv_bytes": peak,
            }
            print(f"{n:>6} {name:>6} | {statistics.median(first):>13.2f} | {statistics.median(follow):>16.3f} | "
                  f"{min(ratios):.3f}-{max(ratios):.3f} | {cached:>10} / {prompt:<10} | "
                  f"{peak / 2**20:>11.1f}")
    results["summary"] = summary
    (out / "multiturn.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "multiturn.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({name for runs in summary.values() for name in runs})
    lengths = list(summary)
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        xs = [i + k * width for i in range(len(lengths))]
        ratio = [summary[n][name]["follow_over_first_median"] if name in summary[n] else 0 for n in lengths]
        hit = [summary[n][name]["follow_up_hit_rate"] if name in summary[n] else 0 for n in lengths]
        axes[0].bar(xs, ratio, width, label=name)
        axes[1].bar(xs, hit, width, label=name)
    for ax, title in ((axes[0], "follow-up TTFT / first-turn TTFT (median)"),
                      (axes[1], "follow-up tokens from the prefix cache")):
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(lengths))])
        ax.set_xticklabels([f"N={n}" for n in lengths])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{results['conversations']} conversations, +{results['new_tokens']} tokens per follow-up, "
                 f"one pool ({results['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
