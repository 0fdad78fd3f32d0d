"""CLEX ODE: NTK oracle, torchdiffeq equivalence, xi closed form, config parsing, t choice."""

from __future__ import annotations

import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from vllm_lminf.clex import (
    CLEX_REFERENCE_ODE_BASE,
    CLEX_WEIGHT_NAMES,
    ClexConfig,
    clex_config_from_hf_config,
    clex_log_scale,
    clex_log_scale_tensor,
    clex_ode_rhs,
    clex_scale_index,
    clex_scale_index_tensor,
    clex_time_grid,
    find_clex_rope_dict,
    ntk_log_inv_freq,
    ntk_log_inv_freq_dt,
    solve_clex_frequencies,
)


def _cfg(max_factor=8, param_factor=1, act="silu", time_dt=0.01, log_scale=False) -> ClexConfig:
    return ClexConfig(
        max_factor=max_factor, param_factor=param_factor, act=act, time_dt=time_dt, log_scale=log_scale
    )


def _std_inv_freq(base: float, d: int, dtype=torch.float64) -> torch.Tensor:
    return base ** (-(torch.arange(0, d, 2, dtype=dtype) / d))


def _ntk_power_form(t: float, base: float, d: int) -> torch.Tensor:
    """theta_ntk(t) = (b * alpha^(d/(d-2)))^(-2i/d), alpha = 2t - 1, float64."""
    alpha = 2.0 * t - 1.0
    ntk_base = base * alpha ** (d / (d - 2))
    return ntk_base ** (-(torch.arange(0, d, 2, dtype=torch.float64) / d))


