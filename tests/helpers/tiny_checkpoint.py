"""Tiny, fully local checkpoints for tests.

Everything here is generated offline and deterministically:

* :func:`make_tokenizer` builds a byte-level BPE tokenizer (256 byte symbols
  plus a handful of merges and three special tokens, < 512 entries in total),
  so any text - English or not - tokenizes without unknown tokens.
* :func:`make_tiny_llama` writes a randomly initialised Llama-family
  checkpoint (config.json, model.safetensors, generation_config.json and the
  tokenizer) in Hugging Face naming, loadable by transformers and by vLLM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2

DEFAULT_TOKENIZER_VOCAB = 384

# Training text for the BPE merges. It is synthesised from a small word list
# so that the file stays short; the exact text only influences which merges
# exist, never whether a string can be encoded (byte fallback covers all).
_WORDS = (
    "the of and to in is was for on that with as it by at from this be are "
    "an or his her they we you not have had has were which one all their "
    "there been more when will would who so no out up can what about into "
    "than them time only some could new these two may first then do any "
    "like my now over such our man me even most made after also did many "
    "before must through back years where much your way well down should "
    "because each just those people how too little state good very make "
    "world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year "
    "off come since against go came right used take three small large "
    "number house water word story long context window attention model "
    "memory token sequence position rotary embedding length infinite "
    "global local distance limit scale frequency quick brown fox jumps lazy "
    "dog once upon a time city river mountain morning evening light dark"
).split()


def _training_text(n_words: int = 1500, seed: int = 1234) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(_WORDS), (n_words,), generator=gen).tolist()
    lines, cur = [], []
    for k, i in enumerate(idx):
        w = _WORDS[i]
        if not cur:
            w = w.capitalize()
        cur.append(w)
        if len(cur) >= 8 + (k % 7):
            lines.append(" ".join(cur) + (". " if k % 3 else ", ") + str(k % 100))
            cur = []
    if cur:
        lines.append(" ".join(cur) + ".")
    return lines


def make_tokenizer(dir: str | Path, vocab_size: int = DEFAULT_TOKENIZER_VOCAB) -> Path:
    """Write a small byte-level BPE fast tokenizer into ``dir``.

    Special tokens: ``<unk>`` (0, never produced), ``<s>`` (1, BOS, prepended
    on encode) and ``</s>`` (2, EOS). Returns ``dir`` as a :class:`Path`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size > 512:
        raise ValueError("vocab_size must be <= 512")
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    return out


def _tokenizer_vocab_size(dir: Path) -> int:
    data = json.loads((dir / "tokenizer.json").read_text())
    ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1


_ARCH_MODEL_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


