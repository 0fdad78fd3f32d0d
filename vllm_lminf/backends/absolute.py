"""The CPU fast path: keys rotated at absolute positions, in vLLM's own CPU cache layout.

`AbsoluteRotary` replaces the model's rotary module: q and k are rotated at each token's
absolute position with angles taken in float64, inside the compiled graph, and vLLM's
own `do_kv_cache_update` stores the keys. A local logit is then already at distance
p - j; a global key j is read with the query rotated by d - p + j (the clamped distance d).

Per step, sequences no longer than the window are plain causal attention: they go to
vLLM's own CPU attention code (its metadata builder and impl, reused through
subclassing). Decodes and prefill chunks past the window go to the C++ kernel
(`lminf_kernels.absolute_cpu`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from vllm.config import get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.platforms import CpuArchEnum, current_platform
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from lminf_kernels.absolute_cpu import QueryPlan, lambda_attention_absolute
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle, absolute_cos_sin, rotate

from .. import vllm_compat
from .common import LambdaBackend, StepBatch, refuse_output_quant, refuse_unsupported

from . import ABSOLUTE as NAME
# vLLM CPU attention ISA whose cache layout our C++ kernel reads (keys dim-major per
# block). vLLM would pick "amx" for bf16 on AMX machines; its "vec" kernel runs on every x86.
ISA = "vec"


def supported(head_size: int) -> bool:
    """vLLM's x86 CPU kernels with a head size their "vec" layout takes."""
    return (
        current_platform.is_cpu()
        and current_platform.get_cpu_architecture() == CpuArchEnum.X86
        and head_size % 32 == 0
    )


class AbsoluteRotary(nn.Module):
    """RoPE at each token's absolute position, angles taken in float64 (stock's float32
    table loses ~0.06 rad at position 10^6)."""

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


@dataclass
class AbsoluteMetadata:
    batch: StepBatch
    inside: CPUAttentionMetadata | None  # vLLM's metadata for the sequences inside the window
    inside_rows: torch.Tensor | None  # their query rows, None when they are all the rows
    beyond: list[int]  # the other sequences: our kernel
    plan: QueryPlan | None  # our kernel's inputs for them


def _subset(m: CommonAttentionMetadata, batch: StepBatch, seqs: list[int]) -> tuple[CommonAttentionMetadata, torch.Tensor]:
    """vLLM's batch metadata restricted to the sequences `seqs`, and their query rows."""
    qsl = batch.query_start_loc
    rows = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in seqs])
    counts = [qsl[i + 1] - qsl[i] for i in seqs]
    sub_qsl = torch.tensor([0] + counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    index = torch.tensor(seqs)
    sub = m.replace(
        query_start_loc=sub_qsl, query_start_loc_cpu=sub_qsl, seq_lens=m.seq_lens[index], num_reqs=len(seqs),
        num_actual_tokens=len(rows), max_query_len=max(counts), max_seq_len=max(batch.seq_lens[i] for i in seqs),
        block_table_tensor=m.block_table_tensor[index], slot_mapping=m.slot_mapping[rows], positions=None,
        _num_computed_tokens_cache=None, _token_to_req_indices_cache=None,
    )
    return sub, rows


class AbsoluteMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        vllm_compat.force_cpu_attention_isa(self, ISA)
        impls = {id(layer.impl): layer.impl
                 for layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).values()}
        patterns = {(i.pattern, tuple(i.inv_freq.tolist())) for i in impls.values()}
        if len(patterns) != 1:
            raise ValueError("vllm-lminf: all layers of one KV-cache group must share one Λ pattern and RoPE")
        impl = next(iter(impls.values()))
        self.pattern, self.inv_freq = impl.pattern, impl.inv_freq

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AbsoluteMetadata:
        m = common_attn_metadata
        batch = StepBatch.of(m)
        # A sequence no longer than the window has no global branch and a window that
        # covers everything: plain causal attention, vLLM's kernel.
        inside = [i for i, s in enumerate(batch.seq_lens) if s <= self.pattern.n_local]
        beyond = [i for i, s in enumerate(batch.seq_lens) if s > self.pattern.n_local]
        vllm_md, rows = None, None
        if inside:
            sub = m
            if beyond:
                sub, rows = _subset(m, batch, inside)
            vllm_md = super().build(common_prefix_len, sub, fast_build)
        plan = QueryPlan.build(beyond, batch.query_start_loc, batch.seq_lens, self.pattern, self.inv_freq) \
            if beyond else None
        return AbsoluteMetadata(batch, vllm_md, rows, beyond, plan)


class AbsoluteImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, *vllm_args,
                 pattern: LambdaPattern, style: RopeStyle, inv_freq: torch.Tensor, **vllm_kwargs) -> None:
        refuse_unsupported(*vllm_args, **vllm_kwargs)
        super().__init__(num_heads, head_size, scale, num_kv_heads, None, None, "auto")
        self.pattern, self.style, self.inv_freq = pattern, style, inv_freq

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: AbsoluteMetadata | None, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        refuse_output_quant(output_scale, output_block_scale)
        if attn_metadata is None:  # profiling / compile warm-up: no cache, no work
            return output
        md = attn_metadata
        n = md.batch.num_actual_tokens
        if md.inside is not None:
            if md.inside_rows is None:
                super().forward(layer, query, key, value, kv_cache, md.inside, output)
            else:
                sub_out = query.new_empty(query[: len(md.inside_rows)].shape)
                super().forward(layer, query.index_select(0, md.inside_rows), None, None, kv_cache, md.inside, sub_out)
                output[:n].index_copy_(0, md.inside_rows, sub_out.to(output.dtype))
        if md.beyond:
            lambda_attention_absolute(
                query[:n], kv_cache, md.batch.block_table, md.batch.query_start_loc, md.batch.seq_lens,
                pattern=self.pattern, style=self.style, inv_freq=self.inv_freq, scale=self.scale, out=output[:n],
                plan=md.plan, sequences=md.beyond,
            )
        return output


class AbsoluteBackend(LambdaBackend, CPUAttentionBackend):
    """vLLM's CPU backend (cache layout, kv-cache update) with the Λ kernel past the window."""

    NAME, IMPL, BUILDER = NAME, AbsoluteImpl, AbsoluteMetadataBuilder
