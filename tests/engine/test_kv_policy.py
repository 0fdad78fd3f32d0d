"""Bounded KV memory: the Λ policy frees middle blocks, holds a bounded number per
sequence, never reads what it freed, and keeps vLLM's scheduling behaviours right.
Engines run in subprocesses (helpers.engine) and are stepped by helpers.probe.track."""

from __future__ import annotations

import functools

import random

import pytest

from helpers.engine import run_engine
from helpers.probe import conversations, run_tracked, same_outputs
from helpers.tiny_checkpoint import make_tiny_llama

pytestmark = pytest.mark.slow

G, W, B = 4, 64, 32
LMINF = {"lm_infinite": {"n_global": G, "n_local": W, "distance_limit": W}}
KEEP_ALL = {"lm_infinite": {"n_global": G, "n_local": W, "distance_limit": W, "free_middle_blocks": False}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("kv"), max_position_embeddings=128, seed=2)


@pytest.fixture
def prompts_of(seed):
    """prompts_of(lengths): random prompts of those lengths (a new draw every call)."""
    rng = random.Random(seed)

    def draw(lengths):
        return [[rng.randrange(3, 380) for _ in range(n)] for n in lengths]

    return draw


probe = functools.partial(run_tracked, block_size=B)


def test_eviction_equals_keeping_every_block_and_never_reads_freed_blocks(model, prompts_of):
    """Mixed lengths in one batch; chunked prefill; with freed blocks poisoned
    after every step, outputs equal a run that keeps every block."""
    prompts = prompts_of([1500, 300, 40, 97])
    kept = probe(model, prompts, overrides=KEEP_ALL, max_tokens=20)
    freed = probe(model, prompts, overrides=LMINF, max_tokens=20, poison=True,
                  engine=dict(enable_prefix_caching=False))
    assert kept["manager"] == "FullAttentionManager"
    assert freed["manager"] == "LambdaAttentionManager"
    for a, b in zip(freed["results"], kept["results"]):
        same_outputs(a, b)
    # the long one really freed blocks: far fewer held than its length needs
    assert freed["peak_held"]["r0"] <= freed["bound"] < (1520 // B)
    assert kept["peak_held"]["r0"] >= 1520 // B


def test_blocks_stay_bounded_over_16x_the_window_and_pool_recovers(model, prompts_of):
    out = probe(model, prompts_of([100]), overrides=LMINF, max_tokens=16 * W + 60)
    bound = out["bound"]
    # n_global blocks + window + in-flight chunk + 1 straddling block
    assert bound == -(-G // B) + -(-(W - 1 + 128) // B) + 1
    assert out["peak_held"]["r0"] <= bound
    assert len(out["results"][0]["tokens"]) == 16 * W + 60
    assert out["free_end"] == out["free_start"]


def test_aborts_mid_prefill_and_mid_decode_return_every_block(model, prompts_of):
    prompts = prompts_of([900, 700, 50])
    out = probe(model, prompts, overrides=LMINF, max_tokens=40, abort={0: "prefill", 1: "decode"})
    assert sorted(out["aborted"]) == ["r0", "r1"]
    assert out["results"][2] is not None and len(out["results"][2]["tokens"]) == 40
    assert out["free_end"] == out["free_start"]


def test_tiny_pool_serves_a_prompt_50x_its_size(model, prompts_of):
    """A pool of 20 blocks (640 tokens) cannot hold one full-attention sequence of
    the prompt's length; with the Λ policy a 32,000-token prompt is served, with
    the same result as keeping every block in a large pool."""
    prompt = prompts_of([32_000])
    small = probe(model, prompt, overrides=LMINF, max_tokens=8, engine=dict(num_gpu_blocks_override=21))
    assert small["pool_blocks"] == 21 and 32_000 >= 50 * 20 * B
    kept = probe(model, prompt, overrides=KEEP_ALL, max_tokens=8)
    same_outputs(small["results"][0], kept["results"][0])


def test_preemption_by_recompute_gives_identical_outputs(model, prompts_of):
    """Short prompts are admitted together, then grow during decode towards the
    per-sequence bound: a 15-block pool cannot hold four of them, so vLLM preempts
    and recomputes. Outputs equal an unpressured run."""
    prompts = prompts_of([40, 50, 60, 70])
    calm = probe(model, prompts, overrides=LMINF, max_tokens=300)
    tight = probe(model, prompts, overrides=LMINF, max_tokens=300, engine=dict(num_gpu_blocks_override=15))
    assert sum(tight["preemptions"].values()) > 0, tight["preemptions"]
    for a, b in zip(tight["results"], calm["results"]):
        same_outputs(a, b)


def test_prefix_caching_with_evicted_blocks_is_exact(model, prompts_of):
    """The same long prompt twice with prefix caching on: the second request hits
    the cached global and still-resident blocks; results equal a no-cache run."""
    p = prompts_of([1200])[0]
    prompts = [p, p + [7, 8, 9]]
    cached = probe(model, prompts, overrides=LMINF, max_tokens=12, engine=dict(enable_prefix_caching=True))
    plain = probe(model, prompts, overrides=LMINF, max_tokens=12, engine=dict(enable_prefix_caching=False))
    for a, b in zip(cached["results"], plain["results"]):
        same_outputs(a, b)


def converse(model, first_turns, follow_ups, *, caching, pool_blocks=None, poison=False, max_tokens=16):
    eng = dict(max_model_len=8192, block_size=B, max_num_batched_tokens=128, hf_overrides=LMINF,
               enable_prefix_caching=caching)
    if pool_blocks is not None:
        eng["num_gpu_blocks_override"] = pool_blocks
    args = dict(first_turns=first_turns, follow_ups=follow_ups, max_tokens=max_tokens, poison=poison)
    return run_engine(model, [], engine=eng, probe=conversations, probe_args=args)["extra"]


def test_follow_up_turns_hit_global_and_window_blocks_after_the_pool_churned(model, prompts_of):
    """Three conversations of 3,000 tokens on a 40-block pool (one history needs 94 blocks),
    then a follow-up each that resends prompt + answer + 48 new tokens (3,064 tokens). Each
    follow-up hits every full block of its history (the middle is the null block: those
    blocks were freed and reused by the other conversations), with uncached free blocks
    poisoned before every request, and gives the same tokens and logprobs as a run without
    prefix caching. On a pool that holds only one sequence's bound, the first conversation's
    window is gone: its hit is shorter and still exact."""
    first_turns = prompts_of([3000, 3000, 3000])
    follow_ups = prompts_of([48, 48, 48])
    plain = converse(model, first_turns, follow_ups, caching=False)
    cached = converse(model, first_turns, follow_ups, caching=True, pool_blocks=41, poison=True)
    assert cached["pool_blocks"] == 41
    for a, b in zip(cached["first"] + cached["follow_up"], plain["first"] + plain["follow_up"]):
        same_outputs(dict(a, prompt_logprobs=[None]), dict(b, prompt_logprobs=[None]))
    for turn in cached["follow_up"]:
        assert turn["prompt_len"] == 3064
        # prompt + 15 computed answer tokens = 3015 tokens cached, 94 full blocks
        assert turn["cached_tokens"] == (3000 + 16 - 1) // B * B == 3008
    assert [t["cached_tokens"] for t in plain["follow_up"]] == [0, 0, 0]
    assert cached["free_end"] == cached["free_start"]

    bound = -(-G // B) + -(-(W - 1 + 128) // B) + 1
    tight = converse(model, first_turns, follow_ups, caching=True, pool_blocks=bound + 1, poison=True)
    for a, b in zip(tight["follow_up"], plain["follow_up"]):
        same_outputs(dict(a, prompt_logprobs=[None]), dict(b, prompt_logprobs=[None]))
    # a pool of one sequence's bound: the later conversations reused the first one's window
    assert tight["follow_up"][0]["cached_tokens"] < 3008
    assert tight["free_end"] == tight["free_start"]


def test_pool_smaller_than_the_bound_fails_at_start_with_numbers(model, prompts_of):
    with pytest.raises(RuntimeError) as err:
        probe(model, prompts_of([10]), overrides=LMINF, max_tokens=1, engine=dict(num_gpu_blocks_override=5))
    msg = str(err.value)
    assert "needs up to 8 KV blocks per sequence" in msg and "only 4 usable blocks" in msg


def test_million_token_max_len_on_a_small_pool_generates_past_200k(model, prompts_of):
    """max_model_len = 1,048,576 with a 64-block pool starts (the start-up check
    sees the bounded footprint) and one sequence grows past 200K tokens."""
    out = probe(model, prompts_of([200_100]), overrides=LMINF, max_tokens=16, logprobs=False,
                engine=dict(max_model_len=1 << 20, num_gpu_blocks_override=64, max_num_batched_tokens=1024))
    res = out["results"][0]
    assert len(res["tokens"]) == 16
    assert out["peak_held"]["r0"] <= out["bound"] <= 64
    assert out["free_end"] == out["free_start"]
