"""What both backends share: the step's batch as plain lists, and the refusal of
attention features the Λ kernels do not compute."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata

from lminf_kernels.topk import TopKRows, filled_blocks

from .. import vllm_compat
from ..config import TopKConfig


@dataclass
class StepBatch:
    num_actual_tokens: int
    # Python lists: read by every layer's loop, converted once per step.
    query_start_loc: list[int]
    seq_lens: list[int]
    block_table: torch.Tensor
    # The same two on the device (read by the Triton kernel).
    query_start_loc_dev: torch.Tensor
    seq_lens_dev: torch.Tensor

    @classmethod
    def of(cls, m: CommonAttentionMetadata) -> "StepBatch":
        return cls(
            num_actual_tokens=m.num_actual_tokens,
            query_start_loc=m.query_start_loc_cpu[: m.num_reqs + 1].tolist(),
            seq_lens=m.seq_lens[: m.num_reqs].cpu().tolist(),
            block_table=m.block_table_tensor,
            query_start_loc_dev=m.query_start_loc[: m.num_reqs + 1],
            seq_lens_dev=m.seq_lens[: m.num_reqs],
        )


def group_top_k(impls, block_size: int, n_local: int) -> TopKConfig | None:
    """The top-k settings of the layers of one KV-cache group that use top-k (None: none
    does). Called by a metadata builder: its step rule serves the group's top-k layers."""
    settings = {impl.top_k for impl in impls if impl.top_k is not None}
    if len(settings) > 1:
        raise ValueError("vllm-lminf: the top-k layers of one KV-cache group must share one top_k setting")
    top_k = settings.pop() if settings else None
    if top_k is not None and top_k.rows == "last":
        vllm_compat.track_prompt_lengths()
    if top_k is not None and top_k.blocks and n_local < block_size:
        # the block holding a row's last middle key must be full (summarized) when the row reads it
        raise ValueError(f"lm_infinite.top_k_blocks needs n_local >= the KV block size ({block_size}), "
                         f"got n_local={n_local}; raise n_local or lower --block-size")
    return top_k


class BlockSummaries:
    """Block mode: a top-k layer's per-block, per-KV-head min/max of its raw keys,
    [num_blocks, Hkv, 2, D] float32 beside the layer's KV cache (2 * 4 bytes per channel
    per block: 1/32 of a bf16 cache at block size 128), written when a block fills."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def of(self, kv_cache: torch.Tensor) -> torch.Tensor:
        n, h, _, d2 = kv_cache.shape
        if self.tensor is None or self.tensor.shape[0] != n:
            self.tensor = torch.zeros(n, h, 2, d2 // 2, dtype=torch.float32, device=kv_cache.device)
        return self.tensor


class StepShare:
    """vLLM builds attention metadata once per KV-cache group, and a top-k model has several
    groups (its top-k layers and its evicting layers, cut into groups of equal size): what
    only the step's batch decides (the kernel's `QueryPlan`, the top-k rule's memo of
    per-sequence middle inputs, the RoPE frequencies) is made by the first builder that
    needs it and reused by the others. Keys are contents, never addresses, so an entry
    serves whichever step has those contents; the last few are kept."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self._entries: dict = {}

    def get(self, key, make):
        hit = self._entries.get(key)
        if hit is None:
            hit = self._entries[key] = make()
            while len(self._entries) > self.keep:
                del self._entries[next(iter(self._entries))]  # the oldest (dicts keep insertion order)
        return hit


STEP_SHARE = StepShare()


