"""CLEX end to end on a small random CLEX checkpoint: vLLM with the plugin against an
independent float64 forward whose frequencies come straight from torchdiffeq (ODE time
embedding at base 10000, as upstream).

Both paths run: prefix caching off takes the CPU fast path (keys rotated at absolute
positions, re-rotated when t steps up), prefix caching on the raw-key path. The rule for
t is per query row: t(max(P, j + 1)), P the original prompt length."""

from __future__ import annotations

import math
import random

import pytest
import torch

from helpers import probe
from helpers.engine import run_engine
from helpers.reference import Reference, token_logprobs
from helpers.tiny_checkpoint import make_tiny_llama

pytestmark = pytest.mark.slow

L, MAX_FACTOR, HEAD, BASE = 128, 4, 32, 10000.0
CLEX_SCALING = {"type": "clex", "max_factor": MAX_FACTOR, "param_factor": 1, "act": "tanh", "time_dt": 0.01}


# prefix caching decides the path (see vllm_lminf/attention.py)
PATHS = {"fast": dict(enable_prefix_caching=False), "raw": dict(enable_prefix_caching=True)}
BACKENDS = {"fast": "AbsoluteClexBackend", "raw": "RawBackend"}
# nats, (max, mean) over the generated tokens: bf16 activations and cache give (0.055, 0.015)
# here; leaving the held keys at the old t gives (1.56, 0.35) (measured 2026-12-04, seed 1234)
BF16_TOL = (0.15, 0.04)


