"""Top-k middle attention in the engine (issue 15): logprobs against the float64
reference in both row modes, on vLLM's hybrid KV-cache groups (top-k layers keep their
middle blocks, the others free them), with chunked prefill mixed with decodes, a pool so
small that it preempts, aborts, and prefix-cache hits. Engines run in subprocesses."""

from __future__ import annotations

import functools

import random

import pytest
import torch

from helpers.engine import run_engine
from helpers.probe import conversations, kv_groups, run_tracked, same_outputs
from helpers.reference import Reference, token_logprobs
from helpers.tiny_checkpoint import make_tiny_llama

pytestmark = pytest.mark.slow

LAYERS, TRAINED = 4, 128
G, W, B, K, DIST = 4, 64, 32, 3, 32


def settings(rows="last", from_layer=2, free=True, blocks=False):
    return {"lm_infinite": {"n_global": G, "n_local": W, "distance_limit": W, ("top_k_blocks" if blocks else "top_k"): K,
                            "top_k_from_layer": from_layer, "top_k_distance": DIST, "top_k_rows": rows,
                            "free_middle_blocks": free}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("topk"), num_layers=LAYERS, max_position_embeddings=TRAINED,
                           seed=3)


@pytest.fixture
def prompts_of(seed):
    rng = random.Random(seed)
    return lambda lengths: [[rng.randrange(3, 380) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("rows,from_layer,blocks", [("last", 2, False), ("all", 1, False), ("last", 2, True),
                                                    ("all", 1, True)])
def test_logprobs_match_float64_reference_on_hybrid_groups(model, prompts_of, rows, from_layer, blocks):
    """Prompts past, at and inside the window (600, 257, 64, 65, 3 tokens), chunks of 160
    tokens beside decodes: prompt and generated logprobs equal the float64 LM-Infinite
    forward with top-k (exact, or block mode: K blocks) in layers >= from_layer, and differ
    from Λ alone."""
    prompts = prompts_of([600, 257, 64, 65, 3])
    engine = dict(max_model_len=4096, block_size=B, max_num_batched_tokens=160,
                  hf_overrides=settings(rows, from_layer, blocks=blocks))
    out = run_engine(model, prompts, engine=engine, sampling=dict(max_tokens=6, prompt_logprobs=0, logprobs=0),
                     probe=kv_groups)
    groups = out["extra"]
    lam = [g for g in groups if g["manager"] == "LambdaAttentionManager"]
    keep = [g for g in groups if g["spec"] == "KeepAllAttentionSpec"]
    assert len(lam) == 1 and lam[0]["layers"] == list(range(from_layer)), groups
    assert sorted(i for g in keep for i in g["layers"]) == list(range(from_layer, LAYERS)), groups
    ref = Reference(model)
    for prompt, o in zip(prompts, out["results"]):
        full = prompt + o["tokens"]
        first = 0 if rows == "all" else len(prompt) - 1
        rule = (K, DIST, from_layer, LAYERS, first) + ((B,) if blocks else ())
        want = token_logprobs(ref.logprobs(full, lm_infinite=(G, W, W), top_k=rule), full)
        got = torch.tensor(o["prompt_logprobs"][1:] + o["logprobs"], dtype=torch.float64)
        assert (got - want).abs().max().item() < 2e-4, (len(prompt), (got - want).abs().max())
        if len(prompt) >= 257:  # the middle holds > K keys: top-k changes the result
            plain = token_logprobs(ref.logprobs(full, lm_infinite=(G, W, W)), full)
            assert (got - plain).abs().max().item() > 1e-2


probe = functools.partial(run_tracked, block_size=B)


def test_lambda_layers_free_their_middle_top_k_layers_keep_it(model, prompts_of):
    """Freed blocks poisoned after every step: outputs equal a run where every layer keeps
    every block; the Λ group holds at most its bound, each keep-all group the whole sequence."""
    prompts = prompts_of([1500, 300, 40, 97])
    kept = probe(model, prompts, overrides=settings(free=False), max_tokens=20)
    freed = probe(model, prompts, overrides=settings(), max_tokens=20, poison=True,
                  engine=dict(enable_prefix_caching=False))
    assert kept["group_managers"] == ["FullAttentionManager"]
    assert sorted(freed["group_managers"]) == ["KeepAllAttentionManager", "LambdaAttentionManager"]
    for a, b in zip(freed["results"], kept["results"]):
        same_outputs(a, b)
    lam = freed["group_managers"].index("LambdaAttentionManager")
    keep = 1 - lam
    assert freed["peak_held_by_group"]["r0"][lam] <= freed["bound"] < 1520 // B
    assert freed["peak_held_by_group"]["r0"][keep] >= 1520 // B


def test_preemption_and_aborts(model, prompts_of):
    """A pool too small for four growing sequences preempts and recomputes (top-k rows of
    a recomputed sequence are its generated ones again): outputs equal an unpressured run.
    Aborts mid-prefill and mid-decode return every block of both groups. (Keep-all layers
    need a whole max_model_len per sequence: vLLM refuses a pool smaller than that.)"""
    prompts = prompts_of([40, 50, 60, 70])
    short = dict(max_model_len=512)
    calm = probe(model, prompts, overrides=settings(), max_tokens=300, engine=short)
    tight = probe(model, prompts, overrides=settings(), max_tokens=300, engine=dict(short, num_gpu_blocks_override=40))
    assert sum(tight["preemptions"].values()) > 0, tight["preemptions"]
    for a, b in zip(tight["results"], calm["results"]):
        same_outputs(a, b)
    out = probe(model, prompts_of([900, 700, 50]), overrides=settings(), max_tokens=40,
                abort={0: "prefill", 1: "decode"}, engine=dict(max_model_len=1024))
    assert sorted(out["aborted"]) == ["r0", "r1"]
    assert len(out["results"][2]["tokens"]) == 40
    assert out["free_end"] == out["free_start"]


def test_prefix_cache_hits_are_exact(model, prompts_of):
    """Two conversations of 1,000 tokens, then follow-ups: the hit spans the history in
    both groups (Λ group searched within the keep-all group's hit), uncached free blocks
    poisoned; greedy tokens and logprobs equal a run without prefix caching."""
    first, new = prompts_of([1000, 1000]), prompts_of([20, 20])
    args = dict(first_turns=first, follow_ups=new, max_tokens=8)
    eng = dict(max_model_len=65536, block_size=B, max_num_batched_tokens=128, hf_overrides=settings())
    cached = run_engine(model, [], engine=dict(eng, enable_prefix_caching=True), probe=conversations,
                        probe_args=dict(args, poison=True))["extra"]
    plain = run_engine(model, [], engine=dict(eng, enable_prefix_caching=False), probe=conversations,
                       probe_args=args)["extra"]
    for a, b in zip(cached["first"] + cached["follow_up"], plain["first"] + plain["follow_up"]):
        assert a["tokens"] == b["tokens"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) <= 2e-4
    for f in cached["follow_up"]:
        assert f["cached_tokens"] >= 1000 // B * B - B, cached["follow_up"]
