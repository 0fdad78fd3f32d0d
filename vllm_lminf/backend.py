"""Attention backend glue: vLLM metadata in, Λ attention over raw keys out.

The cache layout is CPU_ATTN's ([num_blocks, kv_heads, block_size, 2 * head_size],
K then V on the last dim), inherited from CPUAttentionBackend; what differs is what
is stored (keys before rotation) and how attention is computed (`lminf_kernels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lminf_kernels.lambda_attention import lambda_paged_attention, store_kv
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle
from vllm.v1.attention.backend import (
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

BACKEND_NAME = "LMINF_ATTN"


@dataclass
class LMInfMetadata:
    num_actual_tokens: int
    # Python lists: read by every layer's loop, converted once per step.
    query_start_loc: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    # The same two on the device (read by the Triton kernel on CUDA).
    query_start_loc_dev: torch.Tensor
    seq_lens_dev: torch.Tensor
    # Per-step values shared by every layer (CLEX frequency rows, query scales).
    step_cache: dict[str, Any]


class LMInfMetadataBuilder(AttentionMetadataBuilder[LMInfMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> LMInfMetadata:
        m = common_attn_metadata
        return LMInfMetadata(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc_cpu[: m.num_reqs + 1].tolist(),
            seq_lens=m.seq_lens[: m.num_reqs].cpu().tolist(),
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
            query_start_loc_dev=m.query_start_loc[: m.num_reqs + 1],
            seq_lens_dev=m.seq_lens[: m.num_reqs],
            step_cache={},
        )


@dataclass(frozen=True)
class RotarySource:
    """Frequencies and layout of a model's RoPE, taken from its stock rotary module.

    `frequencies(metadata)` gives [R/2] (shared) or [num_seqs, R/2] (CLEX) float32,
    and `query_scale(metadata)` a per-sequence query multiplier or None.
    """

    style: RopeStyle
    inv_freq: torch.Tensor
    clex: Any = None  # vllm_lminf.clex_runtime.ClexFrequencies, set when the config asks for CLEX

    def frequencies(self, metadata: LMInfMetadata) -> torch.Tensor:
        if self.clex is None:
            return self.inv_freq
        return self.clex.frequencies(metadata)

    def query_scale(self, metadata: LMInfMetadata) -> list[float] | None:
        return None if self.clex is None else self.clex.query_scale(metadata)


def _triton_kernel():
    # Imported on first CUDA use only: the CPU path must not need a working Triton.
    from lminf_kernels.triton_lambda import lambda_paged_attention_triton

    return lambda_paged_attention_triton


class LMInfAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        *,
        pattern: LambdaPattern,
        rotary: RotarySource,
    ) -> None:
        # Attention() skips backend validation when given attn_backend=: refuse here
        # whatever this implementation does not compute.
        unsupported = {
            "alibi_slopes": alibi_slopes is not None,
            "sliding_window": sliding_window is not None,
            "logits_soft_cap": bool(logits_soft_cap),
            "kv_cache_dtype != auto": kv_cache_dtype != "auto",
            "attn_type != decoder": attn_type != AttentionType.DECODER,
            "kv sharing": kv_sharing_target_layer_name is not None,
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"vllm-lminf attention does not support: {', '.join(bad)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.pattern = pattern
        self.rotary = rotary

    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: LMInfMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("vllm-lminf attention does not support fused output quantization")
        if attn_metadata is None:  # profiling / compile warm-up: no cache, no work
            return output
        n = attn_metadata.num_actual_tokens
        kwargs = {}
        if query.is_cuda:
            attend, qsl, lens = _triton_kernel(), attn_metadata.query_start_loc_dev, attn_metadata.seq_lens_dev
        else:
            attend, qsl, lens = lambda_paged_attention, attn_metadata.query_start_loc, attn_metadata.seq_lens
            kwargs["prerotated"] = self._prerotate(query)
        attend(
            query[:n],
            kv_cache,
            attn_metadata.block_table,
            qsl,
            lens,
            pattern=self.pattern,
            style=self.rotary.style,
            inv_freq=self.rotary.frequencies(attn_metadata),
            scale=self.scale,
            query_scale=self.rotary.query_scale(attn_metadata),
            out=output[:n],
            **kwargs,
        )
        return output

    def _prerotate(self, x: torch.Tensor) -> bool:
        """Store keys rotated within their block (decode then rotates only the query)
        on the CPU path, when the frequencies never change; raw keys otherwise (CLEX
        changes them per step; the Triton kernel reads raw keys)."""
        return self.rotary.clex is None and not x.is_cuda

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store this step's keys (raw, or rotated within their block; never at their
        absolute position) and values."""
        if self._prerotate(key):
            store_kv(kv_cache, slot_mapping, key, value, style=self.rotary.style, inv_freq=self.rotary.inv_freq)
        else:
            store_kv(kv_cache, slot_mapping, key, value)


class LMInfAttentionBackend(CPUAttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[LMInfAttentionImpl]:
        return LMInfAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[LMInfMetadataBuilder]:
        return LMInfMetadataBuilder

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False
