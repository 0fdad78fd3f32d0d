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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from vllm.config import get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
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
from lminf_kernels.raw_torch import lambda_paged_attention, merge_middle, update_block_summaries
from lminf_kernels.rope import RopeStyle

from .. import vllm_compat
from lminf_kernels.topk import TopKRows

from .common import BlockSummaries, LambdaBackend, StepBatch, group_top_k, no_work, refuse_unsupported, step_top_k

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
    """A model's RoPE for the raw path: fixed frequencies, or CLEX (`ClexFrequencies`,
    which picks a frequency row per query row; see `clex_runtime`)."""

    style: RopeStyle
    inv_freq: torch.Tensor | None = None
    clex: Any = None


@dataclass
class RawMetadata:
    batch: StepBatch  # the kernels' sequences (with CLEX: runs of query rows at one t)
    inv_freq: torch.Tensor  # [R/2] shared, or [len(batch.seq_lens), R/2] per sequence
    query_scale: list[float] | None  # per sequence (CLEX log_scale)
    top_k: TopKRows | None = None  # the step's rule for the group's top-k layers


class RawMetadataBuilder(AttentionMetadataBuilder[RawMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        impls = [layer.impl for layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).values()]
        sources = {id(impl.rotary): impl.rotary for impl in impls}
        self.top_k = group_top_k(impls, kv_cache_spec.block_size, impls[0].pattern.n_local)
        self.rotary = next(iter(sources.values()))
        if any(r.clex is not self.rotary.clex or r.style != self.rotary.style for r in sources.values()):
            raise ValueError("vllm-lminf: all layers of one KV-cache group must share one RoPE")
        if self.rotary.clex is not None:
            vllm_compat.track_prompt_lengths()

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RawMetadata:
        m = common_attn_metadata
        batch = StepBatch.of(m)
        clex = self.rotary.clex
        if clex is None:
            return RawMetadata(batch, self.rotary.inv_freq, None,
                               step_top_k(self.top_k, m.num_reqs, None, batch, self.kv_cache_spec.block_size))
        qsl, lens, owner, freqs, scale = clex.regroup(batch.query_start_loc, batch.seq_lens,
                                                      vllm_compat.prompt_lengths(m.num_reqs))
        device = batch.query_start_loc_dev.device
        runs = StepBatch(
            num_actual_tokens=batch.num_actual_tokens, query_start_loc=qsl, seq_lens=lens,
            block_table=batch.block_table[torch.tensor(owner, dtype=torch.long, device=batch.block_table.device)],
            query_start_loc_dev=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens_dev=torch.tensor(lens, dtype=torch.int32, device=device),
        )
        return RawMetadata(runs, freqs.to(device), scale,
                           step_top_k(self.top_k, m.num_reqs, owner, runs, self.kv_cache_spec.block_size))


def _use_triton(query: torch.Tensor) -> bool:
    return query.is_cuda or os.environ.get(KERNEL_ENV) == "triton"


class RawImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, *vllm_args,
                 pattern: LambdaPattern, rotary: RotarySource, top_k=None, **vllm_kwargs) -> None:
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
        self.top_k = top_k  # TopKConfig when this layer attends the top-k middle keys
        self.summaries = BlockSummaries()  # block mode

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        store_kv(raw_views(kv_cache), slot_mapping, key, value)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: RawMetadata | None, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if no_work(attn_metadata, output_scale, output_block_scale):
            return output
        b = attn_metadata.batch
        n = b.num_actual_tokens
        if n == 0:
            return output
        kw = dict(pattern=self.pattern, style=self.rotary.style, inv_freq=attn_metadata.inv_freq,
                  scale=self.scale, query_scale=attn_metadata.query_scale, out=output[:n])
        top_k = attn_metadata.top_k if self.top_k is not None else None
        if top_k is not None and top_k.blocks:
            kw["block_summary"] = summary = self.summaries.of(kv_cache)
            update_block_summaries(kv_cache, summary, top_k.filled)
        if _use_triton(query):
            # Imported on first use only: the CPU path must not need a working Triton.
            from lminf_kernels.raw_triton import lambda_paged_attention_triton, middle_scores_triton
            with_top_k = top_k is not None and any(top_k.uses(i, s - 1, self.pattern) for i, s in enumerate(b.seq_lens))
            lse = query.new_empty((n, query.shape[1]), dtype=torch.float32) if with_top_k else None
            lambda_paged_attention_triton(query[:n], kv_cache, b.block_table, b.query_start_loc_dev, b.seq_lens_dev,
                                          lse=lse, **{k: v for k, v in kw.items() if k != "block_summary"})
            if with_top_k:  # Λ and its log-sum-exp from the kernel; the middle partial merged in
                merge_middle(query[:n], kv_cache, b.block_table, b.query_start_loc, b.seq_lens, output[:n], lse,
                             top_k=top_k, scores=middle_scores_triton, **{k: v for k, v in kw.items() if k != "out"})
            return output
        lambda_paged_attention(query[:n], kv_cache, b.block_table, b.query_start_loc, b.seq_lens, top_k=top_k, **kw)
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