def _random_weights(d: int, lam: int, gen: torch.Generator, dtype=torch.float32):
    half = d // 2
    bound = 1.0 / math.sqrt(half)
    up = (torch.rand(half, lam * d, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    down = torch.randn(lam * d, half, generator=gen, dtype=torch.float64) * 0.02
    return up.to(dtype), down.to(dtype)


# --------------------------------------------------------------------------------------
# NTK oracle (down projection zero)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d,base,act", [(16, 10000.0, "tanh"), (32, 500000.0, "silu"), (128, 10000.0, "silu"), (64, 1e6, "tanh")]
)
def test_zero_down_proj_is_ntk_scaling(d, base, act, seed):
    gen = torch.Generator().manual_seed(seed)
    max_factor = 8
    up, _ = _random_weights(d, 2, gen)
    down = torch.zeros(2 * d, d // 2)
    inv_freq = _std_inv_freq(base, d).to(torch.float32)
    freqs = solve_clex_frequencies(
        inv_freq, up, down, base=base, rotary_dim=d, cfg=_cfg(max_factor, 2, act)
    )
    assert freqs.shape == (max_factor, d // 2) and freqs.dtype == torch.float32
    assert torch.equal(freqs[0], inv_freq)
    for t in range(1, max_factor + 1):
        # z(1) = log(float32 inv_freq); the oracle starts from the same point.
        expected = _ntk_power_form(t, base, d) * (inv_freq.double() / _std_inv_freq(base, d))
        torch.testing.assert_close(freqs[t - 1].double(), expected, rtol=1e-6, atol=0)


def test_ntk_log_inv_freq_matches_power_form():
    for d in (4, 16, 64, 128):
        for base in (10000.0, 1e6):
            for t in (1.0, 1.3, 2.0, 5.5, 16.0):
                got = ntk_log_inv_freq(t, base=base, rotary_dim=d)
                torch.testing.assert_close(got, torch.log(_ntk_power_form(t, base, d)), rtol=1e-12, atol=1e-12)
    # alpha is held at 1 below t = 1
    torch.testing.assert_close(
        ntk_log_inv_freq(0.5, base=10000.0, rotary_dim=16), torch.log(_std_inv_freq(10000.0, 16))
    )


# --------------------------------------------------------------------------------------
# xi(t) closed form vs finite differences
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [4, 16, 128])
def test_xi_closed_form_matches_finite_difference(d):
    base = 10000.0
    h = 1e-5
    for t in (1.25, 1.5, 2.0, 3.7, 8.0, 16.0):
        fd = (
            ntk_log_inv_freq(t + h, base=base, rotary_dim=d)
            - ntk_log_inv_freq(t - h, base=base, rotary_dim=d)
        ) / (2 * h)
        torch.testing.assert_close(ntk_log_inv_freq_dt(t, rotary_dim=d), fd, rtol=1e-7, atol=1e-9)
        # also against the independent power form
        fd_pow = (torch.log(_ntk_power_form(t + h, base, d)) - torch.log(_ntk_power_form(t - h, base, d))) / (2 * h)
        torch.testing.assert_close(ntk_log_inv_freq_dt(t, rotary_dim=d), fd_pow, rtol=1e-7, atol=1e-9)
    # at t = 1 alpha has a kink; the ODE runs forward, so the right derivative applies
    fwd = (
        ntk_log_inv_freq(1.0 + h, base=base, rotary_dim=d) - ntk_log_inv_freq(1.0, base=base, rotary_dim=d)
    ) / h
    torch.testing.assert_close(ntk_log_inv_freq_dt(1.0, rotary_dim=d), fwd, rtol=1e-4, atol=1e-9)
    # xi does not depend on the base and is 0 for the i = 0 component
    assert ntk_log_inv_freq_dt(3.0, rotary_dim=d)[0] == 0


# --------------------------------------------------------------------------------------
# Equivalence with torchdiffeq (the reference solver)
# --------------------------------------------------------------------------------------


class _ReferenceField(torch.nn.Module):
    """The CLEX vector field written the way the reference computes it (power form
    for theta_ntk, xi from the derivative of theta_ntk divided by theta_ntk)."""

    def __init__(self, up, down, base, d, act):
        super().__init__()
        self.up, self.down, self.base, self.d = up, down, base, d
        self.act = torch.nn.SiLU() if act == "silu" else torch.nn.Tanh()

    def forward(self, t, z):
        d, dtype = self.d, z.dtype
        alpha = 2 * t - 1 if t >= 1 else torch.ones_like(t)
        idx = torch.arange(0, d, 2, dtype=dtype)
        theta = 1.0 / ((self.base * alpha ** (d / (d - 2))) ** (idx / d))
        dtheta = -2 * idx / (d - 2) / (self.base ** (idx / d) * alpha ** (idx / (d - 2) + 1))
        return self.act((z + torch.log(theta)) @ self.up) @ self.down + dtheta / theta


def _torchdiffeq_solution(inv_freq, up, down, base, d, cfg, dtype):
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field = _ReferenceField(up.to(dtype), down.to(dtype), base, d, cfg.act)
    t = torch.arange(1.0, cfg.max_factor + 1.0, dtype=dtype)
    with torch.no_grad():
        sol = torchdiffeq.odeint(
            field, torch.log(inv_freq.to(dtype)), t, method="rk4", options={"step_size": cfg.time_dt}
        )
    return torch.exp(sol)


@pytest.mark.parametrize("act", ["silu", "tanh"])
@pytest.mark.parametrize("lam", [1, 2])
@pytest.mark.parametrize("time_dt", [0.01, 0.07])  # 0.07 exercises output-time interpolation
def test_matches_torchdiffeq_rk4(act, lam, time_dt, seed):
    gen = torch.Generator().manual_seed(seed)
    d = int(torch.tensor([16, 32])[torch.randint(0, 2, (1,), generator=gen)])
    max_factor = int(torch.randint(4, 9, (1,), generator=gen))
    base = float(torch.tensor([10000.0, 1e6])[torch.randint(0, 2, (1,), generator=gen)])
    up, down = _random_weights(d, lam, gen)
    inv_freq = _std_inv_freq(base, d).to(torch.float32)
    cfg = _cfg(max_factor, lam, act, time_dt)

    ours64 = solve_clex_frequencies(inv_freq, up, down, base=base, rotary_dim=d, cfg=cfg)
    ref64 = _torchdiffeq_solution(inv_freq, up, down, base, d, cfg, torch.float64)
    # the ODE must actually move away from plain NTK for this test to mean anything
    ntk_last = _ntk_power_form(max_factor, base, d)
    assert (ref64[-1] / ntk_last - 1).abs().max() > 1e-3
    torch.testing.assert_close(ours64.double(), ref64, rtol=1e-5, atol=0)

    # same arithmetic as the reference (float32 state and time grid)
    ours32 = solve_clex_frequencies(inv_freq, up, down, base=base, rotary_dim=d, cfg=cfg, dtype=torch.float32)
    ref32 = _torchdiffeq_solution(inv_freq, up, down, base, d, cfg, torch.float32)
    torch.testing.assert_close(ours32, ref32, rtol=1e-5, atol=0)


def test_grid_matches_torchdiffeq_construction():
    torchdiffeq_solvers = pytest.importorskip("torchdiffeq._impl.solvers")
    make = torchdiffeq_solvers.FixedGridODESolver._grid_constructor_from_step_size
    for dtype in (torch.float32, torch.float64):
        for max_factor in (2, 4, 8, 16, 64):
            for dt in (0.01, 0.07, 0.3, 1.0):
                t = torch.arange(1.0, max_factor + 1.0, dtype=dtype)
                expected = make(dt)(None, None, t)
                assert torch.equal(clex_time_grid(max_factor, dt, dtype), expected)


def test_rhs_helper_agrees_with_reference_field(seed):
    gen = torch.Generator().manual_seed(seed)
    d, base = 16, 10000.0
    up, down = _random_weights(d, 2, gen, dtype=torch.float64)
    z = torch.log(_std_inv_freq(base, d))
    field = _ReferenceField(up, down, base, d, "tanh")
    for t in (1.0, 1.5, 3.0):
        torch.testing.assert_close(
            clex_ode_rhs(t, z, up, down, base=base, rotary_dim=d, act="tanh"),
            field(torch.tensor(t, dtype=torch.float64), z),
        )


def test_max_factor_one_and_shape_checks():
    d = 16
    inv_freq = _std_inv_freq(10000.0, d).to(torch.float32)
    up, down = torch.zeros(8, 16), torch.zeros(16, 8)
    out = solve_clex_frequencies(inv_freq, up, down, base=10000.0, rotary_dim=d, cfg=_cfg(1))
    assert out.shape == (1, 8) and torch.equal(out[0], inv_freq)
    with pytest.raises(ValueError, match="ode_up_proj"):
        solve_clex_frequencies(inv_freq, torch.zeros(8, 32), down, base=1e4, rotary_dim=d, cfg=_cfg(4))
    with pytest.raises(ValueError, match="ode_down_proj"):
        solve_clex_frequencies(inv_freq, up, torch.zeros(8, 16), base=1e4, rotary_dim=d, cfg=_cfg(4))
    with pytest.raises(ValueError, match="inv_freq"):
        solve_clex_frequencies(inv_freq[:4], up, down, base=1e4, rotary_dim=d, cfg=_cfg(4))
    with pytest.raises(ValueError, match="rotary_dim"):
        solve_clex_frequencies(inv_freq[:1], up, down, base=1e4, rotary_dim=2, cfg=_cfg(4))


def test_weight_names():
    assert CLEX_WEIGHT_NAMES == (
        "model.clex_layer.inv_freq",
        "model.clex_layer.proj_func.ode_up_proj",
        "model.clex_layer.proj_func.ode_down_proj",
    )
    assert CLEX_REFERENCE_ODE_BASE == 10000.0


def test_module_does_not_import_vllm():
    """clex.py itself must be importable without vLLM (loaded by path, so a package
    __init__ that imports vLLM does not mask the check)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "vllm_lminf", "clex.py")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_clex_standalone', {path!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "print(any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


# --------------------------------------------------------------------------------------
# Config parsing
# --------------------------------------------------------------------------------------


def test_config_defaults_and_extra_keys():
    cfg = ClexConfig.from_hf({"type": "clex", "max_factor": 16, "param_factor": 1}, False)
    assert cfg == ClexConfig(max_factor=16, param_factor=1, act="silu", time_dt=0.01, log_scale=False)
    cfg = ClexConfig.from_hf(
        {
            "rope_type": "clex", "max_factor": 32.0, "param_factor": 2, "act": "tanh",
            "time_dt": 0.05, "factor": 1, "rope_theta": 1e6, "something_else": [1, 2],
        },
        True,
    )
    assert cfg == ClexConfig(max_factor=32, param_factor=2, act="tanh", time_dt=0.05, log_scale=True)
    assert isinstance(cfg.max_factor, int)
    with pytest.raises(Exception):
        cfg.max_factor = 4  # frozen


@pytest.mark.parametrize(
    "rope,field,snippet",
    [
        ({"type": "clex", "param_factor": 1}, "max_factor", "integer >= 1"),
        ({"type": "clex", "max_factor": "x", "param_factor": 1}, "max_factor", "got 'x'"),
        ({"type": "clex", "max_factor": 0, "param_factor": 1}, "max_factor", "integer >= 1"),
        ({"type": "clex", "max_factor": 2.5, "param_factor": 1}, "max_factor", "integer >= 1"),
        ({"type": "clex", "max_factor": True, "param_factor": 1}, "max_factor", "integer >= 1"),
        ({"type": "clex", "max_factor": 4}, "param_factor", "integer >= 1"),
        ({"type": "clex", "max_factor": 4, "param_factor": -1}, "param_factor", "integer >= 1"),
        ({"type": "clex", "max_factor": 4, "param_factor": 1, "act": "relu"}, "act", "['silu', 'tanh']"),
        ({"type": "clex", "max_factor": 4, "param_factor": 1, "act": 3}, "act", "['silu', 'tanh']"),
        ({"type": "clex", "max_factor": 4, "param_factor": 1, "time_dt": -0.01}, "time_dt", "> 0"),
        ({"type": "clex", "max_factor": 4, "param_factor": 1, "time_dt": 0}, "time_dt", "> 0"),
        ({"type": "clex", "max_factor": 4, "param_factor": 1, "time_dt": "0.01"}, "time_dt", "> 0"),
        ({"type": "clex", "max_factor": 4, "param_factor": 1, "time_dt": float("nan")}, "time_dt", "> 0"),
        ({"type": "linear", "max_factor": 4, "param_factor": 1}, "type", "'clex'"),
    ],
)
def test_config_errors_name_the_field(rope, field, snippet):
    with pytest.raises(ValueError) as err:
        ClexConfig.from_hf(rope, False)
    msg = str(err.value)
    assert f"rope_scaling.{field}" in msg and snippet in msg, msg


def test_config_error_prefix_and_log_scale():
    with pytest.raises(ValueError, match=r"rope_parameters\.max_factor"):
        ClexConfig.from_hf({"rope_type": "clex"}, False, source="rope_parameters")
    with pytest.raises(ValueError, match="log_scale"):
        ClexConfig.from_hf({"type": "clex", "max_factor": 4, "param_factor": 1}, "yes")
    assert ClexConfig.from_hf({"type": "clex", "max_factor": 4, "param_factor": 1}, None).log_scale is False


def test_find_clex_rope_dict():
    clex = {"type": "clex", "max_factor": 16, "param_factor": 1}
    assert find_clex_rope_dict(SimpleNamespace(rope_scaling=clex)) == clex
    assert find_clex_rope_dict(SimpleNamespace(rope_scaling=None, rope_parameters=clex)) == clex
    tf5 = {"rope_type": "clex", "rope_theta": 1e6, "max_factor": 8, "param_factor": 1}
    assert find_clex_rope_dict(SimpleNamespace(rope_parameters=tf5)) == tf5
    assert find_clex_rope_dict(SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0})) is None
    assert find_clex_rope_dict(SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e4})) is None
    assert find_clex_rope_dict(SimpleNamespace()) is None
    assert find_clex_rope_dict(SimpleNamespace(rope_scaling="clex")) is None

    hf = SimpleNamespace(rope_parameters=tf5, log_scale=True)
    assert clex_config_from_hf_config(hf) == ClexConfig(8, 1, "silu", 0.01, True)
    assert clex_config_from_hf_config(SimpleNamespace(rope_scaling=None)) is None
    with pytest.raises(ValueError, match=r"rope_parameters\.param_factor"):
        clex_config_from_hf_config(SimpleNamespace(rope_parameters={"rope_type": "clex", "max_factor": 8}))


# --------------------------------------------------------------------------------------
# Scale index and log scale
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seq_len,expected",
    [(0, 1), (1, 1), (4096, 1), (4097, 2), (8192, 2), (8193, 3), (4096 * 8, 8), (4096 * 8 + 1, 8), (10**9, 8)],
)
def test_clex_scale_index(seq_len, expected):
    assert clex_scale_index(seq_len, 4096, 8) == expected
    got = clex_scale_index_tensor(torch.tensor([seq_len]), 4096, 8)
    assert got.dtype == torch.int64 and got.tolist() == [expected]


def test_clex_scale_index_tensor_matches_scalar():
    L, mf = 7, 5
    s = torch.arange(0, 60)
    t = clex_scale_index_tensor(s.to(torch.int32), L, mf)
    assert t.dtype == torch.int64
    assert t.tolist() == [clex_scale_index(int(x), L, mf) for x in s]
    assert clex_scale_index(5, 4096, 1) == 1


def test_clex_log_scale():
    L = 4096
    assert clex_log_scale(L, L) == pytest.approx(1.0)
    assert clex_log_scale(L * L, L) == pytest.approx(2.0)
    assert clex_log_scale(2 * L, L) == pytest.approx(math.log(2 * L) / math.log(L))
    # reference behaviour: not clamped below L
    assert clex_log_scale(64, L) == pytest.approx(0.5)
    assert clex_log_scale(1, L) == 0.0
    assert clex_log_scale(64, L, min_one=True) == 1.0
    assert clex_log_scale(L * L, L, min_one=True) == pytest.approx(2.0)
    s = torch.tensor([1, 64, L, 2 * L])
    torch.testing.assert_close(
        clex_log_scale_tensor(s, L), torch.tensor([clex_log_scale(int(x), L) for x in s], dtype=torch.float32)
    )
    torch.testing.assert_close(
        clex_log_scale_tensor(s, L, min_one=True),
        torch.tensor([clex_log_scale(int(x), L, min_one=True) for x in s], dtype=torch.float32),
    )
    with pytest.raises(ValueError):
        clex_log_scale(0, L)
