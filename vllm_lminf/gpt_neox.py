"""GPT-NeoX (Pythia, GPT-NeoX-20B, ...) as a vLLM-native model.

vLLM 0.32 has no native GPT-NeoX; it serves the architecture through its
Transformers backend, where rotation happens inside Hugging Face code and the
plugin cannot keep keys unrotated. This module builds the model from vLLM's
layers instead, with each attention module computing
`q, k = self.rotary_emb(positions, q, k)` then `self.attn(q, k, v)`, which is what
`vllm_lminf.attention.install` swaps.

Layout (as Hugging Face's `GPTNeoXForCausalLM`):
  - `gpt_neox.embed_in`, `gpt_neox.layers.N.*`, `gpt_neox.final_layer_norm`,
    head `embed_out` (transformers 5 calls it `lm_head`; both names load);
  - fused `attention.query_key_value` whose output rows are laid out per head,
    [heads, 3 (q, k, v), head_dim]; loading splits it into vLLM's
    [q heads | k heads | v heads] shards, so tensor parallelism slices heads as for
    any other model;
  - rotary on the first `partial_rotary_factor * head_dim` dims (config
    `rotary_pct` in older configs), neox ("rotate halves") style;
  - LayerNorm, GELU MLP (`dense_h_to_4h`, `dense_4h_to_h`), and the parallel
    residual `x + attn(ln1(x)) + mlp(ln2(x))` when `use_parallel_residual`
    (otherwise sequential).
"""


from collections.abc import Iterable, Iterator

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import LayerNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
)

from .native_stack import CausalLMShell, DecoderStack, GeluMLP, heads_per_rank, rotary_attention


def rope_parameters_with_partial(config, *, default_partial: float, theta_names=("rope_theta",),
                                 partial_names=("partial_rotary_factor",)) -> dict:
    """The config's rope parameters with `rope_theta` and `partial_rotary_factor`
    filled in from older top-level names when transformers did not fold them in."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params.get("rope_theta") is None:
        theta = next((getattr(config, n) for n in theta_names if getattr(config, n, None) is not None), 10000.0)
        params["rope_theta"] = float(theta)
    if params.get("partial_rotary_factor") is None:
        partial = next((getattr(config, n) for n in partial_names if getattr(config, n, None) is not None),
                       default_partial)
        params["partial_rotary_factor"] = float(partial)
    params.setdefault("rope_type", "default")
    return params


def neox_rope_parameters(config) -> dict:
    return rope_parameters_with_partial(
        config, default_partial=0.25, theta_names=("rope_theta", "rotary_emb_base"),
        partial_names=("partial_rotary_factor", "rotary_pct"),
    )


class GPTNeoXAttention(nn.Module):
    def __init__(self, config, cache_config: CacheConfig | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.total_num_heads = config.num_attention_heads
        self.hidden_size = config.hidden_size
        if self.hidden_size % self.total_num_heads:
            raise ValueError("GPT-NeoX: hidden_size must be a multiple of num_attention_heads")
        self.head_size = self.hidden_size // self.total_num_heads
        self.num_heads = heads_per_rank("GPT-NeoX", self.total_num_heads)
        bias = getattr(config, "attention_bias", True)

        self.query_key_value = QKVParallelLinear(
            config.hidden_size, self.head_size, self.total_num_heads, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.query_key_value",
        )
        self.dense = RowParallelLinear(
            config.hidden_size, config.hidden_size, bias=bias,
            quant_config=quant_config, prefix=f"{prefix}.dense",
        )
        self.rotary_emb = get_rope(
            self.head_size,
            max_position=getattr(config, "max_position_embeddings", 8192),
            is_neox_style=True,
            rope_parameters=neox_rope_parameters(config),
        )
        self.attn = Attention(
            self.num_heads, self.head_size, self.head_size**-0.5,
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.query_key_value(hidden_states)
        q, k, v = qkv.chunk(chunks=3, dim=-1)
        return rotary_attention(self, positions, q, k, v)


class GPTNeoXLayer(nn.Module):
    def __init__(self, config, cache_config: CacheConfig | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.use_parallel_residual = getattr(config, "use_parallel_residual", True)
        eps = getattr(config, "layer_norm_eps", 1e-5)
        self.input_layernorm = LayerNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=eps)
        self.attention = GPTNeoXAttention(config, cache_config, quant_config, prefix=f"{prefix}.attention")
        self.mlp = GeluMLP(config, quant_config, f"{prefix}.mlp", up_name="dense_h_to_4h", down_name="dense_4h_to_h")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        attn_output = self.attention(positions, self.input_layernorm(hidden_states))
        if self.use_parallel_residual:
            mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
            return mlp_output + attn_output + hidden_states
        attn_output = attn_output + hidden_states
        return self.mlp(self.post_attention_layernorm(attn_output)) + attn_output


@support_torch_compile
class GPTNeoXModel(DecoderStack):
    embed_name, final_norm_name = "embed_in", "final_layer_norm"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, make_layer=GPTNeoXLayer)


def split_fused_qkv(weights: Iterable[tuple[str, torch.Tensor]], num_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn each HF `query_key_value.{weight,bias}` (rows per head: [H, 3, D]) into
    three tensors named `...query_key_value.{q,k,v}_part.*` holding the q, k and v
    rows of all heads, in head order. Everything else passes through."""
    for name, tensor in weights:
        module, _, kind = name.rpartition(".")
        if not module.endswith(".query_key_value") or kind not in ("weight", "bias"):
            yield name, tensor
            continue
        rows = tensor.shape[0]
        if rows % (3 * num_heads):
            raise ValueError(f"{name}: {rows} rows is not 3 x num_attention_heads ({num_heads}) x head_dim")
        per_head = tensor.reshape(num_heads, 3, rows // (3 * num_heads), *tensor.shape[1:])
        for i, part in enumerate("qkv"):
            yield f"{module}.{part}_part.{kind}", per_head[:, i].reshape(rows // 3, *tensor.shape[1:])


class GPTNeoXForCausalLM(CausalLMShell):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".query_key_value.q_part.": (".query_key_value.", "q"),
            ".query_key_value.k_part.": (".query_key_value.", "k"),
            ".query_key_value.v_part.": (".query_key_value.", "v"),
        },
        orig_to_new_prefix={"lm_head.": "embed_out."},
        orig_to_new_substr={
            # buffers of old checkpoints (causal mask, masked bias, rotary cache)
            ".attention.bias": None,
            ".attention.masked_bias": None,
            ".rotary_emb.inv_freq": None,
        },
    )

    stack_name, head_name = "gpt_neox", "embed_out"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, stack_cls=GPTNeoXModel, head_bias=False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)  # handles a tied embed_out itself
        weights = split_fused_qkv(weights, self.config.num_attention_heads)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
