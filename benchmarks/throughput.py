"""Throughput across lengths: stock vLLM (full attention), vllm-lminf (Λ, bounded KV) and
vLLM's own sliding window at the same window, on the same machine, in one run.

For every (config, length, batch): time to first token of the batch (= prefill time),
prefill tok/s, decode tok/s over the following steps, and the KV blocks the batch held at
its peak. One engine per config (a subprocess); lengths and batches run inside it.

    python benchmarks/throughput.py                 # SmolLM2-135M, 1K .. 32K, batch 1 and 4
    python benchmarks/throughput.py --quick         # tiny random model, seconds (CI smoke)
    python benchmarks/throughput.py --lengths 1024,8192,32768,65536 --batches 1
    python benchmarks/throughput.py --lengths 2048,8192 --configs stock,lminf --rounds 3

--rounds N runs every config N times, in fresh engines, alternating the config order
(A B, B A, A B, ...) so slow drift of a shared machine hits both alike; every cell then
reports the median over rounds and keeps each round's value.
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


def measure(llm, results, *, cfg: dict) -> list[dict]:
    """run_engine probe (runs in the engine's process): for every (length, batch) in `cfg`,
    time to first token, prefill and decode tok/s and the peak KV blocks held."""
    from vllm import SamplingParams, TokensPrompt

    from helpers import probe

    mgr = probe.kv_manager(llm)
    managers = mgr.coordinator.single_type_managers
    groups = mgr.kv_cache_config.kv_cache_groups
    # a pool block holds one page for each layer of a group (hybrid groups share the pool:
    # a block costs the largest group's layers; one group: every layer)
    page_bytes = managers[0].kv_cache_spec.page_size_bytes * max(len(g.layer_names) for g in groups)
    rows = []
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.llm_engine.add_request("warm", TokensPrompt(prompt_token_ids=[7] * 64), warm)
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    for n in cfg["lengths"]:
        for b in cfg["batches"]:
            if n > cfg["max_len_for"].get(str(b), 1 << 62):
                continue
            params = SamplingParams(max_tokens=cfg["decode_tokens"], temperature=0.0, ignore_eos=True)
            for i in range(b):
                ids = [(97 * (i + 1) + 31 * j) % 20000 + 100 for j in range(n)]
                llm.llm_engine.add_request(f"q{n}-{b}-{i}", TokensPrompt(prompt_token_ids=ids), params)
            t0 = time.perf_counter()
            first, peak = None, 0
            while llm.llm_engine.has_unfinished_requests():
                llm.llm_engine.step()
                held = sum(sum(not blk.is_null for blk in blocks)
                           for m in managers for blocks in m.req_to_blocks.values())
                peak = max(peak, held)
                sched = probe._core(llm).scheduler
                if first is None and all(r.num_output_tokens > 0 for r in sched.running) and not sched.waiting:
                    first = time.perf_counter()
            t1 = time.perf_counter()
            ttft = first - t0
            rows.append({"length": n, "batch": b, "ttft_s": ttft, "prefill_tok_s": n * b / ttft,
                         "decode_tok_s": b * (cfg["decode_tokens"] - 1) / (t1 - first),
                         "peak_kv_blocks": peak, "peak_kv_bytes": peak * page_bytes})
    return rows


CONFIG_NAMES = ("stock", "lminf", "lminf_topk", "lminf_topk_blocks", "stock_swa", "clex", "yarn")


def configs(window: int, n_global: int, trained: int, factor: int, rope_theta: float):
    """clex: the plugin on a CLEX variant of the model (`--clex-factor`); yarn: stock vLLM's
    YaRN at the same factor, what a user would pick instead."""
    lminf = {"n_global": n_global, "n_local": window, "distance_limit": window}
    yarn = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": trained,
            "rope_theta": rope_theta}
    return {
        "stock": dict(plugin=False, overrides={}),
        "lminf": dict(plugin=True, overrides={"lm_infinite": lminf}),
        # exact top-k middle attention at the plugin's defaults (k 5, layers 4.., last rows)
        "lminf_topk": dict(plugin=True, overrides={"lm_infinite": dict(lminf, top_k=5)}),
        # block mode: the 4 best middle blocks (of 128 tokens: 512 keys) per query head
        "lminf_topk_blocks": dict(plugin=True, overrides={"lm_infinite": dict(lminf, top_k_blocks=4)}),
        "stock_swa": dict(plugin=False, overrides={"sliding_window": window}),
        "clex": dict(plugin=True, overrides={}, clex=True),
        # YaRN configs carry the scaled length in max_position_embeddings (as vLLM and
        # transformers read them), the trained one in original_max_position_embeddings
        "yarn": dict(plugin=False, overrides={"rope_parameters": yarn, "max_position_embeddings": trained * factor},
                     scaled=True),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2-135m"))
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--window", type=int, default=None, help="n_local = distance_limit (default: trained length)")
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--decode-tokens", type=int, default=33)
    ap.add_argument("--configs", default="stock,lminf,stock_swa")
    ap.add_argument("--stock-max-len", type=int, default=1 << 62,
                    help="skip stock full attention above this length (quadratic prefill)")
    ap.add_argument("--batch-max-len", default="",
                    help="skip long prompts at big batches, e.g. '4:8192' (batch 4 only up to 8K tokens)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-gib", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--out", type=Path, default=Path("runs/throughput"))
    ap.add_argument("--rounds", type=int, default=1, help="fresh engines per config, order alternating; medians")
    ap.add_argument("--clex-factor", type=int, default=4, help="max_factor of the clex config, factor of yarn")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {a.rounds}")
    wanted = a.configs.split(",")
    if bad := [n for n in wanted if n not in CONFIG_NAMES]:
        ap.error(f"--configs: unknown {bad}; allowed: {', '.join(CONFIG_NAMES)}")

    tmp = tempfile.TemporaryDirectory()
    if a.quick:
        from helpers.tiny_checkpoint import make_tiny_llama

        model = make_tiny_llama(Path(tmp.name) / "m", max_position_embeddings=256, vocab_size=20200)
        a.lengths, a.batches, a.window, a.decode_tokens, a.dtype, a.kv_gib, a.chunk = "256,1024", "1,2", 256, 5, "float32", 1, 512
    else:
        from vllm_lminf.tools import smollm2

        smollm2.main(["--out", str(a.model_dir)])
        model = a.model_dir
    cfg_json = json.loads((Path(model) / "config.json").read_text())
    trained = cfg_json["max_position_embeddings"]
    rope_theta = cfg_json.get("rope_theta") or (cfg_json.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    window = a.window or trained
    lengths = [int(x) for x in a.lengths.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    max_len = max(lengths) + a.decode_tokens + 8
    a.out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    # every core for the engine (the test defaults pin one thread), both configs alike
    env = {"VLLM_CPU_KVCACHE_SPACE": str(a.kv_gib), "OMP_NUM_THREADS": str(cores),
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}
    results = {"machine": machine(), "model": str(model), "window": window, "n_global": a.n_global,
               "dtype": a.dtype, "chunk": a.chunk, "decode_tokens": a.decode_tokens, "rounds": a.rounds, "runs": {}}
    order = [(r, name) for r in range(a.rounds) for name in (wanted if r % 2 == 0 else wanted[::-1])]
    per_round: dict[str, list[list[dict]]] = {name: [] for name in wanted}
    for rnd, name in tqdm(order, desc="configs x rounds"):
        c = configs(window, a.n_global, trained, a.clex_factor, rope_theta)[name]
        overrides = dict(c["overrides"])
        if not c["plugin"] and not c.get("scaled") and max_len > trained:
            overrides["max_position_embeddings"] = max_len  # let stock accept the long prompts
        engine_model = model
        if c.get("clex"):
            from helpers.tiny_checkpoint import with_clex

            engine_model = with_clex(model, Path(str(model) + f"-clex{a.clex_factor}"), max_factor=a.clex_factor)
        spec = {"lengths": [n for n in lengths if name != "stock" or n <= a.stock_max_len],
                "batches": batches, "decode_tokens": a.decode_tokens,
                "num_layers": cfg_json["num_hidden_layers"],
                "max_len_for": {b: int(n) for b, n in (kv.split(":") for kv in a.batch_max_len.split(",") if kv)}}
        engine = dict(max_model_len=max_len, dtype=a.dtype, max_num_batched_tokens=a.chunk,
                      max_num_seqs=max(batches), enable_prefix_caching=False, hf_overrides=overrides,
                      skip_tokenizer_init=True, enforce_eager=a.quick)  # compiled for real runs
        t = time.time()
        out = run_engine(engine_model, [], engine=engine, plugin=c["plugin"], env=env,
                         probe=measure, probe_args={"cfg": spec}, timeout=6 * 3600)
        per_round[name].append(out["extra"])
        results["runs"][name] = combine_rounds(per_round[name])
        tqdm.write(f"{name} (round {rnd + 1}/{a.rounds}): {time.time() - t:.0f}s")
        (a.out / "throughput.json").write_text(json.dumps(results, indent=2))
    report(results, a.out)
    return 0


MEASURED = ("ttft_s", "prefill_tok_s", "decode_tok_s")
# (plugin config, what a user would run instead): the ratios report() writes
COMPARED = (("lminf", "stock"), ("lminf", "stock_swa"), ("lminf_topk", "stock"), ("lminf_topk_blocks", "lminf"),
            ("lminf_topk", "lminf"), ("clex", "yarn"))


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (length, batch): the median of each measured value over the rounds,
    each round's values kept under "by_round"."""
    rows = []
    for cell in zip(*rounds):  # every round measured the same cells in the same order
        row = dict(cell[0])
        for key in MEASURED:
            row[key] = statistics.median(r[key] for r in cell)
        row["by_round"] = {key: [r[key] for r in cell] for key in MEASURED}
        rows.append(row)
    return rows


def machine() -> dict:
    flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = " ".join(f for f in line.split()[2:] if f.startswith(("avx512", "amx", "avx2")))
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "mem_gib": round(mem, 1), "cpu_flags": flags,
            "date": time.strftime("%Y-%m-%d")}


