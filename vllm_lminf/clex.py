"""CLEX: continuous length extrapolation via a learned ODE over RoPE frequencies.

CLEX (Chen et al., ICLR 2024) replaces a fixed RoPE scaling rule with a small
learned vector field. For a scaling factor ``t >= 1`` (sequence length measured
in units of the trained length ``L``) the log-frequencies ``z(t) = log theta(t)``
follow

    dz/dt = act((z + log theta_ntk(t)) @ W_up) @ W_down + xi(t),   z(1) = log(inv_freq)

where ``theta_ntk(t)`` are the NTK-aware frequencies for the stretch factor
``alpha(t) = 2t - 1`` and ``xi(t) = d/dt log theta_ntk(t)``. When ``W_down`` is zero
the solution is exactly ``log theta_ntk(t)`` (provided ``inv_freq`` is the standard
``b^(-2i/d)``), so the network learns a correction on top of NTK scaling.

At serving time the ODE is solved once, at the integer factors ``t = 1..max_factor``,
and a sequence of length ``S`` uses the row for ``t = min(ceil(S / L), max_factor)``.

This module is pure torch (no vLLM import) so it can be unit-tested and reused by
offline tools. The solver reproduces ``torchdiffeq.odeint(..., method="rk4",
options={"step_size": time_dt})`` -- the call the reference implementation makes --
including how that solver lays out its grid and interpolates output times which
fall between grid points. It runs in float64 by default (the reference runs in
float32; the two agree to ~1e-5 relative, float64 simply has less round-off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "CLEX_ACTIVATIONS",
    "CLEX_INV_FREQ_NAME",
    "CLEX_UP_PROJ_NAME",
    "CLEX_DOWN_PROJ_NAME",
    "CLEX_WEIGHT_NAMES",
    "CLEX_REFERENCE_ODE_BASE",
    "ClexConfig",
    "find_clex_rope_dict",
    "clex_config_from_hf_config",
    "ntk_alpha",
    "ntk_log_inv_freq",
    "ntk_log_inv_freq_dt",
    "clex_ode_rhs",
    "clex_time_grid",
    "solve_clex_frequencies",
    "clex_scale_index",
    "clex_scale_index_tensor",
    "clex_log_scale",
    "clex_log_scale_tensor",
]

# --------------------------------------------------------------------------------------
# Checkpoint layout
# --------------------------------------------------------------------------------------

#: Checkpoint tensor names of the three CLEX parameters (all stored as fp32 in the
#: reference training code; some exports may have cast them to the model dtype).
CLEX_INV_FREQ_NAME = "model.clex_layer.inv_freq"  # [d/2]
CLEX_UP_PROJ_NAME = "model.clex_layer.proj_func.ode_up_proj"  # [d/2, lambda*d]
CLEX_DOWN_PROJ_NAME = "model.clex_layer.proj_func.ode_down_proj"  # [lambda*d, d/2]
CLEX_WEIGHT_NAMES: tuple[str, str, str] = (
    CLEX_INV_FREQ_NAME,
    CLEX_UP_PROJ_NAME,
    CLEX_DOWN_PROJ_NAME,
)

#: The reference implementation (DAMO-NLP-SG/CLEX, CLEX/clex_layer.py) evaluates the
#: NTK term inside the ODE with a hard-coded base of 10000, whatever the model's
#: ``rope_theta`` is (a commit passing ``rope_theta`` through was reverted minutes
#: later). ``solve_clex_frequencies`` uses the ``base`` it is given; pass this value as
#: ``base`` to reproduce the reference for checkpoints whose rope_theta != 10000.
CLEX_REFERENCE_ODE_BASE = 10000.0

CLEX_ACTIVATIONS: tuple[str, ...] = ("silu", "tanh")

_DEFAULT_ACT = "silu"
_DEFAULT_TIME_DT = 0.01


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


def _is_clex_dict(value: Any) -> bool:
    if not isinstance(value, Mapping):
        return False
    return value.get("type") == "clex" or value.get("rope_type") == "clex"


def find_clex_rope_dict(hf_config: Any) -> dict | None:
    """Return the CLEX rope dict of an HF config, or None if the model is not CLEX.

    Looks at ``hf_config.rope_scaling`` first, then ``hf_config.rope_parameters``
    (transformers 5 moved the dict there, and may add keys such as ``rope_theta``).
    A dict counts as CLEX when its ``type`` or ``rope_type`` is ``"clex"``.
    """
    for attr in ("rope_scaling", "rope_parameters"):
        value = getattr(hf_config, attr, None)
        if _is_clex_dict(value):
            return dict(value)
    return None


def _positive_int(rope: Mapping, key: str, source: str) -> int:
    if key not in rope or rope[key] is None:
        raise ValueError(f"{source}.{key} is required for CLEX and must be an integer >= 1")
    value = rope[key]
    ok = False
    if isinstance(value, bool):
        ok = False
    elif isinstance(value, int):
        ok = value >= 1
    elif isinstance(value, float):
        # JSON writers sometimes emit 16.0 for 16; accept exact integers only.
        ok = math.isfinite(value) and value.is_integer() and value >= 1
    if not ok:
        raise ValueError(f"{source}.{key} must be an integer >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ClexConfig:
    """Validated CLEX hyper-parameters.

    max_factor:   largest scaling factor t the ODE is solved for (context = L * max_factor)
    param_factor: lambda, the hidden width multiplier of the ODE network (hidden = lambda*d)
    act:          "silu" or "tanh"
    time_dt:      RK4 step size in t
    log_scale:    whether queries are multiplied by ln(S)/ln(L) (model-level flag)
    """

    max_factor: int
    param_factor: int
    act: str
    time_dt: float
    log_scale: bool

    @classmethod
    def from_hf(
        cls,
        rope_dict: Mapping[str, Any],
        log_scale: Any = False,
        *,
        source: str = "rope_scaling",
    ) -> "ClexConfig":
        """Build from the HF rope dict (``rope_scaling`` or ``rope_parameters``).

        Unknown keys are ignored (checkpoints carry assorted extras such as
        ``factor`` or ``rope_theta``). ``source`` only changes the field prefix used
        in error messages.
        """
        if not isinstance(rope_dict, Mapping):
            raise ValueError(f"{source} must be a dict for CLEX, got {type(rope_dict).__name__}")
        for type_key in ("type", "rope_type"):
            if type_key in rope_dict and rope_dict[type_key] not in (None, "clex"):
                raise ValueError(
                    f"{source}.{type_key} must be 'clex' for a CLEX config, got {rope_dict[type_key]!r}"
                )

        max_factor = _positive_int(rope_dict, "max_factor", source)
        param_factor = _positive_int(rope_dict, "param_factor", source)

        act = rope_dict.get("act")
        if act is None:
            act = _DEFAULT_ACT
        if not isinstance(act, str) or act not in CLEX_ACTIVATIONS:
            raise ValueError(
                f"{source}.act must be one of {list(CLEX_ACTIVATIONS)}, got {act!r}"
            )

        time_dt = rope_dict.get("time_dt")
        if time_dt is None:
            time_dt = _DEFAULT_TIME_DT
        if (
            isinstance(time_dt, bool)
            or not isinstance(time_dt, (int, float))
            or not math.isfinite(time_dt)
            or time_dt <= 0
        ):
            raise ValueError(f"{source}.time_dt must be a finite number > 0, got {time_dt!r}")

        if log_scale is None:
            log_scale = False
        if not isinstance(log_scale, bool):
            raise ValueError(f"log_scale must be a bool (true/false), got {log_scale!r}")

        return cls(
            max_factor=max_factor,
            param_factor=param_factor,
            act=act,
            time_dt=float(time_dt),
            log_scale=log_scale,
        )


def clex_config_from_hf_config(hf_config: Any) -> ClexConfig | None:
    """``ClexConfig`` for an HF config, or None when the model does not use CLEX."""
    for attr in ("rope_scaling", "rope_parameters"):
        value = getattr(hf_config, attr, None)
        if _is_clex_dict(value):
            return ClexConfig.from_hf(
                value, getattr(hf_config, "log_scale", False), source=attr
            )
    return None


# --------------------------------------------------------------------------------------
# NTK time embedding
# --------------------------------------------------------------------------------------


def ntk_alpha(t: float) -> float:
    """NTK stretch factor alpha(t) = 2t - 1 for t >= 1, and 1 below."""
    t = float(t)
    return 2.0 * t - 1.0 if t >= 1.0 else 1.0


def _check_rotary_dim(rotary_dim: int) -> None:
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise ValueError(f"rotary_dim must be an even integer > 2, got {rotary_dim!r}")
    if rotary_dim <= 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even integer > 2, got {rotary_dim}")


def _exponents(rotary_dim: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """2i/d for i = 0 .. d/2-1."""
    return torch.arange(0, rotary_dim, 2, dtype=dtype, device=device) / rotary_dim


def ntk_log_inv_freq(
    t: float, *, base: float, rotary_dim: int, dtype: torch.dtype = torch.float64, device=None
) -> torch.Tensor:
    """log theta_ntk(t) = -(2i/d) * (log b + d/(d-2) * log alpha(t)), shape [d/2]."""
    _check_rotary_dim(rotary_dim)
    d = rotary_dim
    shift = math.log(base) + d / (d - 2) * math.log(ntk_alpha(t))
    return -_exponents(d, dtype, device) * shift


def ntk_log_inv_freq_dt(
    t: float, *, rotary_dim: int, dtype: torch.dtype = torch.float64, device=None
) -> torch.Tensor:
    """xi(t) = d/dt log theta_ntk(t) = -(2i/d) * d/(d-2) * 2/alpha(t), shape [d/2].

    Independent of the base. At t = 1 this is the right-hand derivative (the
    direction the ODE is integrated in). For t < 1, where theta_ntk is constant,
    the same expression with alpha = 1 is returned, as the reference does; the solver
    never evaluates it there since integration starts at t = 1.
    """
    _check_rotary_dim(rotary_dim)
    d = rotary_dim
    return -_exponents(d, dtype, device) * (d / (d - 2)) * (2.0 / ntk_alpha(t))


# --------------------------------------------------------------------------------------
# ODE solve
# --------------------------------------------------------------------------------------


def _activation(act: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if act == "silu":
        return torch.nn.functional.silu
    if act == "tanh":
        return torch.tanh
    raise ValueError(f"act must be one of {list(CLEX_ACTIVATIONS)}, got {act!r}")


def clex_ode_rhs(
    t: float,
    z: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    base: float,
    rotary_dim: int,
    act: str,
) -> torch.Tensor:
    """The CLEX vector field f(t, z) (z = log-frequencies, shape [d/2])."""
    fn = _activation(act)
    log_ntk = ntk_log_inv_freq(t, base=base, rotary_dim=rotary_dim, dtype=z.dtype, device=z.device)
    xi = ntk_log_inv_freq_dt(t, rotary_dim=rotary_dim, dtype=z.dtype, device=z.device)
    return fn((z + log_ntk) @ up) @ down + xi


def clex_time_grid(max_factor: int, time_dt: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The integration grid torchdiffeq's fixed-step solvers build for t = 1..max_factor.

    Points ``1 + k * time_dt`` for k = 0 .. ceil((max_factor - 1) / time_dt), with the
    last point replaced by ``max_factor``; arithmetic in ``dtype`` exactly as
    torchdiffeq does it (so when time_dt does not divide the span, the last step is
    shorter, and in float32 the points carry the same rounding).
    """
    start = torch.tensor(1.0, dtype=dtype)
    end = torch.tensor(float(max_factor), dtype=dtype)
    n_points = int(torch.ceil((end - start) / time_dt + 1).item())
    grid = torch.arange(0, n_points, dtype=dtype) * time_dt + start
    grid[-1] = end
    return grid


