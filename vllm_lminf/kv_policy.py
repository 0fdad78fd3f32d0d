"""KV-cache policy for Λ attention: keep the global blocks and the window, free the rest.

A query at position p reads keys [0, n_global) and (p - n_local, p]. Once every
token before position `c` is computed, no future query reads a key in
[n_global, c - n_local + 1) again, so the blocks wholly inside that range go back to
the pool (replaced by the null block in the request's table, as vLLM's R-SWA does).
The worker's block table keeps stale ids there; the backend never reads them.

Per sequence this holds at most
    cdiv(n_global, B) + cdiv(n_local - 1 + in_flight, B) + 1
blocks, whatever its length; start-up sizing and admission use that bound.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from .vllm_compat import ensure_builtin_kv_specs, free_blocks_in_range, set_admission_cap


@dataclass(frozen=True, kw_only=True)
class LambdaAttentionSpec(FullAttentionSpec):
    n_global: int
    n_local: int
    # tokens scheduled but not yet settled (vLLM's max_in_flight_tokens)
    in_flight_tokens: int
    max_model_len: int

    def max_blocks_per_request(self) -> int:
        bound = (
            cdiv(self.n_global, self.block_size)
            + cdiv(self.n_local - 1 + self.in_flight_tokens, self.block_size)
            + 1
        )
        return min(bound, cdiv(self.max_model_len, self.block_size))

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return self.max_blocks_per_request() * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list[LambdaAttentionSpec]) -> LambdaAttentionSpec:
        own = {(s.n_global, s.n_local, s.in_flight_tokens, s.max_model_len) for s in specs if isinstance(s, LambdaAttentionSpec)}
        if len(own) != 1 or len(specs) != sum(isinstance(s, LambdaAttentionSpec) for s in specs):
            raise ValueError("all layers of one KV cache group must share one lm_infinite window")
        base = FullAttentionSpec.merge(specs)
        n_global, n_local, in_flight, max_len = own.pop()
        return cls(
            **{f.name: getattr(base, f.name) for f in fields(FullAttentionSpec)},
            n_global=n_global, n_local=n_local, in_flight_tokens=in_flight, max_model_len=max_len,
        )


def too_small_message(spec: LambdaAttentionSpec, usable_blocks: int) -> str:
    return (
        f"lm_infinite needs up to {spec.max_blocks_per_request()} KV blocks per sequence "
        f"(n_global={spec.n_global}, n_local={spec.n_local}, in-flight tokens={spec.in_flight_tokens}, "
        f"block_size={spec.block_size}) but the KV pool has only {usable_blocks} usable blocks: "
        "lower n_local or max_num_batched_tokens, or give the KV cache more memory"
    )


class LambdaAttentionManager(FullAttentionManager):
    def __init__(self, kv_cache_spec: LambdaAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.first_gap_block = cdiv(kv_cache_spec.n_global, self.block_size)
        self.n_local = kv_cache_spec.n_local
        need = kv_cache_spec.max_blocks_per_request()
        set_admission_cap(self, need)
        usable = self.block_pool.num_gpu_blocks - 1  # block 0 is the null block
        if need > usable:
            raise ValueError(too_small_message(kv_cache_spec, usable))

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        first_needed = max(0, processed_computed_tokens - self.n_local + 1)
        free_blocks_in_range(self, request_id, self.first_gap_block, first_needed // self.block_size)


def kv_cache_spec(stock: FullAttentionSpec, lminf, vllm_config):
    """The KV spec of a plugin layer: bounded for Λ layers that free their middle blocks,
    else vLLM's own (`stock`)."""
    if lminf is None or not lminf.free_middle_blocks:
        return stock
    return LambdaAttentionSpec(
        **{f.name: getattr(stock, f.name) for f in fields(FullAttentionSpec)},
        n_global=lminf.n_global,
        n_local=lminf.n_local,
        in_flight_tokens=vllm_config.max_in_flight_tokens,
        max_model_len=vllm_config.model_config.max_model_len,
    )


def register_kv_policy() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    ensure_builtin_kv_specs()
    KVCacheSpecRegistry.register(LambdaAttentionSpec, LambdaAttentionManager,
                                 uniform_type_base_spec=FullAttentionSpec)
