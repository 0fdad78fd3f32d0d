"""Qwen3, Mixtral, Phi and GPT-NeoX under the plugin, end to end (CPU, float32).

Per family, on tiny random checkpoints built by transformers (tests/helpers/families.py),
against the float64 reference of every family (tests/helpers/reference.py):
  (a) plugin features off: nothing is swapped and the output is stock vLLM's
      (bit-identical for Qwen3/Mixtral, whose override is vLLM's own class); Phi and
      GPT-NeoX, which vLLM serves only through its Transformers backend, are our
      vLLM-native models and must match transformers' float32 forward and that
      backend closely;
  (b) LM-Infinite on (G=4, W=32, d=32, trained length 64, a 200-token prompt under
      chunked prefill, plus decoding): logprobs equal the float64 reference;
  (c) CLEX checkpoint (released tensor names): prompts in t = 1..4 match the float64
      reference with torchdiffeq frequencies.
"""

import math
import random
import types

import pytest
import torch

from helpers.engine import run_engine
from helpers.families import ARCHITECTURE, FAMILIES, hf_logprobs, make_family_checkpoint
from helpers.probe import plugin_layers
from helpers.reference import Reference, token_logprobs

pytestmark = pytest.mark.slow

L = 64  # trained length
N_LAYERS = 2
G, W, D = 4, 32, 32
MAX_FACTOR = 4
CLEX_SCALING = {"type": "clex", "max_factor": MAX_FACTOR, "param_factor": 1, "act": "tanh", "time_dt": 0.01}
TOL = 2e-4

def rand_ids(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, 380) for _ in range(n)]


def as_t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, module_seed):
    cache: dict = {}

    def get(family: str, kind: str = "plain"):
        key = (family, kind)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{family}_{kind}")
            if kind == "plain":
                cache[key] = make_family_checkpoint(family, root, max_position_embeddings=L, seed=11)
            else:
                # GPT-NeoX: no CLEX release exists; use its own base-model prefix.
                prefix = "gpt_neox.clex_layer." if family == "gpt_neox" else "model.clex_layer."
                cache[key] = make_family_checkpoint(
                    family, root, max_position_embeddings=L, seed=12, clex=CLEX_SCALING,
                    clex_seed=module_seed, clex_prefix=prefix, extra_config={"log_scale": True},
                )
        return cache[key]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_switch_off_is_stock(family, checkpoints, seed):
    path = checkpoints(family)
    rng = random.Random(seed)
    prompts = [rand_ids(n, rng) for n in (60, 33, 2)]
    engine = dict(max_model_len=L)
    sampling = dict(max_tokens=4, prompt_logprobs=0, logprobs=0)
    ours = run_engine(path, prompts, engine=engine, sampling=sampling, probe=plugin_layers)
    stock = run_engine(path, prompts, engine=engine, sampling=sampling, plugin=False)
    assert ours["extra"] == {"class": "LMInf" + ARCHITECTURE[family], "swapped": 0, "backends": [],
                             "isas": []}
    for p, o, s in zip(prompts, ours["results"], stock):
        assert o["tokens"] == s["tokens"]
        if family in ("qwen3", "mixtral"):  # the override is vLLM's own class
            assert o["prompt_logprobs"] == s["prompt_logprobs"] and o["logprobs"] == s["logprobs"]
            continue
        # Phi / GPT-NeoX: ours is vLLM-native, stock is the Transformers backend.
        got = as_t(o["prompt_logprobs"][1:] + o["logprobs"])
        assert (got - as_t(s["prompt_logprobs"][1:] + s["logprobs"])).abs().max().item() < 1e-4
        seq = p + o["tokens"]
        want = token_logprobs(hf_logprobs(path, seq), seq)  # transformers, float32
        assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_infinite_matches_float64_reference(family, checkpoints, seed):
    """A 200-token prompt at trained length 64, chunked prefill (64 tokens per step)
    mixed with decodes of the shorter prompts."""
    path = checkpoints(family)
    rng = random.Random(seed)
    prompts = [rand_ids(n, rng) for n in (200, 70, 3)]
    engine = dict(max_model_len=1024, max_num_batched_tokens=64,
                  hf_overrides={"lm_infinite": {"n_global": G, "n_local": W, "distance_limit": D}})
    out = run_engine(path, prompts, engine=engine, sampling=dict(max_tokens=5, prompt_logprobs=0, logprobs=0),
                     probe=plugin_layers)
    assert out["extra"]["swapped"] == N_LAYERS
    ref = Reference(path)
    for p, o in zip(prompts, out["results"]):
        seq = p + o["tokens"]
        got = as_t(o["prompt_logprobs"][1:] + o["logprobs"])
        want = token_logprobs(ref.logprobs(seq, lm_infinite=(G, W, D)), seq)
        assert (got - want).abs().max().item() < TOL, (family, len(p), (got - want).abs().max().item())
        if len(p) == 200:
            causal = token_logprobs(ref.logprobs(seq), seq)
            assert (got - causal).abs().max().item() > 0.05