def report(results: dict, out: Path) -> None:
    runs = results["runs"]
    keys = sorted({(r["length"], r["batch"]) for rows in runs.values() for r in rows})
    get = {name: {(r["length"], r["batch"]): r for r in rows} for name, rows in runs.items()}
    head = f"{'len':>7} {'b':>2} | " + " | ".join(f"{n:>28}" for n in runs)
    print(head + "\n" + " " * 11 + "| " + " | ".join(f"{'ttft s':>8} {'dec tok/s':>9} {'KV MiB':>9}" for _ in runs))
    for k in keys:
        cells = []
        for n in runs:
            r = get[n].get(k)
            cells.append(f"{r['ttft_s']:>8.2f} {r['decode_tok_s']:>9.1f} {r['peak_kv_bytes'] / 2**20:>9.0f}"
                         if r else f"{'-':>28}")
        print(f"{k[0]:>7} {k[1]:>2} | " + " | ".join(cells))
    ratios = {}
    for ours, theirs in COMPARED:
        for k in keys:
            a, b = get.get(ours, {}).get(k), get.get(theirs, {}).get(k)
            if not (a and b):
                continue
            cell = f"{k[0]}x{k[1]}"
            # > 1 means `ours` is faster: decode tok/s over theirs, their TTFT over ours
            ratios.setdefault(f"decode_{ours}_over_{theirs}", {})[cell] = a["decode_tok_s"] / b["decode_tok_s"]
            ratios.setdefault(f"ttft_speedup_{ours}_over_{theirs}", {})[cell] = b["ttft_s"] / a["ttft_s"]
            ar, br = a.get("by_round", {}), b.get("by_round", {})
            if len(ar.get("ttft_s", [])) > 1:  # round by round: each round's engines ran back to back
                ratios.setdefault(f"decode_{ours}_over_{theirs}_by_round", {})[cell] = [
                    x / y for x, y in zip(ar["decode_tok_s"], br["decode_tok_s"])]
                ratios.setdefault(f"ttft_speedup_{ours}_over_{theirs}_by_round", {})[cell] = [
                    y / x for x, y in zip(ar["ttft_s"], br["ttft_s"])]
    results["ratios"] = ratios
    (out / "throughput.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(ratios, indent=1))
    plot(results, out / "throughput.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, rows in results["runs"].items():
        for b in sorted({r["batch"] for r in rows}):
            rs = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["length"])
            x = [r["length"] for r in rs]
            style = dict(marker="o", label=f"{name} b={b}")
            axes[0].plot(x, [r["ttft_s"] for r in rs], **style)
            axes[1].plot(x, [r["decode_tok_s"] for r in rs], **style)
            axes[2].plot(x, [r["peak_kv_bytes"] / 2**20 for r in rs], **style)
    lengths = sorted({r["length"] for rows in results["runs"].values() for r in rows})
    for ax, title in zip(axes, ["time to first token (s)", "decode tok/s", "peak KV (MiB)"]):
        ax.set(xscale="log", xlabel="prompt length (tokens)", title=title)
        ax.set_yscale("log")
        # one labelled tick per measured length (log-axis defaults overlap)
        ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.suptitle(f"{Path(results['model']).name}, window {results['window']}, {results['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
