"""CLEX frequencies as the released checkpoints were trained: an independent solve written
from the upstream training code (DAMO-NLP-SG/CLEX, CLEX/clex_layer.py) with torchdiffeq,
against the table the plugin serves from (`ClexFrequencies.load_weights`, the runtime path).

Upstream quirk reproduced: the ODE's state starts at log(inv_freq) of the checkpoint (built
with the model's rope_theta), but the NTK time embedding inside the vector field is built
with base 10000 whatever rope_theta is (`get_time_embedding` is called without its `base`).
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_lminf.clex import CLEX_WEIGHT_NAMES, ClexConfig
from vllm_lminf.clex_runtime import ClexFrequencies

torchdiffeq = pytest.importorskip("torchdiffeq")

D, LAM, MAX_FACTOR, TIME_DT = 32, 2, 6, 0.01


def upstream_table(inv_freq: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: str,
                   embedding_base: float = 10000.0) -> torch.Tensor:
    """[MAX_FACTOR, D/2] float64: exp of the solution at t = 1..MAX_FACTOR."""
    f = torch.tanh if act == "tanh" else torch.nn.functional.silu
    idx = torch.arange(0, D, 2, dtype=torch.float64)  # upstream's "index": 0, 2, 4, ...

    def field(t, x):
        alpha = 2 * float(t) - 1 if float(t) >= 1 else 1.0
        ntk = 1.0 / (embedding_base * alpha ** (D / (D - 2))) ** (idx / D)  # NTK inverse frequencies
        d_ntk = -2 * idx / (D - 2) / (embedding_base ** (idx / D) * alpha ** (idx / (D - 2) + 1))  # their d/dt
        return f((x + torch.log(ntk)) @ up) @ down + d_ntk / ntk

    times = torch.arange(1, MAX_FACTOR + 1, dtype=torch.float64)
    z = torchdiffeq.odeint(field, torch.log(inv_freq), times, method="rk4", options={"step_size": TIME_DT})
    return z.exp()


def checkpoint_tensors(rope_theta: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    half = D // 2
    bound = 1.0 / math.sqrt(half)  # the scale of upstream's kaiming-uniform init
    return {
        CLEX_WEIGHT_NAMES[0]: 1.0 / rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D),
        CLEX_WEIGHT_NAMES[1]: (torch.rand(half, LAM * D, generator=g, dtype=torch.float64) * 2 - 1) * bound,
        CLEX_WEIGHT_NAMES[2]: torch.randn(LAM * D, half, generator=g, dtype=torch.float64) * 0.05,
    }


def served_table(tensors: dict[str, torch.Tensor], act: str) -> torch.Tensor:
    clex = ClexFrequencies(ClexConfig(max_factor=MAX_FACTOR, param_factor=LAM, act=act, time_dt=TIME_DT,
                                      log_scale=False), original_len=128)
    clex.check_rotary_dim(D)
    clex.load_weights(((n, t.float()) for n, t in tensors.items()), lambda rest: set(n for n, _ in rest))
    return clex.table.double()


@pytest.mark.parametrize("act", ["tanh", "silu"])
@pytest.mark.parametrize("rope_theta", [10000.0, 500000.0, 1e6])
def test_served_frequencies_equal_the_upstream_solve(rope_theta, act, seed):
    tensors = checkpoint_tensors(rope_theta, seed)
    # the checkpoint stores fp32; both sides start from those values
    tensors = {n: t.float().double() for n, t in tensors.items()}
    want = upstream_table(*(tensors[n] for n in CLEX_WEIGHT_NAMES), act)
    got = served_table(tensors, act)
    rel = ((got - want) / want).abs().max().item()
    assert rel < 2e-6, rel
    assert (want[1:] / want[:-1] - 1).abs().max() > 1e-2  # the table really moves with t
    if rope_theta != 10000.0:
        # the quirk matters: a time embedding at rope_theta gives other frequencies
        other = upstream_table(*(tensors[n] for n in CLEX_WEIGHT_NAMES), act, embedding_base=rope_theta)
        assert ((other - got) / got).abs().max().item() > 1e-3


def test_clex_tensors_of_another_rotary_dim_are_refused(seed):
    tensors = checkpoint_tensors(10000.0, seed)
    clex = ClexFrequencies(ClexConfig(max_factor=2, param_factor=LAM, act="tanh", time_dt=TIME_DT,
                                      log_scale=False), original_len=128)
    clex.check_rotary_dim(2 * D)
    with pytest.raises(ValueError, match=r"model.clex_layer.inv_freq has 16 entries but the model's rotary dim is 64"):
        clex.load_weights(iter(tensors.items()), lambda rest: set(n for n, _ in rest))
