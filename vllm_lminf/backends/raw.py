"""The raw-key path: keys stored unrotated, rotated when read at clamped distances.

Serves CLEX (whose frequencies change with a sequence's length), CUDA, and every model
the CPU fast path does not take. The model's rotary module becomes a pass-through
(`RawKeyRotary`); the `RotarySource` beside it gives each step's frequencies (fixed, or
CLEX rows per sequence). Kernels: torch (`lminf_kernels.raw_torch`) on CPU, Triton
(`lminf_kernels.raw_triton`) on CUDA. The test-only switch LMINF_RAW_KERNEL=triton runs
the Triton route on CPU tensors under TRITON_INTERPRET=1, so the wiring from vLLM's
metadata to the Triton kernel is exercised inside an engine on machines without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from lminf_kernels.paged import raw_views, store_kv
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.raw_torch import lambda_paged_attention
from lminf_kernels.rope import RopeStyle

from .common import LambdaBackend, StepBatch, refuse_output_quant, refuse_unsupported

from . import RAW as NAME
KERNEL_ENV = "LMINF_RAW_KERNEL"  # "triton" forces the Triton kernel (tests, with TRITON_INTERPRET=1 on CPU)


class RawKeyRotary(nn.Module):
    """Stands in for the stock rotary module: returns q and k unrotated."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.head_size = source.head_size
        self.rotary_dim = source.rotary_dim
        self.is_neox_style = source.is_neox_style

    def forward(self, positions, query, key=None):
        return query, key


@dataclass(frozen=True)
class RotarySource:
    """A model's RoPE for the raw path: fixed frequencies, or CLEX rows per sequence.

    `frequencies(md)` gives [R/2] (shared) or [num_seqs, R/2] (CLEX) float32, and
    `query_scale(md)` a per-sequence query multiplier or None."""

    style: RopeStyle
    inv_freq: torch.Tensor | None = None
    clex: Any = None  # vllm_lminf.clex_runtime.ClexFrequencies

    def frequencies(self, md: RawMetadata) -> torch.Tensor:
        return self.inv_freq if self.clex is None else self.clex.frequencies(md)

    def query_scale(self, md: RawMetadata) -> list[float] | None:
        return None if self.clex is None else self.clex.query_scale(md)


@dataclass
class RawMetadata:
    batch: StepBatch
    # Per-step values shared by every layer (CLEX frequency rows, query scales).
    step_cache: dict[str, Any] = field(default_factory=dict)

    @property
    def seq_lens(self) -> list[int]:
        return self.batch.seq_lens


class RawMetadataBuilder(AttentionMetadataBuilder[RawMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        # required: vLLM declares the builder constructor abstract
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RawMetadata:
        return RawMetadata(StepBatch.of(common_attn_metadata))


def _use_triton(query: torch.Tensor) -> bool:
    return query.is_cuda or os.environ.get(KERNEL_ENV) == "triton"


class RawImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, *vllm_args,
                 pattern: LambdaPattern, rotary: RotarySource, **vllm_kwargs) -> None:
        refuse_unsupported(*vllm_args, **vllm_kwargs)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = "auto"
        self.attn_type = AttentionType.DECODER
        self.kv_sharing_target_layer_name = None
        self.pattern = pattern
        self.rotary = rotary

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        store_kv(raw_views(kv_cache), slot_mapping, key, value)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: RawMetadata | None, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        refuse_output_quant(output_scale, output_block_scale)
        if attn_metadata is None:  # profiling / compile warm-up: no cache, no work
            return output
        b = attn_metadata.batch
        n = b.num_actual_tokens
        if n == 0:
            return output
        if _use_triton(query):
            # Imported on first use only: the CPU path must not need a working Triton.
            from lminf_kernels.raw_triton import lambda_paged_attention_triton as attend
            qsl, lens = b.query_start_loc_dev, b.seq_lens_dev
        else:
            attend, qsl, lens = lambda_paged_attention, b.query_start_loc, b.seq_lens
        attend(
            query[:n], kv_cache, b.block_table, qsl, lens,
            pattern=self.pattern, style=self.rotary.style, inv_freq=self.rotary.frequencies(attn_metadata),
            scale=self.scale, query_scale=self.rotary.query_scale(attn_metadata), out=output[:n],
        )
        return output


class RawBackend(LambdaBackend, AttentionBackend):
    NAME, IMPL, BUILDER = NAME, RawImpl, RawMetadataBuilder
    forward_includes_kv_cache_update = False  # vLLM calls RawImpl.do_kv_cache_update first
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # [num_blocks, kv_heads, block_size, 2 * head_size] per layer, blocks contiguous
        return (KVCacheLayout.LBHNC,)
