"""Model overrides: stock vLLM classes, with the plugin's attention swapped in when
the config asks for LM-Infinite or CLEX. Without either they are the stock model:
nothing is swapped and the hot path is untouched."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from . import attention
from .clex_runtime import build_clex, plain_rope_during_init
from .config import parse_lm_infinite
from .gpt_neox import GPTNeoXForCausalLM
from .phi import PhiForCausalLM


class LMInfModelMixin:
    """Put first in the bases: builds the stock model, then swaps attention in."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        with plain_rope_during_init(hf_config):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.lminf_config = lminf = parse_lm_infinite(hf_config)
        self.clex = build_clex(hf_config)
        if lminf is None and self.clex is None:
            return  # stock model, untouched
        attention.install(self, vllm_config, lminf=lminf, clex=self.clex)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if getattr(self, "clex", None) is None:
            return super().load_weights(weights)
        return self.clex.load_weights(weights, super().load_weights)


class LMInfLlamaForCausalLM(LMInfModelMixin, LlamaForCausalLM):
    pass


class LMInfMistralForCausalLM(LMInfModelMixin, MistralForCausalLM):
    pass


class LMInfQwen2ForCausalLM(LMInfModelMixin, Qwen2ForCausalLM):
    pass


class LMInfQwen3ForCausalLM(LMInfModelMixin, Qwen3ForCausalLM):
    pass


class LMInfMixtralForCausalLM(LMInfModelMixin, MixtralForCausalLM):
    pass


class LMInfPhiForCausalLM(LMInfModelMixin, PhiForCausalLM):
    """vLLM has no native Phi (only its Transformers backend): ours is in phi.py."""


class LMInfGPTNeoXForCausalLM(LMInfModelMixin, GPTNeoXForCausalLM):
    """vLLM has no native GPT-NeoX (only its Transformers backend): ours is in gpt_neox.py.

    No CLEX GPT-NeoX checkpoint has been released; one following this
    architecture's own prefix would name the CLEX tensors `gpt_neox.clex_layer.*`,
    so that spelling is accepted as well as `model.clex_layer.*`."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        prefix = "gpt_neox.clex_layer."
        renamed = (
            ("model.clex_layer." + name[len(prefix):] if name.startswith(prefix) else name, tensor)
            for name, tensor in weights
        )
        return super().load_weights(renamed)
