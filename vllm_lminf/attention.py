"""Installs the plugin's attention into a stock vLLM model, layer by layer.

Every supported attention module computes `q, k = self.rotary_emb(positions, q, k)`
then `self.attn(q, k, v)`. We keep that forward untouched and swap two children, both
from the backend the layer runs on:
  - absolute (`backends/absolute.py`, the CPU fast path): `rotary_emb` becomes
    `AbsoluteRotary` and `attn` an `LMInfAttention` on `AbsoluteBackend` (with CLEX: a
    pass-through and `AbsoluteClexBackend`, which rotates per row);
  - raw (`backends/raw.py`: CLEX, CUDA, anything else): `rotary_emb` becomes a
    pass-through and `attn` an `LMInfAttention` on `RawBackend`.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index

from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle

from . import kv_policy, vllm_compat
from .backends import absolute, raw
from .backends.common import fixed_frequencies
from .config import LMInfiniteConfig


class LMInfAttention(Attention):
    """vLLM's Attention on one of the plugin's backends; its KV spec comes from the
    KV policy (bounded for Λ layers that free their middle blocks)."""

    def __init__(self, stock: Attention, *, backend, lminf: LMInfiniteConfig | None,
                 clex_scale: tuple[int, int, bool] | None, top_k=None, **impl_kwargs):
        super().__init__(
            stock.num_heads,
            stock.head_size,
            stock.impl.scale,
            num_kv_heads=stock.num_kv_heads,
            prefix=stock.layer_name,
            attn_backend=backend,
            top_k=top_k,
            **impl_kwargs,
        )
        self.lminf = lminf
        self.clex_scale = clex_scale
        self.top_k = top_k

    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        return kv_policy.kv_cache_spec(super().get_kv_cache_spec(vllm_config), self.lminf, self.clex_scale,
                                       vllm_config, keeps_middle=self.top_k is not None)


def _check_stock_attention(attn: Attention, dtype: torch.dtype) -> None:
    # Passing attn_backend= skips vLLM's checks; these are the ones that matter here.
    if dtype not in raw.RawBackend.supported_dtypes:
        raise ValueError(f"vllm-lminf: dtype {dtype} not supported; use float32, bfloat16 or float16")
    if attn.sliding_window is not None:
        raise ValueError("vllm-lminf: the model already uses sliding-window attention; refusing to combine it with lm_infinite")
    if attn.kv_cache_dtype != "auto":
        raise ValueError(f"vllm-lminf: kv_cache_dtype={attn.kv_cache_dtype!r} is not supported; use 'auto'")
    if attn.attn_type != "decoder":
        raise ValueError("vllm-lminf: only causal decoder attention is supported")


def install(model: nn.Module, vllm_config: VllmConfig, *, lminf: LMInfiniteConfig | None, clex) -> int:
    """Swap every (rotary_emb, attn) pair in `model`; returns how many were swapped."""
    pattern = lminf.pattern if lminf is not None else LambdaPattern.causal()
    # CLEX on the CPU fast path re-rotates a sequence's cached keys in place when its t
    # steps up, which blocks shared through the prefix cache must never see: with prefix
    # caching on, CLEX takes the raw-key path (exact as well, slower).
    prefix_caching = bool(vllm_config.cache_config.enable_prefix_caching)
    if clex is not None and lminf is not None and lminf.top_k is not None and lminf.top_k.blocks:
        raise ValueError("vllm-lminf: lm_infinite.top_k_blocks (block mode) is not supported with CLEX "
                         "checkpoints; use lm_infinite.top_k (exact mode)")
    count = 0
    for module in list(model.modules()):
        stock = getattr(module, "attn", None)
        rope = getattr(module, "rotary_emb", None)
        if not isinstance(stock, Attention) or rope is None or isinstance(stock, LMInfAttention):
            continue
        _check_stock_attention(stock, torch.get_default_dtype())
        style = RopeStyle(rope.rotary_dim, bool(rope.is_neox_style))
        policy = dict(lminf=lminf, clex_scale=None, top_k=None)
        if lminf is not None and lminf.top_k is not None and lminf.top_k.covers(extract_layer_index(stock.layer_name)):
            policy["top_k"] = lminf.top_k
        if clex is not None:
            clex.check_rotary_dim(rope.rotary_dim)
            policy["clex_scale"] = (clex.original_len, clex.cfg.max_factor, clex.cfg.log_scale)
        # The stock layer registered itself under this prefix; ours takes its place.
        vllm_compat.unregister_layer(vllm_config, stock.layer_name)
        if absolute.supported(stock.head_size) and (clex is None or not prefix_caching):
            if clex is None:
                inv_freq = fixed_frequencies(rope)
                module.attn = LMInfAttention(stock, backend=absolute.AbsoluteBackend, **policy,
                                             pattern=pattern, style=style, inv_freq=inv_freq)
                module.rotary_emb = absolute.AbsoluteRotary(rope, style, inv_freq)
            else:
                module.attn = LMInfAttention(stock, backend=absolute.AbsoluteClexBackend, **policy,
                                             pattern=pattern, style=style, inv_freq=torch.empty(0), clex=clex)
                module.rotary_emb = raw.RawKeyRotary(rope)
        else:
            source = raw.RotarySource(style=style, clex=clex) if clex is not None else \
                raw.RotarySource(style=style, inv_freq=fixed_frequencies(rope))
            module.attn = LMInfAttention(stock, backend=raw.RawBackend, **policy, pattern=pattern, rotary=source)
            module.rotary_emb = raw.RawKeyRotary(rope)
        count += 1
    if count == 0:
        raise ValueError(f"vllm-lminf: found no attention layer to replace in {type(model).__name__}")
    return count