def clex_tensors(seed: int, rope_theta: float = BASE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    half = HEAD // 2
    inv_freq = 1.0 / rope_theta ** (torch.arange(0, HEAD, 2, dtype=torch.float32) / HEAD)
    return {
        "model.clex_layer.inv_freq": inv_freq,
        "model.clex_layer.proj_func.ode_up_proj": torch.randn(half, HEAD, generator=g) * 0.02,
        "model.clex_layer.proj_func.ode_down_proj": torch.randn(HEAD, half, generator=g) * 0.02,
    }


def torchdiffeq_frequencies(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """[MAX_FACTOR, HEAD/2] float64 frequencies at t = 1..MAX_FACTOR, solved by torchdiffeq."""
    from torchdiffeq import odeint

    d = HEAD
    i = torch.arange(d // 2, dtype=torch.float64)
    up = t["model.clex_layer.proj_func.ode_up_proj"].double()
    down = t["model.clex_layer.proj_func.ode_down_proj"].double()

    def rhs(time, z):
        alpha = max(2 * float(time) - 1, 1.0)
        log_ntk = -(2 * i / d) * (math.log(BASE) + d / (d - 2) * math.log(alpha))
        dlog_ntk = -(2 * i / d) * (d / (d - 2)) * 2 / alpha
        return torch.tanh((z + log_ntk) @ up) @ down + dlog_ntk

    z0 = t["model.clex_layer.inv_freq"].double().log()
    times = torch.arange(1, MAX_FACTOR + 1, dtype=torch.float64)
    return odeint(rhs, z0, times, method="rk4", options={"step_size": 0.01}).exp()


def t_of(S: int) -> int:
    return min(max(1, math.ceil(S / L)), MAX_FACTOR)


def build_clex_model(directory, seed: int, rope_theta: float = BASE, log_scale: bool = True):
    tensors = clex_tensors(seed=seed, rope_theta=rope_theta)
    path = make_tiny_llama(
        directory, max_position_embeddings=L, head_dim=HEAD, seed=5, rope_theta=rope_theta,
        extra_config={"rope_scaling": CLEX_SCALING, "log_scale": log_scale}, extra_tensors=tensors,
    )
    return path, torchdiffeq_frequencies(tensors), Reference(path)


@pytest.fixture(scope="module")
def clex_model(tmp_path_factory, module_seed):
    return build_clex_model(tmp_path_factory.mktemp("clex"), module_seed)


@pytest.fixture(params=sorted(PATHS))
def path_kind(request) -> str:
    return request.param


def ref_kwargs(freqs, lm_infinite=None):
    return dict(
        lm_infinite=lm_infinite,
        inv_freq_for_len=lambda S: freqs[t_of(S) - 1],
        query_scale_for_len=lambda S: math.log(S) / math.log(L),
    )


def ref_prompt_logprobs(ref, ids, freqs, lm_infinite=None):
    return token_logprobs(ref.logprobs(ids, **ref_kwargs(freqs, lm_infinite)), ids)


def ref_generated_logprobs(ref, seq, n_prompt, freqs, lm_infinite=None):
    """Token S (S >= n_prompt) is predicted by a step whose sequence length is S; each
    step re-rotates every cached raw key with its own t (the reference CLEX semantics)."""
    return ref.incremental_logprobs(seq[:n_prompt], seq[n_prompt:], **ref_kwargs(freqs, lm_infinite))


def rand_ids(n, rng):
    return [rng.randrange(3, 380) for _ in range(n)]


def test_frequencies_really_change_with_t(clex_model):
    _, freqs, _ = clex_model
    for a in range(MAX_FACTOR - 1):
        assert (freqs[a + 1] / freqs[a] - 1).abs().max() > 1e-2


def test_prompts_in_different_t_in_one_batch_match_reference(clex_model, path_kind, seed):
    """Four prompts landing in t = 1, 2, 3, 4, scheduled together in one step (no
    chunking): each matches the float64 CLEX forward of that sequence alone; the path
    taken is the one prefix caching selects."""
    path, freqs, ref = clex_model
    rng = random.Random(seed)
    prompts = [rand_ids(n, rng) for n in (100, 200, 300, 500)]
    out = run_engine(path, prompts, engine=dict(max_model_len=L * MAX_FACTOR, max_num_batched_tokens=2048,
                                                **PATHS[path_kind]),
                     sampling=dict(max_tokens=1, prompt_logprobs=0), probe=probe.plugin_layers)
    assert out["extra"]["backends"] == [BACKENDS[path_kind]]
    outs = out["results"]
    assert sorted({t_of(len(p)) for p in prompts}) == [1, 2, 3, 4]
    for p, o in zip(prompts, outs):
        got = torch.tensor(o["prompt_logprobs"][1:], dtype=torch.float64)
        want = ref_prompt_logprobs(ref, p, freqs)
        assert (got - want).abs().max().item() < 2e-4, (len(p), (got - want).abs().max())


def test_generation_across_a_t_boundary_rerotates_everything(clex_model, path_kind, seed):
    """A 120-token prompt generating 30 tokens crosses S = 128 (t 1 -> 2); each token's
    logprob equals the reference that re-rotates every key at that step's t."""
    path, freqs, ref = clex_model
    rng = random.Random(seed)
    prompt = rand_ids(120, rng)
    other = rand_ids(300, rng)  # decoded alongside, at t = 3
    outs = run_engine(path, [prompt, other], engine=dict(max_model_len=L * MAX_FACTOR, **PATHS[path_kind]),
                      sampling=dict(max_tokens=30, logprobs=0))
    for p, o in zip([prompt, other], outs):
        seq = p + o["tokens"]
        got = torch.tensor(o["logprobs"], dtype=torch.float64)
        want = ref_generated_logprobs(ref, seq, len(p), freqs)
        assert (got - want).abs().max().item() < 2e-4


def test_bf16_fast_path_keeps_vllms_cache_layout_across_a_t_boundary(clex_model, seed):
    """In bf16 vLLM picks its "amx" cache layout on AMX CPUs ("vec" elsewhere). CLEX alone
    (no row reaches the plugin's own attention kernels) keeps vLLM's pick, so its layers run
    vLLM's AMX kernel, and the t step re-rotates the held keys in that layout: a generation
    crossing S = 128 (t 1 -> 2) and one at t = 3 match the float64 reference within bf16
    rounding."""
    path, freqs, ref = clex_model
    rng = random.Random(seed)
    prompt, other = rand_ids(120, rng), rand_ids(300, rng)
    out = run_engine(path, [prompt, other], engine=dict(max_model_len=L * MAX_FACTOR, dtype="bfloat16",
                                                        **PATHS["fast"]),
                     sampling=dict(max_tokens=30, logprobs=0), probe=probe.plugin_layers)
    assert out["extra"]["isas"] == ["amx" if torch.cpu._is_amx_tile_supported() else "vec"]
    for p, o in zip([prompt, other], out["results"]):
        seq = p + o["tokens"]
        got = torch.tensor(o["logprobs"], dtype=torch.float64)
        want = ref_generated_logprobs(ref, seq, len(p), freqs)
        err = (got - want).abs()
        assert err.max().item() < BF16_TOL[0] and err.mean().item() < BF16_TOL[1], (len(p), err.max(), err.mean())


def test_beyond_the_cap_is_refused_without_lm_infinite(clex_model):
    path, _, _ = clex_model
    with pytest.raises(RuntimeError, match="max_model_len"):
        run_engine(path, [[5, 6]], engine=dict(max_model_len=L * MAX_FACTOR + 1))


def test_chunked_prefill_uses_the_prompts_t_for_every_chunk(clex_model, path_kind, seed):
    """A 500-token prompt (t = 4) in 64-token chunks and in one chunk, next to a 120-token
    one (t = 1) decoding across S = 128: every chunk's rows run at t(P) (the reference's
    one-pass prompt), so both chunkings equal the float64 forward."""
    path, freqs, ref = clex_model
    rng = random.Random(seed)
    prompts = [rand_ids(500, rng), rand_ids(120, rng)]
    for chunk in (64, 2048):
        outs = run_engine(path, prompts, engine=dict(max_model_len=L * MAX_FACTOR, max_num_batched_tokens=chunk,
                                                     **PATHS[path_kind]),
                          sampling=dict(max_tokens=12, prompt_logprobs=0, logprobs=0))
        for p, o in zip(prompts, outs):
            got = torch.tensor(o["prompt_logprobs"][1:], dtype=torch.float64)
            assert (got - ref_prompt_logprobs(ref, p, freqs)).abs().max().item() < 2e-4, (chunk, len(p))
            got_gen = torch.tensor(o["logprobs"], dtype=torch.float64)
            want_gen = ref_generated_logprobs(ref, p + o["tokens"], len(p), freqs)
            assert (got_gen - want_gen).abs().max().item() < 2e-4, (chunk, len(p))


def test_preemption_recomputes_at_each_rows_t(clex_model, path_kind, seed):
    """A pool too small for three sequences forces preemption; a sequence recomputed after
    crossing S = 128 replays prompt rows at t(P) and generated rows at t(j + 1) (a chunk
    spanning two t), and every logprob still equals the reference."""
    path, freqs, ref = clex_model
    rng = random.Random(seed)
    prompts = [rand_ids(n, rng) for n in (60, 50, 55)]  # all admitted, then decoding outgrows the pool
    out = run_engine(path, [], engine=dict(max_model_len=200, num_gpu_blocks_override=8, block_size=32,
                                           max_num_batched_tokens=256, **PATHS[path_kind]),
                     probe=probe.tracked, probe_args=dict(prompts=prompts, max_tokens=85))["extra"]
    assert sum(out["preemptions"].values()) > 0, out["preemptions"]
    for p, o in zip(prompts, out["results"]):
        seq = p + o["tokens"]
        got = torch.tensor(o["logprobs"], dtype=torch.float64)
        assert (got - ref_generated_logprobs(ref, seq, len(p), freqs)).abs().max().item() < 2e-4


@pytest.mark.parametrize("rope_theta", [500000.0])
def test_rope_theta_is_the_initial_value_not_the_ode_base(tmp_path, rope_theta, seed):
    """A checkpoint with rope_theta 5e5 (inv_freq built with it): served frequencies are
    the upstream ODE's (time embedding at base 10000) end to end."""
    path, freqs, ref = build_clex_model(tmp_path / "m", seed, rope_theta=rope_theta)
    rng = random.Random(seed)
    prompts = [rand_ids(n, rng) for n in (200, 450)]
    outs = run_engine(path, prompts, engine=dict(max_model_len=L * MAX_FACTOR, **PATHS["fast"]),
                      sampling=dict(max_tokens=4, prompt_logprobs=0))
    for p, o in zip(prompts, outs):
        got = torch.tensor(o["prompt_logprobs"][1:], dtype=torch.float64)
        assert (got - ref_prompt_logprobs(ref, p, freqs)).abs().max().item() < 2e-4


@pytest.mark.parametrize("log_scale", [False, True])
def test_prefix_cache_hits_only_where_exact(tmp_path, log_scale, seed):
    """Prefix caching on (raw path). A block's KV depends on the t its rows ran at, t(P),
    and with log_scale on ln(P) too. Without log_scale a prompt extending a cached one hits
    its blocks when both give the same t and misses at another t; with log_scale only the
    same prompt length hits. Every answer is exact. (No prompt logprobs: vLLM skips the
    prefix cache for requests that ask for them, so exactness is checked on the generated
    tokens, whose rows read the cached blocks.)"""
    path, freqs, ref = build_clex_model(tmp_path / "m", seed, log_scale=log_scale)
    rng = random.Random(seed)
    base = rand_ids(300, rng)  # t = 3
    again = list(base)
    same_t = base + rand_ids(40, rng)  # 340: t = 3
    other_t = base + rand_ids(120, rng)  # 420: t = 4
    prompts = [base, again, same_t, other_t]
    out = run_engine(path, [], engine=dict(max_model_len=L * MAX_FACTOR, block_size=32, **PATHS["raw"]),
                     probe=probe.sequential, probe_args=dict(prompts=prompts, max_tokens=3))["extra"]
    full_blocks = 300 // 32 * 32
    assert out["cached_tokens"][1] >= full_blocks, out["cached_tokens"]
    assert out["cached_tokens"][2] == (0 if log_scale else full_blocks), out["cached_tokens"]
    assert out["cached_tokens"][3] == 0, out["cached_tokens"]
    kwargs = {} if log_scale else dict(query_scale_for_len=lambda S: 1.0)
    for p, o in zip(prompts, out["results"]):
        got = torch.tensor(o["logprobs"], dtype=torch.float64)
        want = ref.incremental_logprobs(p, o["tokens"], **{**ref_kwargs(freqs), **kwargs})
        assert (got - want).abs().max().item() < 2e-4, len(p)


def test_clex_with_lm_infinite_past_the_cap(clex_model, seed):
    """CLEX frequencies at min(ceil(S/L), max_factor) with the Λ window and distance
    clamp on top, on a prompt past L * max_factor."""
    path, freqs, ref = clex_model
    rng = random.Random(seed)
    prompt = rand_ids(700, rng)
    lminf = (4, 64, 64)
    overrides = {"lm_infinite": {"n_global": 4, "n_local": 64, "distance_limit": 64}}
    outs = run_engine(path, [prompt], engine=dict(max_model_len=4096, max_num_batched_tokens=1024,
                                                   hf_overrides=overrides),
                      sampling=dict(max_tokens=5, prompt_logprobs=0, logprobs=0))
    o = outs[0]
    got = torch.tensor(o["prompt_logprobs"][1:], dtype=torch.float64)
    want = ref_prompt_logprobs(ref, prompt, freqs, lminf)
    assert (got - want).abs().max().item() < 2e-4
    seq = prompt + o["tokens"]
    got_gen = torch.tensor(o["logprobs"], dtype=torch.float64)
    assert (got_gen - ref_generated_logprobs(ref, seq, len(prompt), freqs, lminf)).abs().max().item() < 2e-4


def test_clex_with_top_k_across_a_t_boundary(clex_model, path_kind, seed):
    """Top-k middle attention (issue 15) on CLEX: a 120-token prompt generating 30 tokens
    across t 1 -> 2; the top-k layer reads middle keys, so on the fast path every held key
    is re-rotated when t steps up. Prompt and generated logprobs equal the float64 reference."""
    path, freqs, ref = clex_model
    rng = random.Random(seed)
    prompt = rand_ids(120, rng)
    lminf = (4, 64, 64)
    top_k = {"top_k": 3, "top_k_from_layer": 1, "top_k_distance": 32}
    overrides = {"lm_infinite": {"n_global": 4, "n_local": 64, "distance_limit": 64, **top_k}}
    outs = run_engine(path, [prompt], engine=dict(max_model_len=4096, hf_overrides=overrides, **PATHS[path_kind]),
                      sampling=dict(max_tokens=30, logprobs=0))
    seq = prompt + outs[0]["tokens"]
    layers = ref.config.num_hidden_layers
    got = torch.tensor(outs[0]["logprobs"], dtype=torch.float64)
    want = ref.incremental_logprobs(seq[:120], seq[120:], **ref_kwargs(freqs, lminf),
                                    top_k=(3, 32, 1, layers, 119))
    plain = ref_generated_logprobs(ref, seq, 120, freqs, lminf)
    assert (got - want).abs().max().item() < 2e-4
    assert (got - plain).abs().max().item() > 1e-3


def test_missing_clex_weights_fail_at_start(tmp_path):
    path = make_tiny_llama(tmp_path / "m", max_position_embeddings=L, head_dim=HEAD,
                           extra_config={"rope_scaling": CLEX_SCALING})
    with pytest.raises(RuntimeError, match="checkpoint lacks"):
        run_engine(path, [[5, 6]], engine=dict(max_model_len=L))
