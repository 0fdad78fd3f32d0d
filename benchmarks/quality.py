"""Long-context quality on a real model (SmolLM2-135M, trained length 8K): stock vLLM vs
the plugin at several settings, in one run.

1. Perplexity by position: documents of --ppl-len tokens cut from plain-text files
   (default ../shared/data/austen/, else the bundled Pride and Prejudice opening),
   NLL per position averaged over documents, reported per bucket and as a curve.
2. Passkey retrieval (LM-Infinite protocol): a key hidden at a random depth in filler,
   greedy answer, the first integer scored; reported per length and by where the key
   sat relative to the Λ pattern (global span / evicted middle / local window).

    python benchmarks/quality.py [--quick] [--ppl-len 16384] [--docs 3]
        [--passkey-lengths 4096,8192,16384] [--passkey-samples 20]
        [--setting 'NAME={"n_global": 10, "top_k": 5}' ...]   (more plugin settings, by their lm_infinite)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test harness: helpers.engine, helpers.tiny_checkpoint

from helpers.engine import run_engine  # noqa: E402

PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                  "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def settings(trained: int, quick: bool):
    """name -> (plugin?, hf_overrides)."""
    if quick:
        return {"stock": (False, {}), "G4_W64": (True, {"lm_infinite": {"n_global": 4, "n_local": 64}})}
    out = {"stock": (False, {})}
    for g in (0, 4, 10, 100):
        out[f"G{g}_W{trained // 1024}K"] = (True, {"lm_infinite": {"n_global": g}})
    for w in (2048, 4096):
        out[f"G10_W{w // 1024}K"] = (True, {"lm_infinite": {"n_global": 10, "n_local": w, "distance_limit": w}})
    # top-k middle attention at the plugin's defaults (issue 15): exact, per row of the answer
    out[f"G10_W{trained // 1024}K_topk"] = (True, {"lm_infinite": {"n_global": 10, "top_k": DEFAULT_TOP_K}})
    out[f"G10_W{trained // 1024}K_topk_all"] = (True, {"lm_infinite": {"n_global": 10, "top_k": DEFAULT_TOP_K,
                                                                        "top_k_rows": "all"}})
    return out


DEFAULT_TOP_K = 5  # the reference's default


def extra_setting(text: str) -> tuple[str, tuple[bool, dict]]:
    """--setting NAME=JSON: a plugin setting given by its lm_infinite mapping."""
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--setting must be NAME=JSON (the lm_infinite mapping), got {text!r}")
    try:
        lminf = json.loads(body)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--setting {name}: not JSON ({err})") from None
    if not isinstance(lminf, dict):
        raise SystemExit(f"--setting {name}: the lm_infinite mapping must be a JSON object, got {body!r}")
    return name, (True, {"lm_infinite": lminf})


def load_texts(data_dir: Path | None) -> list[str]:
    if data_dir and data_dir.is_dir():
        files = sorted(data_dir.glob("*.txt"))
        if files:
            return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    bundled = Path(__file__).resolve().parents[1] / "vllm_lminf" / "data" / "pride_and_prejudice_opening.txt.gz"
    return [gzip.open(bundled, "rt", encoding="utf-8").read()]


def make_documents(tok, texts, length, count):
    docs = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids) - length + 1, length):
            docs.append(ids[s : s + length])
            if len(docs) == count:
                return docs
    if not docs:
        raise SystemExit(f"no text long enough for {length}-token documents")
    return docs


def make_passkey(tok, length, rng):
    """(token ids, key, key_token_position) with the prompt exactly `length` tokens."""
    key = rng.randrange(10000, 99999)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    head, fill, needle, tail = enc(PASSKEY_PREFIX), enc(FILLER), enc(NEEDLE.format(key=key)), enc(QUESTION)
    n_fill = length - len(head) - len(needle) - len(tail)
    filler = (fill * (n_fill // len(fill) + 1))[:n_fill]
    depth = rng.randrange(0, n_fill + 1)
    ids = head + filler[:depth] + needle + filler[depth:] + tail
    return ids, key, len(head) + depth


def where(pos, length, lminf):
    if lminf is None:
        return "all"
    g, w = lminf.get("n_global", 10), lminf.get("n_local")
    if pos < g:
        return "global"
    return "window" if w is None or length - pos <= w else "middle"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model-dir", type=Path, default=Path("models/smollm2-135m"))
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data/austen"))
    ap.add_argument("--ppl-len", type=int, default=16384)
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--bucket", type=int, default=2048)
    ap.add_argument("--passkey-lengths", default="4096,8192,16384")
    ap.add_argument("--passkey-samples", type=int, default=20)
    ap.add_argument("--settings", default=None, help="comma list of setting names (default: all)")
    ap.add_argument("--stock-max-len", type=int, default=None,
                    help="stock vLLM skips passkey prompts longer than this (its prefill is quadratic)")
    ap.add_argument("--kv-gib", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--setting", action="append", default=[], metavar="NAME=JSON",
                    help="another plugin setting, by its lm_infinite mapping (repeatable)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the parts already in OUT/quality.json (same protocol) and run the rest")
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer

    tmp = tempfile.TemporaryDirectory()
    if a.quick:
        from helpers.tiny_checkpoint import make_tiny_llama

        model = make_tiny_llama(Path(tmp.name) / "m", max_position_embeddings=128)
        a.ppl_len, a.docs, a.bucket, a.passkey_lengths, a.passkey_samples = 512, 2, 128, "256,512", 2
    else:
        from vllm_lminf.tools import smollm2

        smollm2.main(["--out", str(a.model_dir)])
        model = a.model_dir
    tok = AutoTokenizer.from_pretrained(model)
    trained = json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
    docs = make_documents(tok, load_texts(None if a.quick else a.data_dir), a.ppl_len, a.docs) if a.ppl_len else []
    p_lengths = [int(x) for x in a.passkey_lengths.split(",") if x]
    # one generator per length: a length's samples do not depend on which other lengths run
    rngs = {n: random.Random(f"{a.seed}:{n}") for n in p_lengths}
    passkeys = [(n, *make_passkey(tok, n, rngs[n])) for n in p_lengths for _ in range(a.passkey_samples)]
    all_settings = settings(trained, a.quick)
    all_settings.update(extra_setting(t) for t in a.setting)
    chosen = a.settings.split(",") if a.settings else list(all_settings)
    unknown = [n for n in chosen if n not in all_settings]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; allowed: {sorted(all_settings)}")
    a.out.mkdir(parents=True, exist_ok=True)
    protocol = {"model": str(model), "trained_length": trained, "ppl_len": a.ppl_len, "docs": len(docs),
                "bucket": a.bucket, "passkey_samples": a.passkey_samples, "seed": a.seed}
    result = dict(protocol, settings={})
    saved = a.out / "quality.json"
    if a.resume and saved.exists():
        old = json.loads(saved.read_text())
        differs = {k: (old.get(k), v) for k, v in protocol.items() if old.get(k) != v}
        if differs:
            raise SystemExit(f"--resume: {saved} was made with other settings {differs}; use another --out")
        result = old
    cores = os.cpu_count() or 1  # every core for the engine, every setting alike
    env = {"VLLM_CPU_KVCACHE_SPACE": str(a.kv_gib), "OMP_NUM_THREADS": str(cores),
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}"}

    def engine_run(name, prompts, length, sampling):
        """One fresh engine per (setting, part), sized for `length` tokens."""
        plugin, overrides = all_settings[name]
        overrides = dict(overrides)
        if not plugin and length > trained:
            overrides["max_position_embeddings"] = length
        engine = dict(max_model_len=length, dtype="bfloat16" if not a.quick else "float32",
                      hf_overrides=overrides, max_num_batched_tokens=2048, enable_prefix_caching=False)
        return run_engine(model, prompts, engine=engine, plugin=plugin, env=env, timeout=6 * 3600, sampling=sampling)

    # each part is saved as soon as it is done, so a long protocol can be resumed (--resume)
    parts = [(n, "ppl", None) for n in chosen if docs]
    parts += [(n, "passkey", L) for n in chosen for L in p_lengths
              if all_settings[n][0] or a.stock_max_len is None or L <= a.stock_max_len]
    for name, kind, length in tqdm(parts, desc="setting x part"):
        plugin, overrides = all_settings[name]
        entry = result["settings"].setdefault(name, {"overrides": overrides, "ppl_buckets": {}, "nll_curve": [],
                                                     "passkey": {}, "passkey_by_position": {}})
        if kind == "ppl":
            if entry["ppl_buckets"]:
                continue
            out = engine_run(name, docs, a.ppl_len + 16, dict(max_tokens=1, prompt_logprobs=0))
            nll = torch.tensor([[-x for x in o["prompt_logprobs"][1:]] for o in out]).mean(0)  # positions 1..N-1
            for s in range(0, a.ppl_len, a.bucket):
                seg = nll[max(0, s - 1) : s + a.bucket - 1]
                entry["ppl_buckets"][f"{s}-{s + a.bucket}"] = float(torch.exp(seg.mean()))
            entry["nll_curve"] = nll.tolist()[:: max(1, a.ppl_len // 512)]
            tqdm.write(f"{name}: ppl {json.dumps({k: round(v, 1) for k, v in entry['ppl_buckets'].items()})}")
        else:
            if str(length) in entry["passkey"]:
                continue
            mine = [p for p in passkeys if p[0] == length]
            out = engine_run(name, [p[1] for p in mine], length + 16, dict(max_tokens=8, temperature=0.0))
            lminf = overrides.get("lm_infinite")
            if lminf is not None:
                lminf = dict(lminf)
                lminf.setdefault("n_local", trained)
            hits = []
            for (n, _ids, key, pos), o in zip(mine, out):
                m = re.search(r"\d+", tok.decode(o["tokens"]))
                ok = bool(m) and int(m.group()) == key
                hits.append(ok)
                c = entry["passkey_by_position"].setdefault(f"{n}:{where(pos, n, lminf)}", [0, 0])
                c[0], c[1] = c[0] + ok, c[1] + 1
            entry["passkey"][str(length)] = sum(hits) / len(hits)
            tqdm.write(f"{name}: passkey {length}: {sum(hits)}/{len(hits)}")
        saved.write_text(json.dumps(result, indent=1))
    report(result, a.out)
    return 0


def report(result, out):
    names = list(result["settings"])
    # target: every bucket past the trained length within 10% of the [L/2, L) level
    trained = result["trained_length"]
    for n in names:
        b = result["settings"][n]["ppl_buckets"]
        ref = [v for k, v in b.items() if int(k.split("-")[0]) >= trained // 2 and int(k.split("-")[1]) <= trained]
        past = {k: v for k, v in b.items() if int(k.split("-")[0]) >= trained}
        if ref and past:
            level = sum(ref) / len(ref)
            result["settings"][n]["worst_past_trained_over_half_trained"] = max(past.values()) / level
            print(f"{n}: worst bucket past {trained} / [{trained // 2}, {trained}) = {max(past.values()) / level:.3f}")
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    buckets = list(result["settings"][names[0]]["ppl_buckets"])
    print(f"{'bucket':>13} " + " ".join(f"{n:>11}" for n in names))
    for b in buckets:
        print(f"{b:>13} " + " ".join(f"{result['settings'][n]['ppl_buckets'][b]:>11.1f}" for n in names))
    lens = sorted({k for n in names for k in result["settings"][n]["passkey"]}, key=int)
    for n_ in lens:
        print(f"passkey {n_:>5} " + " ".join(f"{result['settings'][n]['passkey'].get(n_, float('nan')):>11.2f}"
                                           for n in names))
    for n in names:
        by_pos = result["settings"][n]["passkey_by_position"]
        if by_pos:
            print(f"passkey {n} by key position: " + ", ".join(f"{k} {c}/{t}" for k, (c, t) in by_pos.items()))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_ppl = any(result["settings"][n]["ppl_buckets"] for n in names)
    has_pk = any(result["settings"][n]["passkey"] for n in names)
    panels = [p for p, on in (("ppl", has_ppl), ("pk", has_pk)) if on]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    ax = dict(zip(panels, axes[0]))
    for n in names:
        s = result["settings"][n]
        if has_ppl:
            ax["ppl"].plot([int(b.split("-")[0]) for b in s["ppl_buckets"]], list(s["ppl_buckets"].values()), "o-", label=n)
        if has_pk:
            pk = s["passkey"]
            ax["pk"].plot([int(k) for k in pk], list(pk.values()), "s-", label=n)
    if has_ppl:
        ax["ppl"].axvline(result["trained_length"], color="gray", ls=":")
        ax["ppl"].set(yscale="log", xlabel="position (bucket start)", ylabel="perplexity", title="perplexity by position")
        ax["ppl"].legend(fontsize=7)
    if has_pk:
        ax["pk"].set(xscale="log", xlabel="prompt length", ylabel="passkey accuracy", title="passkey retrieval",
                     ylim=(-0.05, 1.05))
        ax["pk"].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