def torchdiffeq_frequencies(path, rotary_dim: int) -> torch.Tensor:
    """[MAX_FACTOR, rotary_dim/2] float64 CLEX frequencies at t = 1..MAX_FACTOR: the state
    starts at the checkpoint's inv_freq (built with the model's rope_theta); the NTK time
    embedding inside the ODE uses base 10000 whatever rope_theta is, as upstream CLEX does
    (its ODELinear calls get_time_embedding without a base)."""
    base = 10000.0
    from safetensors.torch import load_file
    from torchdiffeq import odeint

    tensors = {k.split("clex_layer.")[1]: v.double() for k, v in load_file(str(path / "model.safetensors")).items()
               if "clex_layer." in k}
    d = rotary_dim
    i = torch.arange(d // 2, dtype=torch.float64)
    up, down = tensors["proj_func.ode_up_proj"], tensors["proj_func.ode_down_proj"]
    assert tensors["inv_freq"].numel() == d // 2

    def rhs(time, z):
        alpha = max(2 * float(time) - 1, 1.0)
        log_ntk = -(2 * i / d) * (math.log(base) + d / (d - 2) * math.log(alpha))
        dlog_ntk = -(2 * i / d) * (d / (d - 2)) * 2 / alpha
        return torch.tanh((z + log_ntk) @ up) @ down + dlog_ntk

    times = torch.arange(1, MAX_FACTOR + 1, dtype=torch.float64)
    return odeint(rhs, tensors["inv_freq"].log(), times, method="rk4", options={"step_size": 0.01}).exp()


@pytest.mark.parametrize("family", FAMILIES)
def test_clex_matches_float64_reference(family, checkpoints, seed):
    """Four prompts in t = 1, 2, 3, 4 scheduled in one step; each equals the float64
    CLEX forward (frequencies from torchdiffeq, log-scaled queries)."""
    path = checkpoints(family, "clex")
    ref = Reference(path)
    freqs = torchdiffeq_frequencies(path, ref.rotary_dim)
    rng = random.Random(seed)
    prompts = [rand_ids(n, rng) for n in (50, 100, 170, 250)]
    t_of = lambda S: min(max(1, math.ceil(S / L)), MAX_FACTOR)
    assert [t_of(len(p)) for p in prompts] == [1, 2, 3, 4]
    out = run_engine(path, prompts, engine=dict(max_model_len=L * MAX_FACTOR, max_num_batched_tokens=1024),
                     sampling=dict(max_tokens=1, prompt_logprobs=0), probe=plugin_layers)
    assert out["extra"]["swapped"] == N_LAYERS
    for p, o in zip(prompts, out["results"]):
        lp = ref.logprobs(p, inv_freq_for_len=lambda S: freqs[t_of(S) - 1],
                          query_scale_for_len=lambda S: math.log(S) / math.log(L))
        got = as_t(o["prompt_logprobs"][1:])
        want = token_logprobs(lp, p)
        assert (got - want).abs().max().item() < TOL, (family, len(p), (got - want).abs().max().item())


VARIANTS = {
    "gpt_neox": dict(use_parallel_residual=False, tie_word_embeddings=True, attention_bias=False, rotary_pct=0.5),
    "phi": dict(qk_layernorm=True, num_key_value_heads=2),
}


@pytest.mark.parametrize("family", sorted(VARIANTS))
def test_native_model_variants_match_transformers(family, tmp_path, seed):
    """Config switches of the plugin's own models, features off, against transformers
    (float32): GPT-NeoX sequential residual + tied head + no attention bias + rotary_pct
    0.5; Phi q/k LayerNorm + grouped KV heads."""
    path = make_family_checkpoint(family, tmp_path / "m", max_position_embeddings=L, seed=13, **VARIANTS[family])
    rng = random.Random(seed)
    prompts = [rand_ids(n, rng) for n in (60, 17)]
    out = run_engine(path, prompts, engine=dict(max_model_len=L),
                     sampling=dict(max_tokens=4, prompt_logprobs=0, logprobs=0))
    for p, o in zip(prompts, out):
        seq = p + o["tokens"]
        got = as_t(o["prompt_logprobs"][1:] + o["logprobs"])
        assert (got - token_logprobs(hf_logprobs(path, seq), seq)).abs().max().item() < 1e-4


def test_gpt_neox_fused_qkv_split_follows_per_head_layout(seed):
    """HF rows are [heads, 3, head_dim]; the split gives all q rows, all k, all v."""
    from vllm_lminf.gpt_neox import split_fused_qkv

    H, Dh, hidden = 3, 4, 5
    w = torch.randn(3 * H * Dh, hidden)
    b = torch.randn(3 * H * Dh)
    parts = dict(split_fused_qkv([("x.attention.query_key_value.weight", w),
                                  ("x.attention.query_key_value.bias", b), ("y.w", w)], H))
    x = torch.randn(7, hidden)
    qkv = (x @ w.T + b).view(7, H, 3, Dh)  # what transformers computes
    for i, part in enumerate("qkv"):
        mine = x @ parts[f"x.attention.query_key_value.{part}_part.weight"].T
        mine = mine + parts[f"x.attention.query_key_value.{part}_part.bias"]
        assert torch.allclose(mine.view(7, H, Dh), qkv[:, :, i])
    assert parts["y.w"] is w


def test_unsupported_architecture_lists_the_supported_ones():
    from vllm_lminf.max_len import allowed_max_len

    cfg = types.SimpleNamespace(architectures=["FalconForCausalLM"], lm_infinite={}, max_position_embeddings=L)
    with pytest.raises(ValueError, match="FalconForCausalLM") as err:
        allowed_max_len(cfg)
    for arch in ARCHITECTURE.values():
        assert arch in str(err.value)