def make_tiny_llama(
    dir: str | Path,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 256,
    max_position_embeddings: int = 128,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool = False,
    architecture: str = "LlamaForCausalLM",
    model_type: str | None = "llama",
    extra_config: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a random tiny Llama-family checkpoint (HF layout) into ``dir``.

    ``model_type`` follows ``architecture`` when left at "llama" (or None) for
    a non-Llama architecture. ``extra_config`` is merged into config.json last.
    Default head_dim is 32 because vLLM's CPU attention backend only supports
    head sizes 32, 64, 80, ... (16 fails at runtime); hidden_size defaults to
    num_heads * head_dim = 128 so Qwen2 (which derives head_dim) also works.
    Q/K/V biases are written when the final config has ``attention_bias`` true
    or the model type is qwen2 (vLLM's Qwen2 always expects them).
    """
    if architecture not in _ARCH_MODEL_TYPE:
        raise ValueError(f"unsupported architecture {architecture!r}")
    if model_type is None or (model_type == "llama" and architecture != "LlamaForCausalLM"):
        model_type = _ARCH_MODEL_TYPE[architecture]
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if model_type == "qwen2" and head_dim * num_heads != hidden_size:
        raise ValueError("qwen2 derives head_dim = hidden_size // num_heads; pass matching sizes")

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    tok_vocab = _tokenizer_vocab_size(out)
    if vocab_size is None:
        vocab_size = tok_vocab
    if vocab_size < tok_vocab:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {tok_vocab}")

    config: dict = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": float(rope_theta),
        "rope_scaling": None,
        "attention_bias": model_type == "qwen2",
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": bool(tie_word_embeddings),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "mistral":
        config["sliding_window"] = None
    if model_type == "qwen2":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=num_layers)
    if extra_config:
        config.update(extra_config)
    with_bias = bool(config.get("attention_bias")) or model_type == "qwen2"

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    h, L = hidden_size, num_layers
    # Residual branches are damped by 1/sqrt(2L) so the stream stays O(1).
    branch = 1.0 / math.sqrt(2 * L)
    # With tied embeddings the embedding doubles as the output head, so it gets
    # the head's scale (logit std ~2.5) instead of unit scale.
    embed_std = 2.5 / math.sqrt(h) if config["tie_word_embeddings"] else 1.0
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": randn(vocab_size, h, std=embed_std),
        "model.norm.weight": 1.0 + randn(h, std=0.1),
    }
    for i in range(L):
        p = f"model.layers.{i}."
        # q/k std 1.5/sqrt(h): per-element q,k ~ 1.5, so scaled logits have std ~2.
        tensors[p + "self_attn.q_proj.weight"] = randn(num_heads * head_dim, h, std=1.5 / math.sqrt(h))
        tensors[p + "self_attn.k_proj.weight"] = randn(num_kv_heads * head_dim, h, std=1.5 / math.sqrt(h))
        tensors[p + "self_attn.v_proj.weight"] = randn(num_kv_heads * head_dim, h, std=1.0 / math.sqrt(h))
        tensors[p + "self_attn.o_proj.weight"] = randn(
            h, num_heads * head_dim, std=branch / math.sqrt(num_heads * head_dim)
        )
        if with_bias:
            tensors[p + "self_attn.q_proj.bias"] = randn(num_heads * head_dim, std=0.2)
            tensors[p + "self_attn.k_proj.bias"] = randn(num_kv_heads * head_dim, std=0.2)
            tensors[p + "self_attn.v_proj.bias"] = randn(num_kv_heads * head_dim, std=0.2)
        tensors[p + "mlp.gate_proj.weight"] = randn(intermediate_size, h, std=1.0 / math.sqrt(h))
        tensors[p + "mlp.up_proj.weight"] = randn(intermediate_size, h, std=1.0 / math.sqrt(h))
        tensors[p + "mlp.down_proj.weight"] = randn(
            h, intermediate_size, std=2.0 * branch / math.sqrt(intermediate_size)
        )
        tensors[p + "input_layernorm.weight"] = 1.0 + randn(h, std=0.1)
        tensors[p + "post_attention_layernorm.weight"] = 1.0 + randn(h, std=0.1)
    if not config["tie_word_embeddings"]:
        # Peaked-enough next-token distributions (logit std ~2.5) so greedy
        # decoding has clear margins.
        tensors["lm_head.weight"] = randn(vocab_size, h, std=2.5 / math.sqrt(h))

    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    for k, v in (extra_tensors or {}).items():
        tensors[k] = v.detach().contiguous()

    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen_cfg = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    return out


def with_clex(model_dir: str | Path, out_dir: str | Path, *, max_factor: int, seed: int = 0,
              act: str = "tanh", log_scale: bool = False) -> Path:
    """A CLEX variant of a saved Llama-family checkpoint (for benchmarks on a real model):
    the same weights (linked), `rope_scaling: clex` in its config, and random small ODE
    weights in `clex.safetensors` (inv_freq from the model's rope_theta, as the tests make
    them). Reused when it already exists with the same settings."""
    from safetensors.torch import save_file

    model_dir, out = Path(model_dir).resolve(), Path(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    scaling = {"type": "clex", "max_factor": max_factor, "param_factor": 1, "act": act, "time_dt": 0.01}
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    config.update(rope_scaling=scaling, log_scale=log_scale, rope_theta=theta)
    config.pop("rope_parameters", None)
    done = out / "config.json"
    if done.exists() and json.loads(done.read_text()) == config and (out / "clex.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    g = torch.Generator().manual_seed(seed)
    half = head // 2
    save_file({
        "model.clex_layer.inv_freq": 1.0 / theta ** (torch.arange(0, head, 2, dtype=torch.float32) / head),
        "model.clex_layer.proj_func.ode_up_proj": torch.randn(half, head, generator=g) * 0.02,
        "model.clex_layer.proj_func.ode_down_proj": torch.randn(head, half, generator=g) * 0.02,
    }, str(out / "clex.safetensors"))
    done.write_text(json.dumps(config, indent=2))
    return out
