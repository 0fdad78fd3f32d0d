"""Tiny random checkpoints of more model families (Qwen3, Mixtral, Phi, GPT-NeoX).

Checkpoints: transformers' own config and model classes (`from_config`), weights
redrawn at scales that make attention and next-token distributions peaked (the
default init of std 0.02 makes everything near-uniform), written with
`save_pretrained` (so the files carry the names real checkpoints carry, e.g.
GPT-NeoX's `embed_out` and Mixtral's `block_sparse_moe.experts.N.w1`), plus the
byte-level test tokenizer.

Their float64 reference is helpers.reference.Reference, the same as Llama's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from helpers.tiny_checkpoint import _tokenizer_vocab_size, make_tokenizer

F64 = torch.float64

FAMILIES = ("qwen3", "mixtral", "phi", "gpt_neox")

ARCHITECTURE = {
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "phi": "PhiForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}

ROPE_THETA = {"qwen3": 10000.0, "mixtral": 1e6, "phi": 10000.0, "gpt_neox": 10000.0}


def _config(family: str, vocab: int, max_pos: int, **overrides):
    import transformers as tf

    common = dict(vocab_size=vocab, max_position_embeddings=max_pos, num_hidden_layers=2,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "qwen3":
        kw = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, rope_theta=ROPE_THETA[family], use_sliding_window=False)
        cls = tf.Qwen3Config
    elif family == "mixtral":
        kw = dict(hidden_size=128, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, num_local_experts=4, num_experts_per_tok=2, rope_theta=ROPE_THETA[family],
                  sliding_window=None)
        cls = tf.MixtralConfig
    elif family == "phi":
        # head_dim 32; partial 0.4 -> int(12.8) = 12 rotary dims (even), as phi-2's 0.4
        kw = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, partial_rotary_factor=0.4,
                  rope_theta=ROPE_THETA[family], hidden_act="gelu_new")
        cls = tf.PhiConfig
    elif family == "gpt_neox":
        # head_dim 32; rotary_pct 0.25 -> 8 rotary dims
        kw = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, rotary_pct=0.25,
                  rotary_emb_base=ROPE_THETA[family], hidden_act="gelu", use_parallel_residual=True)
        cls = tf.GPTNeoXConfig
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    kw.update(common)
    kw.update(overrides)
    return cls(**kw)


_OUT_PROJ = ("o_proj", "self_attn.dense", "attention.dense", "fc2", "down_proj", "dense_4h_to_h")
_QK_PROJ = ("q_proj", "k_proj", "query_key_value")


def _redraw(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=F64)
            if p.ndim == 1:
                is_norm = "norm" in name and name.endswith(".weight")
                value = 1.0 + 0.1 * noise if is_norm else 0.1 * noise
            elif name.endswith(("embed_tokens.weight", "embed_in.weight")):
                value = noise
            elif name.endswith(("lm_head.weight", "embed_out.weight")):
                value = noise * (2.5 / math.sqrt(h))
            elif name.endswith("mlp.gate.weight"):  # MoE router: well-separated expert scores
                value = noise * (3.0 / math.sqrt(h))
            else:
                fan_in = p.shape[-1]
                gain = 1.5 if any(k in name for k in _QK_PROJ) else 0.5 if any(k in name for k in _OUT_PROJ) else 1.0
                value = noise * (gain / math.sqrt(fan_in))
            p.copy_(value.to(p.dtype))


def clex_tensors(rotary_dim: int, base: float, seed: int, prefix: str = "model.clex_layer.") -> dict[str, torch.Tensor]:
    """Random CLEX parameters (param_factor 1) under the released state-dict names.

    The ODE weights are small (std 0.05): larger random weights can drive frequencies
    far above 1 (10^3..10^5 at t = 4 for d = 32), where float32 angles at a few hundred
    positions are off by whole radians in any float32 implementation. Trained CLEX
    lowers frequencies; with these weights they stay below ~4."""
    g = torch.Generator().manual_seed(seed)
    half = rotary_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    return {
        prefix + "inv_freq": inv_freq,
        prefix + "proj_func.ode_up_proj": torch.randn(half, rotary_dim, generator=g) * 0.05,
        prefix + "proj_func.ode_down_proj": torch.randn(rotary_dim, half, generator=g) * 0.05,
    }


def rotary_dim_of(family: str, config) -> int:
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    return int(head * partial)


def make_family_checkpoint(
    family: str,
    dir: str | Path,
    *,
    max_position_embeddings: int = 64,
    seed: int = 0,
    clex: dict | None = None,
    clex_seed: int = 0,
    clex_prefix: str = "model.clex_layer.",
    extra_config: dict | None = None,
    **config_overrides,
) -> Path:
    """Write a tiny random `family` checkpoint into `dir` (float32).

    `clex`: a CLEX rope_scaling dict (`{"type": "clex", "max_factor": ..., ...}`);
    the config then carries it the way released CLEX checkpoints do (top-level
    `rope_theta`/`partial_rotary_factor` or `rotary_pct`, `rope_scaling`), and the
    three CLEX tensors are added under `clex_prefix`. `extra_config` is merged into
    config.json last.
    """
    from safetensors.torch import load_file, save_file
    import transformers as tf

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    vocab = _tokenizer_vocab_size(out)
    config = _config(family, vocab, max_position_embeddings, **config_overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _redraw(model, seed)
    model.save_pretrained(str(out))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}))
    if clex is not None:
        rdim = rotary_dim_of(family, config)
        theta = config.rope_parameters["rope_theta"]
        cfg = json.loads((out / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        if family == "gpt_neox":
            cfg.update(rotary_emb_base=rope["rope_theta"], rotary_pct=rope["partial_rotary_factor"])
        else:
            cfg["rope_theta"] = rope["rope_theta"]
            if "partial_rotary_factor" in rope:
                cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
        cfg["rope_scaling"] = dict(clex)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        files = sorted(out.glob("*.safetensors"))
        assert len(files) == 1, files
        tensors = load_file(str(files[0]))
        tensors.update(clex_tensors(rdim, theta, clex_seed, clex_prefix))
        save_file(tensors, str(files[0]), metadata={"format": "pt"})
    if extra_config:
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(extra_config)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


# --------------------------------------------------------------------------
# stock transformers (float32 by default), for features-off comparisons
# --------------------------------------------------------------------------
def hf_logprobs(ckpt_dir: str | Path, token_ids: Sequence[int], dtype=torch.float32) -> torch.Tensor:
    """Stock transformers forward (its own RoPE and attention), [T, vocab] log-probs."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(ckpt_dir), dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor([list(token_ids)]), use_cache=False).logits[0]
    return torch.log_softmax(logits.to(F64), dim=-1)
