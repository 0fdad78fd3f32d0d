"""Attention backend glue: vLLM metadata in, Λ attention out.

The cache tensor has CPU_ATTN's shape ([num_blocks, kv_heads, block_size, 2 * head_size]),
inherited from CPUAttentionBackend. Two ways to fill and read it:
  - absolute (the CPU fast path: plain RoPE or fixed scaling, x86, head size a multiple
    of 32): vLLM's own CPU layout with keys rotated at their absolute position (float64
    angles). Sequences that never leave the window are plain causal attention, so they
    run on vLLM's own CPU kernel; the others (decodes and prefill chunks past the
    window) our C++ kernel (`lminf_kernels.cpu_lambda`).
  - raw (CLEX, whose frequencies change per step, CUDA/Triton, anything else): keys
    stored unrotated, rotated at clamped distances when read (`lminf_kernels.lambda_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lminf_kernels.cpu_lambda import QueryPlan, lambda_attention_absolute
from lminf_kernels.lambda_attention import lambda_paged_attention, store_kv
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle
from vllm.v1.attention.backend import (
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.platforms import CpuArchEnum, current_platform
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

# vLLM CPU attention ISA whose cache layout cpu_lambda reads (keys dim-major per block).
CPU_ISA = "vec"

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
    absolute: bool = False  # CPU fast path: q/k arrive rotated at absolute positions (AbsoluteRotary)

    def frequencies(self, metadata: LMInfMetadata) -> torch.Tensor:
        if self.clex is None:
            return self.inv_freq
        return self.clex.frequencies(metadata)

    def query_scale(self, metadata: LMInfMetadata) -> list[float] | None:
        return None if self.clex is None else self.clex.query_scale(metadata)


@dataclass
class AbsoluteStep:
    """What every layer of one step shares on the absolute path."""

    inside: list[int]  # sequences that never leave the window: vLLM's kernel
    beyond: list[int]  # the others: ours
    vllm_batch: tuple | None  # (token index or None, query_start_loc, seq_lens, block_table, scheduler metadata)
    plan: QueryPlan | None  # our kernel's inputs for the `beyond` rows

    @classmethod
    def build(cls, md: LMInfMetadata, impl: "LMInfAttentionImpl", inv_freq: torch.Tensor, dtype) -> "AbsoluteStep":
        from vllm import _custom_ops as ops
        from vllm import envs

        qsl, lens, w = md.query_start_loc, md.seq_lens, impl.pattern.n_local
        # A sequence no longer than the window has no global branch and a window that
        # covers everything: plain causal attention.
        inside = [i for i, s in enumerate(lens) if s <= w]
        beyond = [i for i, s in enumerate(lens) if s > w]
        vllm_batch = None
        if inside:
            if not beyond:
                tokens, sub_qsl, sub_lens, table = None, md.query_start_loc_dev, md.seq_lens_dev, md.block_table
            else:
                tokens = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in inside])
                sub_qsl = torch.tensor([0] + [qsl[i + 1] - qsl[i] for i in inside], dtype=torch.int32).cumsum(0)
                sub_qsl = sub_qsl.to(torch.int32)
                sub_lens = torch.tensor([lens[i] for i in inside], dtype=torch.int32)
                table = md.block_table[torch.tensor(inside)]
            sched = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(inside), num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads,
                head_dim=impl.head_size, seq_lens=sub_lens, dtype=dtype, query_start_loc=sub_qsl, causal=True,
                sliding_window_size=-1, isa=CPU_ISA, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            )
            vllm_batch = (tokens, sub_qsl, sub_lens, table, sched)
        plan = QueryPlan.build(beyond, qsl, lens, impl.pattern, inv_freq) if beyond else None
        return cls(inside, beyond, vllm_batch, plan)


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
        if n == 0:
            return output
        if self.rotary.absolute:
            self._forward_absolute(query[:n], key[:n], value[:n], kv_cache, attn_metadata, output[:n])
            return output
        # raw keys: stored unrotated, rotated at clamped distances when read
        store_kv(kv_cache, attn_metadata.slot_mapping, key[:n], value[:n])
        if query.is_cuda:
            attend, qsl, lens = _triton_kernel(), attn_metadata.query_start_loc_dev, attn_metadata.seq_lens_dev
        else:
            attend, qsl, lens = lambda_paged_attention, attn_metadata.query_start_loc, attn_metadata.seq_lens
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
        )
        return output

    def _forward_absolute(self, query, key, value, kv_cache, md: LMInfMetadata, out) -> None:
        from vllm import _custom_ops as ops

        step = md.step_cache.get("absolute")
        if step is None:
            step = md.step_cache["absolute"] = AbsoluteStep.build(md, self, self.rotary.inv_freq, query.dtype)
        # query and key arrive rotated at their absolute positions (AbsoluteRotary)
        num_blocks, hkv, bs, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, hkv, 2 * bs, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value.contiguous(), key_cache, value_cache, md.slot_mapping[: key.shape[0]],
                                       CPU_ISA, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        if step.vllm_batch is not None:
            tokens, sub_qsl, sub_lens, table, sched = step.vllm_batch
            sub_q = query if tokens is None else query.index_select(0, tokens)
            sub_out = out if tokens is None else torch.empty_like(sub_q)
            ops.cpu_attention_with_kv_cache(
                query=sub_q, key_cache=key_cache, value_cache=value_cache, output=sub_out,
                query_start_loc=sub_qsl, seq_lens=sub_lens, scale=self.scale, causal=True, alibi_slopes=None,
                sliding_window=-1, block_table=table, softcap=0.0, scheduler_metadata=sched, s_aux=None,
            )
            if tokens is not None:
                out.index_copy_(0, tokens, sub_out)
        if step.beyond:
            lambda_attention_absolute(
                query, kv_cache, md.block_table, md.query_start_loc, md.seq_lens, pattern=self.pattern,
                style=self.rotary.style,
                inv_freq=self.rotary.inv_freq, scale=self.scale, out=out, plan=step.plan,
                sequences=step.beyond,
            )

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        raise AssertionError("LMInfAttentionBackend stores K/V inside forward (forward_includes_kv_cache_update)")


def absolute_path_supported(head_size: int, *, clex: bool) -> bool:
    """The CPU fast path needs fixed frequencies (not CLEX), vLLM's x86 CPU kernels and a
    head size their "vec" layout takes."""
    return (
        not clex
        and current_platform.is_cpu()
        and current_platform.get_cpu_architecture() == CpuArchEnum.X86
        and head_size % 32 == 0
    )


class LMInfAttentionBackend(CPUAttentionBackend):
    # K/V are written inside forward: the absolute path rotates keys at positions that
    # only the step metadata knows.
    forward_includes_kv_cache_update: bool = True
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
