"""Top-k layers beside Λ layers (issue 15): vLLM's grouping puts them in their own KV-cache
groups, start-up sizing and admission count both, and the hybrid coordinator's prefix-hit
search gives the Λ group its own window (kv_policy + vllm_compat.look_up_lambda_groups_last).
vLLM's real grouping, pool and coordinator; no engine. Fails loudly when vLLM changes them."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import vllm.v1.core.kv_cache_utils as kcu
from vllm.v1.core.kv_cache_coordinator import HybridKVCacheCoordinator, get_kv_cache_coordinator
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_layout import KVCacheLayout

from vllm_lminf.kv_policy import KeepAllAttentionSpec, LambdaAttentionSpec, register_kv_policy

BS, MAX_LEN, G, W = 16, 4096, 64, 256
COMMON = dict(block_size=BS, num_kv_heads=4, head_size=64, dtype=torch.bfloat16)


def config():
    """The fields of VllmConfig that vLLM's grouping and sizing read."""
    return SimpleNamespace(
        scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False),
        attention_config=SimpleNamespace(hisparse_config=None),
        cache_config=SimpleNamespace(get_resolved_kv_cache_layout=lambda: KVCacheLayout.LBHNC,
                                     num_gpu_blocks_override=None, prefix_cache_retention_interval=None),
        speculative_config=None, model_config=SimpleNamespace(max_model_len=MAX_LEN),
        parallel_config=SimpleNamespace(decode_context_parallel_size=1))


def layer_specs(n_lambda: int, n_total: int):
    lam = LambdaAttentionSpec(**COMMON, n_global=G, n_local=W, in_flight_tokens=W, max_model_len=MAX_LEN)
    return {f"model.layers.{i}.attn": lam if i < n_lambda else KeepAllAttentionSpec(**COMMON) for i in range(n_total)}


def groups_of(specs):
    register_kv_policy()
    return [(type(g.kv_cache_spec), sorted(int(n.split(".")[2]) for n in g.layer_names))
            for g in kcu.get_kv_cache_groups(config(), specs)]


def test_top_k_layers_get_their_own_groups():
    groups = groups_of(layer_specs(4, 30))
    lam = [layers for kind, layers in groups if kind is LambdaAttentionSpec]
    keep = sorted(i for kind, layers in groups if kind is KeepAllAttentionSpec for i in layers)
    assert lam == [[0, 1, 2, 3]] and keep == list(range(4, 30)), groups
    # equal halves: two groups; and a stock full-attention model is untouched
    assert [kind for kind, _ in groups_of(layer_specs(15, 30))] == [LambdaAttentionSpec, KeepAllAttentionSpec]
    register_kv_policy()
    stock = kcu.get_kv_cache_groups(config(), {f"l.{i}.attn": FullAttentionSpec(**COMMON) for i in range(4)})
    assert len(stock) == 1 and type(stock[0].kv_cache_spec) is FullAttentionSpec


def coordinator(n_lambda=4, n_total=30):
    register_kv_policy()
    cfg = config()
    groups = kcu.get_kv_cache_groups(cfg, layer_specs(n_lambda, n_total))
    per_block = kcu._pool_bytes_per_block(cfg, groups)
    kv_config = kcu.get_kv_cache_config_from_groups(cfg, groups, available_memory=per_block * 4000)
    coord = get_kv_cache_coordinator(kv_config, max_model_len=MAX_LEN, max_in_flight_tokens=W, use_eagle=False,
                                     enable_caching=True, enable_kv_cache_events=False, dcp_world_size=1,
                                     pcp_world_size=1, scheduler_block_size=BS, hash_block_size=BS)
    return cfg, groups, coord


def test_sizing_and_admission_count_both_policies():
    cfg, groups, coord = coordinator()
    assert isinstance(coord, HybridKVCacheCoordinator)
    lam_bound = -(-G // BS) + -(-(W - 1 + W) // BS) + 1
    keep_groups = sum(isinstance(g.kv_cache_spec, KeepAllAttentionSpec) for g in groups)
    want = lam_bound + keep_groups * (MAX_LEN // BS)
    per_block = kcu._pool_bytes_per_block(cfg, groups)
    assert kcu._max_memory_usage_bytes_from_groups(cfg, groups) // per_block == want
    empty = tuple(() for _ in groups)
    assert coord.get_num_blocks_to_allocate("r", MAX_LEN, empty, 0, 0, 0, MAX_LEN, apply_admission_cap=True) == want


def test_lambda_group_is_searched_last_and_keeps_its_window():
    """Λ group: every block of 64 cached; keep-all groups: the first 40. The hit is 40 blocks,
    and the Λ group's blocks covering the window that ends there are real (vLLM's own order,
    Λ first, would cut the Λ hit of 64 down to 40 blocks with a null window)."""
    _, groups, coord = coordinator()
    kinds = [type(g.spec) for g in coord.attention_groups]
    assert kinds == [KeepAllAttentionSpec, LambdaAttentionSpec], kinds
    lam_gid = next(i for i, g in enumerate(groups) if isinstance(g.kv_cache_spec, LambdaAttentionSpec))
    pool = coord.block_pool
    cached = {(j, gid): pool.blocks[1 + gid * 64 + j]
              for gid in range(len(groups)) for j in range(64) if gid == lam_gid or j < 40}
    pool.get_cached_block = lambda h, gids: ([cached[(h, g)] for g in gids]
                                             if all((h, g) in cached for g in gids) else None)
    blocks, hit, _ = coord.find_longest_cache_hit(list(range(64)), 64 * BS - 1)
    assert hit == 40 * BS
    lam_blocks = blocks[lam_gid]
    first_window = (hit - W + 1) // BS
    assert all(not b.is_null for b in lam_blocks[first_window:40])
    assert all(not b.is_null for b in lam_blocks[: -(-G // BS)])
    assert all(b.is_null for b in lam_blocks[-(-G // BS): first_window])
