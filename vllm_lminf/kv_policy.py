"""KV-cache policy for Λ attention: keep the global blocks and the window, free the rest.

A query at position p reads keys [0, n_global) and (p - n_local, p]. Once every
token before position `c` is computed, no future query reads a key in
[n_global, c - n_local + 1) again, so the blocks wholly inside that range go back to
the pool (replaced by the null block in the request's table, as vLLM's R-SWA does).
The worker's block table keeps stale ids there; the backend never reads them.

Per sequence this holds at most
    cdiv(n_global, B) + cdiv(n_local - 1 + in_flight, B) + 1
blocks, whatever its length; start-up sizing and admission use that bound.

Prefix caching: the KV of a token depends only on the tokens before it, and a query at
position h reads only the global blocks and the window ending at h, so a cache hit of h
tokens needs just those blocks (`lambda_cache_hit`, as vLLM's sliding-window manager does
for its window); the middle of the hit is the null block. Middle blocks freed while a
request runs keep their hash but are reused first, before any block a finished request
returned whole: what a follow-up turn needs (global blocks and the history's last window)
then outlives the churn of other long requests.

Top-k layers read their middle, so they keep every block (`KeepAllAttentionSpec`, vLLM's
full-attention manager); they form their own KV-cache groups beside the Λ group (vLLM's
hybrid coordinator), so start-up sizing, admission and preemption count both. Their prefix
hits follow the whole-prefix rule; the Λ group's search runs within that limit.

Under CLEX a block's KV depends on the scale t it was computed at (lower layers
attended with that t); every row of a request up to its prompt length P runs at t(P),
so prefix-cache hits are keyed by t(P), and by P itself when log_scale scales those rows'
queries by ln(P)/ln(L) (`ClexAttentionSpec`, or `clex_scale` on the Λ spec).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from .clex import clex_scale_index
from .vllm_compat import (
    ensure_builtin_kv_specs,
    free_blocks_in_range,
    key_prefix_cache,
    look_up_lambda_groups_last,
    reword_kv_memory_error,
    set_admission_cap,
)


def _merge_own_kind(cls, specs, what: str):
    """`merge` for the plugin's FullAttentionSpec subclasses: vLLM's fields merged by
    FullAttentionSpec, the subclass's own fields equal across the group."""
    # vLLM's grouping tries `merge` on mixed lists and reads an AssertionError as "not one group"
    assert all(type(s) is cls for s in specs), f"{cls.__name__} merges only with its own kind"
    vllm_fields = [f.name for f in fields(FullAttentionSpec)]
    own_fields = [f.name for f in fields(cls) if f.name not in vllm_fields]
    own = {tuple(getattr(s, n) for n in own_fields) for s in specs}
    if len(own) != 1:
        raise ValueError(f"all layers of one KV cache group must share one {what}")
    base = FullAttentionSpec.merge(specs)
    return cls(**{n: getattr(base, n) for n in vllm_fields}, **dict(zip(own_fields, own.pop())))


def _key_hits_by_clex_scale(clex_scale: tuple[int, int, bool] | None) -> None:
    """Rows up to P run at t(P), and with log_scale their queries are scaled by ln(P)/ln(L):
    a hit is exact between requests of one t(P) (with log_scale: of one P)."""
    if clex_scale is None:
        return
    original_len, max_factor, log_scale = clex_scale
    if log_scale:
        key_prefix_cache(lambda request: ("clex_prompt_len", request.num_prompt_tokens))
    else:
        key_prefix_cache(lambda request: ("clex_t", clex_scale_index(request.num_prompt_tokens, original_len,
                                                                     max_factor)))


@dataclass(frozen=True, kw_only=True)
class ClexAttentionSpec(FullAttentionSpec):
    """Full attention under CLEX: prefix-cache hits keyed by t(P) (by P with log_scale)."""

    clex_scale: tuple[int, int, bool]  # (trained length L, max_factor, log_scale)

    @classmethod
    def merge(cls, specs: list[ClexAttentionSpec]) -> ClexAttentionSpec:
        return _merge_own_kind(cls, specs, "CLEX scale")