def step_top_k(top_k: TopKConfig | None, num_reqs: int, owners: list[int] | None = None,
               batch: StepBatch | None = None, block_size: int = 0, shared: bool = False) -> TopKRows | None:
    """The step's top-k rule: per kernel sequence (request row, or with CLEX the request
    row `owners[i]` of run i), the first position whose row uses top-k. "last": the last
    prompt row and every generated row (P - 1 on, P the original prompt length, also when
    a preempted request recomputes); "all": every row. Block mode also lists the blocks
    the step fills (`batch`: the kernels' sequences). shared: the rule's memo of
    per-sequence middle inputs is the one the step's other KV-cache groups use (`StepShare`)."""
    if top_k is None:
        return None
    count = num_reqs if owners is None else len(owners)
    if top_k.rows == "all":
        first = [0] * count
    else:
        prompts = vllm_compat.prompt_lengths(num_reqs)
        first = [p - 1 for p in (prompts if owners is None else [prompts[o] for o in owners])]
    memo = STEP_SHARE.get(("top_k memo", top_k, tuple(first), tuple(batch.query_start_loc), tuple(batch.seq_lens)),
                          dict) if shared else {}
    if not top_k.blocks:
        return TopKRows(top_k.k, top_k.distance, first, memo=memo)
    filled = filled_blocks(batch.block_table, batch.query_start_loc, batch.seq_lens, block_size)
    return TopKRows(top_k.k, top_k.distance, first, blocks=True, block_size=block_size, filled=filled, memo=memo)


def refuse_unsupported(alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None,
                       attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None, sinks=None) -> None:
    """Takes the arguments vLLM's Attention passes an impl after (num_heads, head_size,
    scale, num_kv_heads); refuses whatever the Λ kernels do not compute (Attention()
    skips vLLM's own backend validation when given attn_backend=)."""
    unsupported = {
        "alibi_slopes": alibi_slopes is not None,
        "sliding_window": sliding_window is not None,
        "logits_soft_cap": bool(logits_soft_cap),
        "kv_cache_dtype != auto": kv_cache_dtype != "auto",
        "attn_type != decoder": attn_type != AttentionType.DECODER,
        "kv sharing": kv_sharing_target_layer_name is not None,
        "attention sinks": sinks is not None,
    }
    bad = [name for name, on in unsupported.items() if on]
    if bad:
        raise ValueError(f"vllm-lminf attention does not support: {', '.join(bad)}")


def no_work(attn_metadata, output_scale, output_block_scale) -> bool:
    """Refuses fused output quantization; True for vLLM's profiling / compile warm-up
    passes, which come without metadata (no cache, nothing to compute)."""
    if output_scale is not None or output_block_scale is not None:
        raise ValueError("vllm-lminf attention does not support fused output quantization")
    return attn_metadata is None


def fixed_frequencies(rotary: torch.nn.Module) -> torch.Tensor:
    """float32 inverse frequencies equivalent to a stock rotary module, or a clear
    refusal for scaling types whose rotation is not a pure frequency change."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
    from vllm.model_executor.layers.rotary_embedding.linear_scaling_rope import LinearScalingRotaryEmbedding
    from vllm.model_executor.layers.rotary_embedding.llama3_rope import Llama3RotaryEmbedding

    from ..vllm_compat import stock_inv_freq

    kind = type(rotary)
    if kind in (RotaryEmbedding, Llama3RotaryEmbedding):
        return stock_inv_freq(rotary).to(torch.float32)
    if kind is LinearScalingRotaryEmbedding and len(rotary.scaling_factors) == 1:
        return (stock_inv_freq(rotary) / rotary.scaling_factors[0]).to(torch.float32)
    raise ValueError(
        f"vllm-lminf cannot combine {kind.__name__} with lm_infinite/CLEX: supported RoPE "
        "scaling types are none (plain RoPE), 'linear' (one factor) and 'llama3'"
    )


class LambdaBackend:
    """The hooks vLLM reads off a backend class, from three class attributes; put it first
    in a backend's bases."""

    NAME: str
    IMPL: type
    BUILDER: type
    supported_kv_cache_dtypes = ["auto"]

    @classmethod
    def get_name(cls) -> str:
        return cls.NAME

    @classmethod
    def get_impl_cls(cls) -> type:
        return cls.IMPL

    @classmethod
    def get_builder_cls(cls) -> type:
        return cls.BUILDER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False
