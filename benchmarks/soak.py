"""Server soak: many concurrent requests against `python -m vllm_lminf serve`, with
streaming, client aborts mid-prefill and mid-decode, bad requests under load and a KV pool
small enough to force preemption; then every completed request is sent again alone and
must give the same greedy tokens, and the idle server must hold no KV.

    python benchmarks/soak.py                      # SmolLM2-135M, 1,000 requests (~40 min on 2 cores)
    python benchmarks/soak.py --requests 300
    python benchmarks/soak.py --quick              # tiny random model, a few dozen requests (CI)

Requests are token-id prompts through /v1/completions (return_token_ids, ignore_eos,
temperature 0, float32 weights so batching changes no greedy choice). Kinds:
  plain / stream        a completed request, compared with the same request served alone
  abort_prefill         streaming, the client closes the connection before the first token
  abort_decode          streaming, the client closes after a few tokens
  bad                   invalid input (must get HTTP 400, the server stays up)
Figures (requests, completions, preemptions, aborts, bad inputs, mismatches, KV blocks still
held when idle, server alive) go to soak.json; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: helpers.server

from helpers.engine import TEST_ENV  # noqa: E402
from helpers.server import Server  # noqa: E402

KINDS = ("plain", "stream", "abort_prefill", "abort_decode", "bad")


def bad_bodies(model: str, max_len: int, vocab: int) -> list[tuple[str, dict]]:
    """(what is wrong, request body): each must be refused with HTTP 400."""
    base = {"model": model, "prompt": [11, 12, 13], "max_tokens": 4, "temperature": 0.0}
    return [
        ("negative max_tokens", dict(base, max_tokens=-3)),
        ("prompt past max_model_len", dict(base, prompt=[11] * (max_len + 5))),
        ("temperature not a number", dict(base, temperature="hot")),
        ("token id past the vocabulary", dict(base, prompt=[11, vocab + 1000])),
        ("empty prompt", dict(base, prompt=[])),
    ]


class Client:
    def __init__(self, port: int, model: str, timeout: float):
        self.port, self.model, self.timeout = port, model, timeout

    def _send(self, body: dict, timeout: float) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        return conn

    def body(self, ids: list[int], max_tokens: int, stream: bool) -> dict:
        return {"model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "return_token_ids": True, "stream": stream}

    def complete(self, ids: list[int], max_tokens: int) -> dict:
        conn = self._send(self.body(ids, max_tokens, False), self.timeout)
        try:
            resp = conn.getresponse()
            data = json.loads(resp.read())
            if resp.status != 200:
                return {"status": resp.status, "error": str(data)[:300]}
            return {"status": 200, "tokens": data["choices"][0]["token_ids"]}
        finally:
            conn.close()

    def stream(self, ids: list[int], max_tokens: int, *, close_after_tokens: int | None = None,
               close_after_s: float | None = None) -> dict:
        """Streams the reply. close_after_tokens: the client hangs up once it has that many;
        close_after_s: it hangs up if no token has come by then (mid-prefill)."""
        conn = self._send(self.body(ids, max_tokens, True), close_after_s or self.timeout)
        tokens: list[int] = []
        try:
            resp = conn.getresponse()
            if resp.status != 200:
                return {"status": resp.status, "error": resp.read()[:300].decode(errors="replace")}
            while True:
                try:
                    line = resp.fp.readline()
                except (TimeoutError, socket.timeout):
                    return {"status": 200, "tokens": tokens, "closed": "before_first_token" if not tokens
                            else "mid_decode"}
                if not line:
                    return {"status": 200, "tokens": tokens, "error": "stream ended without [DONE]"}
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    return {"status": 200, "tokens": tokens}
                chunk = json.loads(payload)
                tokens += chunk["choices"][0].get("token_ids") or []
                if tokens and conn.sock is not None and close_after_s is not None:
                    conn.sock.settimeout(self.timeout)  # first token came: no longer a prefill abort
                    close_after_s = None
                if close_after_tokens is not None and len(tokens) >= close_after_tokens:
                    return {"status": 200, "tokens": tokens, "closed": "mid_decode"}
        finally:
            conn.close()

    def post_raw(self, body: dict) -> tuple[int, str]:
        conn = self._send(body, self.timeout)
        try:
            resp = conn.getresponse()
            return resp.status, resp.read()[:300].decode(errors="replace")
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^(vllm:[a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out

    def healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False


def plan(n: int, rng: random.Random, lengths: list[tuple[float, int, int]], vocab: int,
         out_range: tuple[int, int], mix: dict[str, float], abort_after_s: tuple[float, float]) -> list[dict]:
    """n requests: a kind drawn from `mix`, a prompt length from the weighted `lengths` ranges."""
    kinds, weights = zip(*mix.items())
    reqs = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        _, lo, hi = rng.choices(lengths, [x[0] for x in lengths])[0]
        length = rng.randrange(lo, hi + 1)
        if kind == "abort_prefill":
            length = max(length, lengths[-1][1])  # long enough that the hang-up lands in prefill
        reqs.append({"i": i, "kind": kind, "ids": [rng.randrange(3, vocab) for _ in range(length)],
                     "max_tokens": rng.randrange(*out_range), "close_after_tokens": rng.randrange(1, 4),
                     "close_after_s": rng.uniform(*abort_after_s)})
    return reqs


def run_one(client: Client, req: dict, bad: list[tuple[str, dict]]) -> dict:
    kind = req["kind"]
    t0 = time.perf_counter()
    if kind == "plain":
        res = client.complete(req["ids"], req["max_tokens"])
    elif kind == "stream":
        res = client.stream(req["ids"], req["max_tokens"])
    elif kind == "abort_prefill":
        res = client.stream(req["ids"], req["max_tokens"], close_after_s=req["close_after_s"])
    elif kind == "abort_decode":
        res = client.stream(req["ids"], req["max_tokens"], close_after_tokens=req["close_after_tokens"])
    else:
        what, body = bad[req["i"] % len(bad)]
        status, text = client.post_raw(body)
        res = {"status": status, "bad": what, "error": text}
    res.update(i=req["i"], kind=kind, prompt_len=len(req["ids"]), seconds=time.perf_counter() - t0)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2-135m"))
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--window", type=int, default=None, help="n_local = distance_limit (default: trained length)")
    ap.add_argument("--pool-blocks", type=int, default=None,
                    help="KV pool in blocks (default: 1.5 sequences' bound, so preemption happens)")
    ap.add_argument("--out", type=Path, default=Path("runs/soak"))
    a = ap.parse_args(argv)
    if a.requests < len(KINDS):
        ap.error(f"--requests must be >= {len(KINDS)}, got {a.requests}")

    tmp = tempfile.TemporaryDirectory()
    block = 32 if a.quick else 128
    chunk = 256 if a.quick else 2048
    if a.quick:
        from helpers.tiny_checkpoint import make_tiny_llama

        model = make_tiny_llama(Path(tmp.name) / "m", max_position_embeddings=256, seed=5)
        a.requests, a.concurrency, a.window, a.n_global = min(a.requests, 64), 6, 64, 4
    else:
        from vllm_lminf.tools import smollm2

        smollm2.main(["--out", str(a.model_dir)])
        model = a.model_dir
    cfg = json.loads((Path(model) / "config.json").read_text())
    trained, vocab = cfg["max_position_embeddings"], cfg["vocab_size"]
    window = a.window or trained
    # inside the trained length (most), and far past it (a few)
    lengths = [(0.86, 16, trained // 8), (0.10, trained // 8, trained - 64), (0.04, trained + 1, 2 * trained)]
    abort_after_s = (0.05, 0.5)
    if a.quick:  # a tiny model computes fast: more long prompts, earlier hang-ups
        lengths = [(0.5, 16, 64), (0.3, 64, trained - 8), (0.2, trained + 1, 2 * trained)]
        abort_after_s = (0.002, 0.02)
    max_len = 2 * trained + 64
    mix = {"plain": 0.4, "stream": 0.3, "abort_prefill": 0.08, "abort_decode": 0.12, "bad": 0.1}
    rng = random.Random(a.seed)
    reqs = plan(a.requests, rng, lengths, vocab, (4, 24), mix, abort_after_s)
    bound = -(-a.n_global // block) + -(-(window - 1 + chunk) // block) + 1
    pool = a.pool_blocks or ((bound + 3) if a.quick else (3 * bound // 2 + 1))
    overrides = {"lm_infinite": {"n_global": a.n_global, "n_local": window, "distance_limit": window}}
    args = ["--max-model-len", str(max_len), "--dtype", "float32", "--hf-overrides", json.dumps(overrides),
            "--block-size", str(block), "--max-num-batched-tokens", str(chunk), "--max-num-seqs", "16",
            "--num-gpu-blocks-override", str(pool), "--enable-prefix-caching"]
    if a.quick:
        args.append("--enforce-eager")
    a.out.mkdir(parents=True, exist_ok=True)
    env = dict(TEST_ENV, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CACHE_ROOT=tmp.name, VLLM_RPC_BASE_PATH=tmp.name)
    if not a.quick:
        env.update(OMP_NUM_THREADS="2", VLLM_CPU_KVCACHE_SPACE="4")
    srv = Server(model, args=args, env=env, log=a.out / "server.log")
    alive_checks, alive_failures = 0, 0
    with srv:
        client = Client(srv.port, str(model), timeout=3600)
        bad = bad_bodies(str(model), max_len, vocab)
        stop = threading.Event()

        def watch():  # the server must answer /health throughout
            nonlocal alive_checks, alive_failures
            while not stop.wait(2.0):
                alive_checks += 1
                alive_failures += not client.healthy()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.time()
        results: list[dict] = []
        with ThreadPoolExecutor(a.concurrency) as pool_exec:
            futures = [pool_exec.submit(run_one, client, r, bad) for r in reqs]
            for f in tqdm(futures, desc="load"):
                results.append(f.result())
        load_s = time.time() - t0
        # idle: aborted requests are gone and no block is held
        time.sleep(3)
        idle = client.metrics()
        by_i = {r["i"]: r for r in reqs}
        completed = [r for r in results if r["kind"] in ("plain", "stream") and r["status"] == 200
                     and not r.get("error")]
        mismatches = []
        for r in tqdm(completed, desc="alone"):
            req = by_i[r["i"]]
            alone = client.complete(req["ids"], req["max_tokens"])
            if alone.get("tokens") != r["tokens"]:
                mismatches.append({"i": r["i"], "prompt_len": r["prompt_len"], "load": r["tokens"],
                                   "alone": alone.get("tokens"), "error": alone.get("error")})
        stop.set()
        watcher.join()
        final = client.metrics()
        alive_end = client.healthy()
    code = srv.proc.returncode

    def count(pred):
        return sum(1 for r in results if pred(r))

    figures = {
        "requests": len(results),
        "by_kind": {k: count(lambda r, k=k: r["kind"] == k) for k in KINDS},
        "completed_compared": len(completed),
        "mismatches": len(mismatches),
        "failed_completions": count(lambda r: r["kind"] in ("plain", "stream") and (r["status"] != 200
                                                                                      or r.get("error"))),
        "aborts_before_first_token": count(lambda r: r.get("closed") == "before_first_token"),
        "aborts_mid_decode": count(lambda r: r.get("closed") == "mid_decode"),
        "bad_inputs": count(lambda r: r["kind"] == "bad"),
        "bad_inputs_not_400": count(lambda r: r["kind"] == "bad" and r["status"] != 400),
        "prompt_len_max": max(r["prompt_len"] for r in results),
        "past_trained_length": count(lambda r: r["prompt_len"] > trained),
        "preemptions": final.get("vllm:num_preemptions_total", 0.0),
        "idle_kv_cache_usage": idle.get("vllm:kv_cache_usage_perc"),
        "idle_requests_running": idle.get("vllm:num_requests_running"),
        "idle_requests_waiting": idle.get("vllm:num_requests_waiting"),
        "health_checks": alive_checks, "health_failures": alive_failures, "alive_at_end": alive_end,
        "server_exit_code": code, "load_seconds": round(load_s, 1),
        "pool_blocks": pool, "bound_blocks": bound, "block_size": block, "window": window, "trained": trained,
        "seed": a.seed, "date": time.strftime("%Y-%m-%d"), "model": str(model),
    }
    checks = {
        "no mismatches": figures["mismatches"] == 0,
        "every completion succeeded": figures["failed_completions"] == 0,
        "every bad input got 400": figures["bad_inputs_not_400"] == 0,
        "KV back to 0 when idle": figures["idle_kv_cache_usage"] == 0.0,
        "nothing running or waiting when idle": (figures["idle_requests_running"], figures["idle_requests_waiting"])
        == (0.0, 0.0),
        "server alive throughout": alive_failures == 0 and alive_end,
        "clean shutdown": code == 0,
    }
    figures["checks"] = checks
    (a.out / "soak.json").write_text(json.dumps({"figures": figures, "mismatches": mismatches[:20],
                                                 "results": results}, indent=1))
    print(json.dumps({k: v for k, v in figures.items() if k != "checks"}, indent=1))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
