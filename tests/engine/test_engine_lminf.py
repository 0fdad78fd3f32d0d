"""Engine-level LM-Infinite on small random Llama-family checkpoints (CPU, float32).

Each engine runs in its own subprocess (helpers.engine). Compared against
stock vLLM (plugin disabled) and against the independent float64 forward in
tests/helpers/reference.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from helpers.engine import run_engine
from helpers.probe import plugin_layers
from helpers.reference import Reference, token_logprobs
from helpers.tiny_checkpoint import make_tiny_llama

pytestmark = pytest.mark.slow

TRAINED = 1024


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), max_position_embeddings=TRAINED, seed=1)


def rand_prompt(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, 380) for _ in range(n)]


def ref_token_logprobs(ref: Reference, ids: list[int], lm_infinite) -> torch.Tensor:
    """logprob of each token i >= 1 given 0..i-1, float64."""
    return token_logprobs(ref.logprobs(ids, lm_infinite=lm_infinite), ids)


def test_full_window_equals_stock(llama, seed):
    """n_local >= every sequence length: the Λ pattern is plain causal attention,
    so tokens and logprobs equal stock vLLM's (both compiled)."""
    rng = random.Random(seed)
    prompts = [rand_prompt(n, rng) for n in (600, 131, 1)]
    sampling = dict(max_tokens=8, prompt_logprobs=0, logprobs=0)
    # chunked prefill; torch.compile on (the attention stays an opaque custom op)
    engine = dict(max_model_len=TRAINED, max_num_batched_tokens=256, enforce_eager=False)
    stock = run_engine(llama, prompts, engine=engine, sampling=sampling, plugin=False)
    ours = run_engine(llama, prompts, engine=dict(engine, hf_overrides={"lm_infinite": {}}), sampling=sampling)
    for s, o in zip(stock, ours):
        assert o["tokens"] == s["tokens"]
        a = torch.tensor(o["prompt_logprobs"][1:] + o["logprobs"], dtype=torch.float64)
        b = torch.tensor(s["prompt_logprobs"][1:] + s["logprobs"], dtype=torch.float64)
        assert (a - b).abs().max().item() < 2e-4


def test_switch_absent_is_stock(llama, seed):
    """Without the config key the override installs nothing and matches stock exactly."""
    rng = random.Random(seed)
    prompts = [rand_prompt(200, rng)]
    sampling = dict(max_tokens=6, prompt_logprobs=0)
    out = run_engine(llama, prompts, engine=dict(max_model_len=TRAINED), sampling=sampling, probe=plugin_layers)
    stock = run_engine(llama, prompts, engine=dict(max_model_len=TRAINED), sampling=sampling, plugin=False)
    assert out["extra"]["swapped"] == 0
    assert out["results"][0]["tokens"] == stock[0]["tokens"]
    assert out["results"][0]["prompt_logprobs"] == stock[0]["prompt_logprobs"]


def test_small_window_matches_float64_reference(llama, seed):
    """W=64, G=4, d=64 on prompts up to 600 tokens, chunked prefill mixed with
    decodes: prompt and generated-token logprobs equal the float64 LM-Infinite
    forward, and differ clearly from full attention."""
    rng = random.Random(seed)
    G, W, d = 4, 64, 64
    prompts = [rand_prompt(n, rng) for n in (600, 257, 64, 65, 3)]
    engine = dict(max_model_len=4096, max_num_batched_tokens=160,
                  hf_overrides={"lm_infinite": {"n_global": G, "n_local": W, "distance_limit": d}})
    sampling = dict(max_tokens=6, prompt_logprobs=0, logprobs=0)
    outs = run_engine(llama, prompts, engine=engine, sampling=sampling)
    ref = Reference(llama)
    for prompt, o in zip(prompts, outs):
        full = prompt + o["tokens"]
        want = ref_token_logprobs(ref, full, (G, W, d))
        got = torch.tensor(o["prompt_logprobs"][1:] + o["logprobs"], dtype=torch.float64)
        assert (got - want).abs().max().item() < 2e-4, (len(prompt), (got - want).abs().max())
        if len(prompt) == 600:
            causal = ref_token_logprobs(ref, full, None)
            assert (got - causal).abs().max().item() > 0.05


def test_prompt_longer_than_max_position_is_served(llama, seed):
    """max_model_len far past the trained length needs no environment variable."""
    rng = random.Random(seed)
    prompts = [rand_prompt(1500, rng)]
    engine = dict(max_model_len=8 * TRAINED, hf_overrides={"lm_infinite": {"n_global": 4, "n_local": 256}})
    out = run_engine(llama, prompts, engine=engine, sampling=dict(max_tokens=3))
    assert len(out[0]["tokens"]) == 3