class ClexAttentionManager(FullAttentionManager):
    def __init__(self, kv_cache_spec: ClexAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        _key_hits_by_clex_scale(kv_cache_spec.clex_scale)


@dataclass(frozen=True, kw_only=True)
class KeepAllAttentionSpec(FullAttentionSpec):
    """A top-k layer beside Λ layers: it reads its middle, so it keeps every block; its
    own spec type so that vLLM puts it in its own KV-cache groups."""

    clex_scale: tuple[int, int, bool] | None = None

    @classmethod
    def merge(cls, specs: list[KeepAllAttentionSpec]) -> KeepAllAttentionSpec:
        return _merge_own_kind(cls, specs, "CLEX scale")


class KeepAllAttentionManager(FullAttentionManager):
    def __init__(self, kv_cache_spec: KeepAllAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        _key_hits_by_clex_scale(kv_cache_spec.clex_scale)


@dataclass(frozen=True, kw_only=True)
class LambdaAttentionSpec(FullAttentionSpec):
    n_global: int
    n_local: int
    # tokens scheduled but not yet settled (vLLM's max_in_flight_tokens)
    in_flight_tokens: int
    max_model_len: int
    clex_scale: tuple[int, int, bool] | None = None  # (L, max_factor, log_scale) under CLEX

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
        return _merge_own_kind(cls, specs, "lm_infinite window")


def too_small_message(spec: LambdaAttentionSpec, usable_blocks: int) -> str:
    return (
        f"lm_infinite needs up to {spec.max_blocks_per_request()} KV blocks per sequence "
        f"(n_global={spec.n_global}, n_local={spec.n_local}, in-flight tokens={spec.in_flight_tokens}, "
        f"block_size={spec.block_size}) but the KV pool has only {usable_blocks} usable blocks: "
        "lower n_local or max_num_batched_tokens, or give the KV cache more memory"
    )


def lambda_cache_hit(cached: Callable[[int], Sequence | None], max_blocks: int, global_blocks: int,
                     n_local: int, block_size: int) -> tuple[int, dict[int, Sequence]]:
    """The longest prefix-cache hit under Λ attention, in blocks, and the blocks it uses.

    A hit of i blocks (h = i * block_size tokens) is exact when blocks [0, min(g, i)) and
    [max(g, (h - n_local + 1) // block_size), i) are cached (g = `global_blocks`): the
    query at h reads keys [0, n_global) and (h - n_local, h]; later queries read only
    keys they compute themselves or these. `cached(j)` gives block j's cached blocks (one
    per KV group) or None. Returns (i, {j: blocks}) for the blocks the hit uses."""
    found: dict[int, Sequence] = {}
    head = min(global_blocks, max_blocks)
    for j in range(head):
        blocks = cached(j)
        if blocks is None:
            return j, found  # every hit needs the global blocks: the run from 0 is all there is
        found[j] = blocks
    if max_blocks <= global_blocks:
        return max_blocks, found

    def window_start(i: int) -> int:
        return max(global_blocks, (i * block_size - n_local + 1) // block_size)

    if window_start(max_blocks) >= max_blocks:  # n_local <= 1: the query reads no earlier key
        return max_blocks, found
    run: dict[int, Sequence] = {}
    run_end = None  # exclusive end of the run of cached blocks that contains j
    for j in range(max_blocks - 1, global_blocks - 1, -1):
        blocks = cached(j)
        if blocks is None:
            run, run_end = {}, None
            continue
        if run_end is None:
            run_end = j + 1
        run[j] = blocks
        # window_start grows with the hit length: the run's right end is the best hit it gives
        if j == window_start(run_end):  # j counts down from run_end - 1 >= window_start
            found.update(run)
            return run_end, found
    return global_blocks, found


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
        _key_hits_by_clex_scale(kv_cache_spec.clex_scale)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        first_needed = max(0, processed_computed_tokens - self.n_local + 1)
        free_blocks_in_range(self, request_id, self.first_gap_block, first_needed // self.block_size,
                             evict_first=True)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec,
                               drop_eagle_block, alignment_tokens, dcp_world_size=1, pcp_world_size=1):
        block_size = kv_cache_spec.block_size
        if (drop_eagle_block or alignment_tokens != block_size or block_pool.hash_block_size != block_size
                or dcp_world_size > 1 or pcp_world_size > 1):
            # configurations the plugin does not run with (speculative decoding, hybrid page
            # sizes, context parallelism): the full-prefix rule is exact there too, only shorter
            return super().find_longest_cache_hit(
                block_hashes, max_length, kv_cache_group_ids, block_pool, kv_cache_spec, drop_eagle_block,
                alignment_tokens, dcp_world_size, pcp_world_size)
        max_blocks = min(max_length // block_size, len(block_hashes))
        num_blocks, found = lambda_cache_hit(
            lambda j: block_pool.get_cached_block(block_hashes[j], kv_cache_group_ids),
            max_blocks, cdiv(kv_cache_spec.n_global, block_size), kv_cache_spec.n_local, block_size)
        null = block_pool.null_block
        computed = tuple([found[j][g] if j in found else null for j in range(num_blocks)]
                         for g in range(len(kv_cache_group_ids)))
        return computed, num_blocks * block_size


def kv_cache_spec(stock: FullAttentionSpec, lminf, clex_scale: tuple[int, int, bool] | None, vllm_config,
                  keeps_middle: bool = False):
    """The KV spec of a plugin layer: bounded for Λ layers that free their middle blocks,
    keyed by t under CLEX, else vLLM's own (`stock`). keeps_middle: a top-k layer (it
    reads its middle, so it keeps every block)."""
    base = {f.name: getattr(stock, f.name) for f in fields(FullAttentionSpec)}
    if lminf is not None and lminf.free_middle_blocks and keeps_middle:
        return KeepAllAttentionSpec(**base, clex_scale=clex_scale)
    if lminf is not None and lminf.free_middle_blocks:
        return LambdaAttentionSpec(
            **base, n_global=lminf.n_global, n_local=lminf.n_local,
            in_flight_tokens=vllm_config.max_in_flight_tokens,
            max_model_len=vllm_config.model_config.max_model_len, clex_scale=clex_scale,
        )
    if clex_scale is not None:
        return ClexAttentionSpec(**base, clex_scale=clex_scale)
    return stock


def _pool_too_small(groups, usable_blocks: int) -> str | None:
    ours = [g.kv_cache_spec for g in groups if isinstance(g.kv_cache_spec, LambdaAttentionSpec)]
    if not ours or len(ours) != len(groups):  # other groups too (top-k layers): vLLM's message covers them
        return None
    return too_small_message(ours[0], usable_blocks)


def register_kv_policy() -> None:
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    ensure_builtin_kv_specs()
    # Each spec is its own base: registered with FullAttentionSpec as base, vLLM would fold
    # Λ and keep-all layers into one group and one manager.
    for spec, manager in ((LambdaAttentionSpec, LambdaAttentionManager), (ClexAttentionSpec, ClexAttentionManager),
                          (KeepAllAttentionSpec, KeepAllAttentionManager)):
        KVCacheSpecRegistry.register(spec, manager)
    reword_kv_memory_error(_pool_too_small)
    look_up_lambda_groups_last(lambda spec: isinstance(spec, LambdaAttentionSpec))
