"""Installs the plugin's attention into a stock vLLM model, layer by layer.

Every supported attention module computes `q, k = self.rotary_emb(positions, q, k)`
then `self.attn(q, k, v)`. We keep that forward untouched and swap two children:
  - `rotary_emb` becomes `AbsoluteRotary` on the CPU fast path (RoPE at absolute
    positions with float64 angles, inside the compiled graph) or else a pass-through
    (keys reach the cache unrotated; rotation happens in the backend), and
  - `attn` becomes `LMInfAttention`, built with the same prefix, on our backend.
"""

from __future__ import annotations

import torch
from torch import nn

from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.linear_scaling_rope import LinearScalingRotaryEmbedding
from vllm.model_executor.layers.rotary_embedding.llama3_rope import Llama3RotaryEmbedding

from lminf_kernels.cpu_lambda import absolute_cos_sin
from lminf_kernels.rope import rotate

from .backend import LMInfAttentionBackend, RotarySource, absolute_path_supported


class RawKeyRotary(nn.Module):
    """Stands in for the stock rotary module: returns q and k unrotated."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.head_size = source.head_size
        self.rotary_dim = source.rotary_dim
        self.is_neox_style = source.is_neox_style

    def forward(self, positions, query, key=None):
        return query, key


class AbsoluteRotary(nn.Module):
    """RoPE at each token's absolute position, angles taken in float64 (stock's float32
    table loses ~0.06 rad at position 10^6). Used by the CPU fast path, whose cache holds
    keys rotated this way; runs inside the model's compiled graph."""

    def __init__(self, source: nn.Module, style: RopeStyle, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.head_size = source.head_size
        self.rotary_dim = source.rotary_dim
        self.is_neox_style = source.is_neox_style
        self.style = style
        self.inv_freq64 = inv_freq.to(torch.float64)  # an attribute, not a buffer: never cast by .to(dtype)

    def forward(self, positions, query, key=None):
        cos, sin = absolute_cos_sin(positions, self.inv_freq64)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads

        def rot(x):
            shape = x.shape
            x = x.view(shape[0], -1, self.head_size)
            return rotate(x, cos, sin, self.style).to(x.dtype).view(shape)

        return rot(query), None if key is None else rot(key)


def rotary_frequencies(rotary: nn.Module) -> torch.Tensor:
    """float32 inverse frequencies equivalent to a stock rotary module, or a clear
    refusal for scaling types whose rotation is not a pure frequency change."""
    kind = type(rotary)
    if kind in (RotaryEmbedding, Llama3RotaryEmbedding):
        return rotary._compute_inv_freq(rotary.base).to(torch.float32)
    if kind is LinearScalingRotaryEmbedding and len(rotary.scaling_factors) == 1:
        return (rotary._compute_inv_freq(rotary.base) / rotary.scaling_factors[0]).to(torch.float32)
    raise ValueError(
        f"vllm-lminf cannot combine {kind.__name__} with lm_infinite/CLEX: supported RoPE "
        "scaling types are none (plain RoPE), 'linear' (one factor) and 'llama3'"
    )


class LMInfAttention(Attention):
    """vLLM's Attention on the plugin's backend; the KV spec comes from the policy."""

    def __init__(self, stock: Attention, *, pattern: LambdaPattern, rotary: RotarySource, kv_spec_factory):
        super().__init__(
            stock.num_heads,
            stock.head_size,
            stock.impl.scale,
            num_kv_heads=stock.num_kv_heads,
            prefix=stock.layer_name,
            attn_backend=LMInfAttentionBackend,
            pattern=pattern,
            rotary=rotary,
        )
        self._kv_spec_factory = kv_spec_factory

    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        return self._kv_spec_factory(self, vllm_config)


def _check_stock_attention(attn: Attention, dtype: torch.dtype) -> None:
    # Passing attn_backend= skips vLLM's checks; these are the ones that matter here.
    if dtype not in LMInfAttentionBackend.supported_dtypes:
        raise ValueError(f"vllm-lminf: dtype {dtype} not supported; use float32, bfloat16 or float16")
    if attn.sliding_window is not None:
        raise ValueError("vllm-lminf: the model already uses sliding-window attention; refusing to combine it with lm_infinite")
    if attn.kv_cache_dtype != "auto":
        raise ValueError(f"vllm-lminf: kv_cache_dtype={attn.kv_cache_dtype!r} is not supported; use 'auto'")
    if attn.attn_type != "decoder":
        raise ValueError("vllm-lminf: only causal decoder attention is supported")


def install(model: nn.Module, vllm_config: VllmConfig, *, pattern: LambdaPattern, clex, kv_spec_factory) -> int:
    """Swap every (rotary_emb, attn) pair in `model`; returns how many were swapped."""
    ctx = vllm_config.compilation_config.static_forward_context
    count = 0
    for module in list(model.modules()):
        stock = getattr(module, "attn", None)
        rope = getattr(module, "rotary_emb", None)
        if not isinstance(stock, Attention) or rope is None or isinstance(stock, LMInfAttention):
            continue
        _check_stock_attention(stock, torch.get_default_dtype())
        style = RopeStyle(rope.rotary_dim, bool(rope.is_neox_style))
        if clex is not None:
            source = RotarySource(style=style, inv_freq=torch.empty(0), clex=clex)
        else:
            inv_freq = rotary_frequencies(rope)
            absolute = absolute_path_supported(stock.head_size, clex=False)
            source = RotarySource(style=style, inv_freq=inv_freq, absolute=absolute)
        # The stock layer registered itself under this prefix; ours takes its place.
        del ctx[stock.layer_name]
        module.attn = LMInfAttention(stock, pattern=pattern, rotary=source, kv_spec_factory=kv_spec_factory)
        module.rotary_emb = AbsoluteRotary(rope, style, source.inv_freq) if source.absolute else RawKeyRotary(rope)
        count += 1
    if count == 0:
        raise ValueError(f"vllm-lminf: found no attention layer to replace in {type(model).__name__}")
    return count
