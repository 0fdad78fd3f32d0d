"""What the plugin's native models (`phi.py`, `gpt_neox.py`) share: the decoder stack
(embedding, a pipeline-parallel slice of layers, final LayerNorm) and the causal-LM shell
around it (LM head, logits). vLLM 0.32 serves both architectures only through its
Transformers backend, where rotation happens inside Hugging Face code and the plugin
could not keep keys unrotated; these are built from vLLM's own layers instead.

Subclasses name the parts as their Hugging Face checkpoints do (so weights load by name)
and give the layer class; the concrete model class carries `@support_torch_compile`.
(No `from __future__ import annotations` here: that decorator reads forward's annotations.)
"""


from collections.abc import Callable
from itertools import islice

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.layernorm import LayerNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import make_empty_intermediate_tensors_factory, make_layers, maybe_prefix
from vllm.sequence import IntermediateTensors


def heads_per_rank(arch: str, total_heads: int) -> int:
    """Query heads of this tensor-parallel rank, or a clear refusal."""
    tp_size = get_tensor_model_parallel_world_size()
    if total_heads % tp_size:
        raise ValueError(f"{arch}: num_attention_heads={total_heads} is not divisible by "
                         f"tensor_parallel_size={tp_size}")
    return total_heads // tp_size


def rotary_attention(module: nn.Module, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> torch.Tensor:
    """`rotary_emb`, `attn`, then the output projection `dense`: the pair of children
    `vllm_lminf.attention.install` swaps is called exactly as in vLLM's own models."""
    q, k = module.rotary_emb(positions, q, k)
    output, _ = module.dense(module.attn(q, k, v))
    return output


class GeluMLP(nn.Module):
    """hidden -> intermediate -> activation -> hidden, both projections with bias, named
    as the checkpoint names them (`up_name`, `down_name`)."""

    def __init__(self, config, quant_config, prefix: str, *, up_name: str, down_name: str) -> None:
        super().__init__()
        self.up_name, self.down_name = up_name, down_name
        setattr(self, up_name, ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True,
                                                    quant_config=quant_config, prefix=f"{prefix}.{up_name}"))
        setattr(self, down_name, RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True,
                                                   quant_config=quant_config, prefix=f"{prefix}.{down_name}"))
        self.act = get_act_fn(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, _ = getattr(self, self.up_name)(hidden_states)
        hidden_states, _ = getattr(self, self.down_name)(self.act(hidden_states))
        return hidden_states


class DecoderStack(nn.Module):
    embed_name: str  # e.g. "embed_tokens"
    final_norm_name: str  # e.g. "final_layernorm"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str, make_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.config = config
        setattr(self, self.embed_name, VocabParallelEmbedding(config.vocab_size, config.hidden_size))
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: make_layer(config, cache_config, quant_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        setattr(self, self.final_norm_name,
                LayerNorm(config.hidden_size, eps=getattr(config, "layer_norm_eps", 1e-5)))
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.embed_name)(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states = layer(positions, hidden_states)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states})
        return getattr(self, self.final_norm_name)(hidden_states)


class CausalLMShell(nn.Module, SupportsPP):
    """A `DecoderStack` under `stack_name`, an LM head under `head_name`."""

    stack_name: str
    head_name: str

    def __init__(self, *, vllm_config: VllmConfig, prefix: str, stack_cls: type[DecoderStack],
                 head_bias: bool) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        stack = stack_cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, self.stack_name))
        setattr(self, self.stack_name, stack)
        head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=head_bias,
                              quant_config=vllm_config.quant_config, prefix=maybe_prefix(prefix, self.head_name))
        if getattr(config, "tie_word_embeddings", False):
            head = head.tie_weights(getattr(stack, stack.embed_name))
        setattr(self, self.head_name, head)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = stack.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.stack_name).embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return getattr(self, self.stack_name)(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        head = getattr(self, self.head_name)
        return self.logits_processor(head, hidden_states, getattr(head, "bias", None))
