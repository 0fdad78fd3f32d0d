"""Λ-aware prefix-cache hits (kv_policy.lambda_cache_hit, LambdaAttentionManager) against a
brute-force rule written in token positions, and the pool order of freed middle blocks,
on vLLM's real BlockPool (no engine)."""

from __future__ import annotations

import random

import pytest
import torch
from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id

from vllm_lminf.kv_policy import LambdaAttentionManager, LambdaAttentionSpec, lambda_cache_hit


def needed_blocks(hit_tokens: int, n_global: int, n_local: int, block_size: int) -> set[int]:
    """Blocks whose keys a request resuming at `hit_tokens` reads from the cache: the query at
    h = hit_tokens reads positions [0, n_global) and (h - n_local, h); every later query reads
    those it computes itself."""
    h = hit_tokens
    positions = set(range(min(n_global, h))) | set(range(max(0, h - n_local + 1), h))
    return {p // block_size for p in positions}


def brute_force_hit(cached: set[int], max_blocks: int, n_global: int, n_local: int, block_size: int) -> int:
    for i in range(max_blocks, -1, -1):
        if needed_blocks(i * block_size, n_global, n_local, block_size) <= cached:
            return i
    raise AssertionError("a hit of 0 blocks is always valid")


SHAPES = [  # (n_global, n_local, block_size)
    (4, 64, 32), (32, 64, 32), (0, 64, 32), (33, 16, 16), (4, 8, 16), (16, 16, 16), (1, 1, 4), (40, 100, 8),
]


@pytest.mark.parametrize("n_global,n_local,block_size", SHAPES)
def test_longest_hit_equals_the_brute_force_rule(n_global, n_local, block_size, seed):
    rng = random.Random(seed)
    for trial in range(300):
        max_blocks = rng.randrange(0, 40)
        density = rng.choice([0.3, 0.7, 0.9, 1.0])
        cached = {j for j in range(max_blocks) if rng.random() < density}
        got, used = lambda_cache_hit(lambda j: ("blk", j) if j in cached else None, max_blocks,
                                     -(-n_global // block_size), n_local, block_size)
        want = brute_force_hit(cached, max_blocks, n_global, n_local, block_size)
        assert got == want, (trial, sorted(cached), max_blocks)
        # the hit uses exactly the blocks the query at the hit reads, nothing in the middle
        assert set(used) == needed_blocks(got * block_size, n_global, n_local, block_size), (trial, sorted(cached))


def make_manager(num_blocks=16, block_size=4, n_global=4, n_local=8):
    spec = LambdaAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=8, dtype=torch.float32,
                               n_global=n_global, n_local=n_local, in_flight_tokens=4, max_model_len=1000)
    pool = BlockPool(num_blocks, True, block_size)
    manager = LambdaAttentionManager(spec, block_pool=pool, enable_caching=True, kv_cache_group_id=0,
                                     scheduler_block_size=block_size)
    return manager, pool, spec


def hold_cached(manager, pool, request_id, hashes):
    """Give `request_id` one new block per hash, each cached under that hash."""
    blocks = pool.get_new_blocks(len(hashes))
    for block, h in zip(blocks, hashes):
        block.set_block_hash(make_block_hash_with_group_id(h, 0), manager.block_size)
        pool.cached_block_hash_to_block.insert(block.block_hash, block)
    manager.req_to_blocks[request_id] = list(blocks)
    return blocks


def test_freed_middle_blocks_keep_their_hash_and_are_reused_first():
    manager, pool, spec = make_manager()
    hashes = [BlockHash(bytes([i + 1]) * 8) for i in range(8)]
    blocks = hold_cached(manager, pool, "a", hashes)
    never_used = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
    # 20 tokens computed: the next query reads [0, 4) and (12, 20]: blocks 1 and 2 go back
    manager.remove_skipped_blocks("a", 20)
    assert [b.is_null for b in manager.req_to_blocks["a"]] == [False, True, True] + [False] * 5
    free_order = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
    assert set(free_order[:2]) == {blocks[1].block_id, blocks[2].block_id}
    assert free_order[2:] == never_used
    assert pool.get_cached_block(hashes[1], [0]) == [blocks[1]]  # still a hit until reused
    # the request finishes: its remaining blocks go to the back (LRU), behind the middle ones
    manager.free("a")
    free_order = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
    assert set(free_order[:2]) == {blocks[1].block_id, blocks[2].block_id}
    assert set(free_order[-6:]) == {b.block_id for i, b in enumerate(blocks) if i not in (1, 2)}


def test_hit_uses_global_and_window_blocks_and_nulls_the_middle():
    manager, pool, spec = make_manager()
    hashes = [BlockHash(bytes([i + 1]) * 8) for i in range(8)]
    blocks = hold_cached(manager, pool, "a", hashes)
    manager.free("a")
    # a request of 32 tokens (max hit 31 -> 7 blocks = 28 tokens) reads [0, 4) and (20, 28)
    hit, length = LambdaAttentionManager.find_longest_cache_hit(hashes, 31, [0], pool, spec, False, 4)
    assert length == 28
    assert [b.block_id for b in hit[0]] == [blocks[0].block_id, 0, 0, 0, 0, blocks[5].block_id, blocks[6].block_id]
    # one window block reused by another request: the hit falls back to the last complete window
    pool.cached_block_hash_to_block.pop(make_block_hash_with_group_id(hashes[5], 0), blocks[5].block_id)
    blocks[5].reset_hash()
    _, length = LambdaAttentionManager.find_longest_cache_hit(hashes, 31, [0], pool, spec, False, 4)
    assert length == 20  # reads [0, 4) and (12, 20): blocks 0, 3, 4
    # the global block gone: no hit past it
    pool.cached_block_hash_to_block.pop(make_block_hash_with_group_id(hashes[0], 0), blocks[0].block_id)
    blocks[0].reset_hash()
    _, length = LambdaAttentionManager.find_longest_cache_hit(hashes, 31, [0], pool, spec, False, 4)
    assert length == 0