def solve_clex_frequencies(
    inv_freq: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    *,
    base: float,
    rotary_dim: int,
    cfg: ClexConfig,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Solve the CLEX ODE at t = 1..max_factor; returns float32 ``[max_factor, d/2]``.

    Row ``t - 1`` holds the frequencies theta(t); row 0 is ``inv_freq`` itself.

    Args:
        inv_freq: ``[d/2]`` base inverse frequencies (``model.clex_layer.inv_freq``).
        up:       ``[d/2, lambda*d]`` (``...proj_func.ode_up_proj``).
        down:     ``[lambda*d, d/2]`` (``...proj_func.ode_down_proj``).
        base:     base used for theta_ntk inside the ODE (the model's rope_theta per
                  our spec; the reference always uses ``CLEX_REFERENCE_ODE_BASE``).
        rotary_dim: d.
        cfg:      parsed config (max_factor, param_factor, act, time_dt are used).
        dtype:    arithmetic precision of the solve (float64 default; float32
                  reproduces the reference's own arithmetic).

    The integrator is the fixed-step RK4 "3/8 rule" on torchdiffeq's grid (see
    ``clex_time_grid``); an output time falling strictly inside a step is linearly
    interpolated between that step's end points, as torchdiffeq does by default.
    """
    _check_rotary_dim(rotary_dim)
    half = rotary_dim // 2
    hidden = cfg.param_factor * rotary_dim
    if tuple(inv_freq.shape) != (half,):
        raise ValueError(f"inv_freq must have shape [{half}] (rotary_dim/2), got {list(inv_freq.shape)}")
    if tuple(up.shape) != (half, hidden):
        raise ValueError(
            f"ode_up_proj must have shape [{half}, {hidden}] (rotary_dim/2, param_factor*rotary_dim), "
            f"got {list(up.shape)}"
        )
    if tuple(down.shape) != (hidden, half):
        raise ValueError(
            f"ode_down_proj must have shape [{hidden}, {half}] (param_factor*rotary_dim, rotary_dim/2), "
            f"got {list(down.shape)}"
        )
    if not torch.all(inv_freq > 0):
        raise ValueError("inv_freq must be strictly positive")
    if not (math.isfinite(base) and base > 1):
        raise ValueError(f"base must be a finite number > 1, got {base!r}")

    device = inv_freq.device
    out = torch.empty(cfg.max_factor, half, dtype=torch.float32, device=device)
    out[0] = inv_freq.to(torch.float32)
    if cfg.max_factor == 1:
        return out

    w_up = up.detach().to(device=device, dtype=dtype)
    w_down = down.detach().to(device=device, dtype=dtype)
    z0 = torch.log(inv_freq.detach().to(dtype))
    fn = _activation(cfg.act)

    d = rotary_dim
    expo = _exponents(d, dtype, device)
    log_b = math.log(base)
    ntk_pow = d / (d - 2)

    def rhs(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        alpha = ntk_alpha(t.item())
        log_ntk = -expo * (log_b + ntk_pow * math.log(alpha))
        xi = -expo * (ntk_pow * 2.0 / alpha)
        return fn((z + log_ntk) @ w_up) @ w_down + xi

    targets = torch.arange(1, cfg.max_factor + 1, dtype=dtype)
    grid = clex_time_grid(cfg.max_factor, cfg.time_dt, dtype)
    third = 1.0 / 3.0
    two_thirds = 2.0 / 3.0

    with torch.no_grad():
        z = z0
        j = 1  # next output index; targets[0] = 1 is the initial value
        for i in range(len(grid) - 1):
            t0, t1 = grid[i], grid[i + 1]
            h = t1 - t0
            k1 = rhs(t0, z)
            k2 = rhs(t0 + h * third, z + h * k1 * third)
            k3 = rhs(t0 + h * two_thirds, z + h * (k2 - k1 * third))
            k4 = rhs(t1, z + h * (k1 - k2 + k3))
            z_next = z + (k1 + 3 * (k2 + k3) + k4) * h * 0.125
            while j < len(targets) and t1 >= targets[j]:
                tj = targets[j]
                if tj == t0:
                    zj = z
                elif tj == t1:
                    zj = z_next
                else:
                    zj = z + (tj - t0) / (t1 - t0) * (z_next - z)
                out[j] = torch.exp(zj).to(torch.float32)
                j += 1
            z = z_next
    if j != len(targets):  # pragma: no cover - the grid always ends at max_factor
        raise RuntimeError("CLEX ODE grid did not reach max_factor")
    return out


# --------------------------------------------------------------------------------------
# Per-sequence choices
# --------------------------------------------------------------------------------------


def clex_scale_index(seq_len: int, original_len: int, max_factor: int) -> int:
    """Scaling factor t for a sequence of length S: min(ceil(S / L), max_factor), >= 1.

    Row ``t - 1`` of ``solve_clex_frequencies`` is then used for the whole sequence.
    """
    if original_len < 1:
        raise ValueError(f"original_len must be >= 1, got {original_len}")
    if max_factor < 1:
        raise ValueError(f"max_factor must be >= 1, got {max_factor}")
    t = -(-int(seq_len) // int(original_len))  # ceil for ints, exact for huge values
    return max(1, min(t, int(max_factor)))


def clex_scale_index_tensor(seq_lens: torch.Tensor, original_len: int, max_factor: int) -> torch.Tensor:
    """Vectorized ``clex_scale_index``: int64 tensor of t, same shape and device."""
    if original_len < 1:
        raise ValueError(f"original_len must be >= 1, got {original_len}")
    if max_factor < 1:
        raise ValueError(f"max_factor must be >= 1, got {max_factor}")
    s = seq_lens.to(torch.int64)
    t = torch.div(s + (original_len - 1), original_len, rounding_mode="floor")
    return t.clamp(min=1, max=int(max_factor))


def clex_log_scale(seq_len: int, original_len: int, *, min_one: bool = False) -> float:
    """Query multiplier ln(S) / ln(L) used when ``log_scale`` is on.

    The reference (CLEX/llama/modeling_llama_clex.py, flash-attention path) scales
    queries by ln(kv_seq_len) / ln(max_position_embeddings) *without* clamping, so
    sequences shorter than L get a factor below 1 (a clamped variant is present there
    only as a commented-out line). That is the default here; ``min_one=True`` gives
    max(1, ln S / ln L) instead.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if original_len < 2:
        raise ValueError(f"original_len must be >= 2, got {original_len}")
    scale = math.log(seq_len) / math.log(original_len)
    return max(1.0, scale) if min_one else scale


def clex_log_scale_tensor(
    seq_lens: torch.Tensor, original_len: int, *, min_one: bool = False
) -> torch.Tensor:
    """Vectorized ``clex_log_scale`` (float32). Lengths < 1 are treated as 1."""
    if original_len < 2:
        raise ValueError(f"original_len must be >= 2, got {original_len}")
    s = seq_lens.to(torch.float64).clamp(min=1.0)
    scale = torch.log(s) / math.log(original_len)
    if min_one:
        scale = scale.clamp(min=1.0)
    return scale.to(torch.float32)
