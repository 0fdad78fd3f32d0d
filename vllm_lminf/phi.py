"""Phi (phi-1, phi-1.5, phi-2) as a vLLM-native model.

vLLM 0.32 serves `PhiForCausalLM` only through its Transformers backend, where the
rotation happens inside Hugging Face code, so the plugin could not keep keys
unrotated. This module builds the model from vLLM's layers, with each attention
module computing `q, k = self.rotary_emb(positions, q, k)` then
`self.attn(q, k, v)`, which is what `vllm_lminf.attention.install` swaps.

Layout (as Hugging Face's `PhiForCausalLM`): `model.embed_tokens`,
`model.layers.N.{input_layernorm, self_attn.{q,k,v}_proj, self_attn.dense,
mlp.fc1, mlp.fc2}`, `model.final_layernorm`, `lm_head` (with bias). One LayerNorm
per layer feeds attention and MLP in parallel: `x + attn(ln(x)) + mlp(ln(x))`.
Rotary covers the first `partial_rotary_factor * head_dim` dims (neox style);
`qk_layernorm` (a LayerNorm over each head of q and k before rotation) is honoured.
"""


from collections.abc import Iterable

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import LayerNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
)

from .gpt_neox import rope_parameters_with_partial
from .native_stack import CausalLMShell, DecoderStack, GeluMLP, heads_per_rank, rotary_attention


class PhiAttention(nn.Module):
    def __init__(self, config, cache_config: CacheConfig | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = getattr(config, "num_key_value_heads", None) or self.total_num_heads
        self.head_size = getattr(config, "head_dim", None) or config.hidden_size // self.total_num_heads
        self.num_heads = heads_per_rank("Phi", self.total_num_heads)
        tp_size = get_tensor_model_parallel_world_size()
        if self.total_num_kv_heads >= tp_size:
            if self.total_num_kv_heads % tp_size:
                raise ValueError("Phi: num_key_value_heads must be divisible by tensor_parallel_size")
        elif tp_size % self.total_num_kv_heads:
            raise ValueError("Phi: tensor_parallel_size must be a multiple of num_key_value_heads")
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.q_size = self.num_heads * self.head_size
        self.kv_size = self.num_kv_heads * self.head_size

        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_size, self.total_num_heads, self.total_num_kv_heads,
            bias=True, quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.dense = RowParallelLinear(
            self.total_num_heads * self.head_size, config.hidden_size, bias=True,
            quant_config=quant_config, prefix=f"{prefix}.dense",
        )
        self.qk_layernorm = bool(getattr(config, "qk_layernorm", False))
        if self.qk_layernorm:
            eps = getattr(config, "layer_norm_eps", 1e-5)
            self.q_layernorm = LayerNorm(self.head_size, eps=eps)
            self.k_layernorm = LayerNorm(self.head_size, eps=eps)
        self.rotary_emb = get_rope(
            self.head_size,
            max_position=getattr(config, "max_position_embeddings", 2048),
            is_neox_style=True,
            rope_parameters=rope_parameters_with_partial(config, default_partial=0.5),
        )
        self.attn = Attention(
            self.num_heads, self.head_size, self.head_size**-0.5, num_kv_heads=self.num_kv_heads,
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
        )

    def _per_head_norm(self, x: torch.Tensor, norm: LayerNorm) -> torch.Tensor:
        return norm(x.view(*x.shape[:-1], -1, self.head_size)).view(x.shape)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_layernorm:
            q = self._per_head_norm(q, self.q_layernorm)
            k = self._per_head_norm(k, self.k_layernorm)
        return rotary_attention(self, positions, q, k, v)


class PhiLayer(nn.Module):
    def __init__(self, config, cache_config: CacheConfig | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, eps=getattr(config, "layer_norm_eps", 1e-5))
        self.self_attn = PhiAttention(config, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = GeluMLP(config, quant_config, f"{prefix}.mlp", up_name="fc1", down_name="fc2")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        return self.self_attn(positions, normed) + self.mlp(normed) + hidden_states


@support_torch_compile
class PhiModel(DecoderStack):
    embed_name, final_norm_name = "embed_tokens", "final_layernorm"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, make_layer=PhiLayer)


class PhiForCausalLM(CausalLMShell):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_stacked={
            ".q_proj.": (".qkv_proj.", "q"),
            ".k_proj.": (".qkv_proj.", "k"),
            ".v_proj.": (".qkv_proj.", "v"),
        },
        orig_to_new_substr={".rotary_emb.inv_freq": None},
    )

    stack_name, head_name = "model", "lm_head"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        if getattr(vllm_config.model_config.hf_config, "tie_word_embeddings", False):
            raise ValueError("Phi with tie_word_embeddings=true is not supported (its lm_head has a bias)")
        super().__init__(vllm_config=vllm_config, prefix=prefix, stack_cls=PhiModel, head_bias=True)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
