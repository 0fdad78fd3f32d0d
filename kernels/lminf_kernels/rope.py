"""Rotary position embedding at arbitrary per-row distances.

The raw-key paths rotate at small relative positions (bounded by the local window plus
the query tile, or by the distance limit); the absolute path rotates at each token's
absolute position with angles taken in float64 (`absolute_cos_sin`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeStyle:
    """How a model rotates: the first `rotary_dim` channels of each head, in
    neox (two halves) or GPT-J (interleaved pairs) layout."""

    rotary_dim: int
    neox: bool = True

    def __post_init__(self) -> None:
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even integer, got {self.rotary_dim}")


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of `positions[..., None] * inv_freq` in the dtype of `inv_freq`.

    `positions`: any integer or float tensor; `inv_freq`: [R/2], or broadcastable
    against `positions[..., None]` (per-sequence frequency tables).
    """
    angles = positions.to(inv_freq.dtype).unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def absolute_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin of positions * inv_freq with the product taken in float64 (exact at
    position 10^9 as at 10; a float32 angle table is not). For keys and queries rotated
    at their absolute position (the CPU fast path)."""
    c, s = cos_sin(positions, inv_freq.to(torch.float64))
    return c.to(torch.float32), s.to(torch.float32)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: RopeStyle) -> torch.Tensor:
    """Rotate the first `style.rotary_dim` channels of `x` ([..., D]).

    `cos`/`sin` are [..., R/2] and broadcast against x's leading dims (insert the
    head axis yourself). Channels past `rotary_dim` pass through (partial rotary).
    Returns a new tensor in the dtype of `cos`.
    """
    r = style.rotary_dim
    x = x.to(cos.dtype)
    rot, rest = x[..., :r], x[..., r:]
    if style.neox:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if rest.shape[-1] == 0:
        return out
    return torch.cat((out, rest), dim=-1)


_TABLES: dict[tuple[bytes, int], tuple[torch.Tensor, torch.Tensor]] = {}
_TABLE_ROUND = 1024
_TABLE_CACHE_SIZE = 16


def cos_sin_table(inv_freq: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of positions 0..n-1 times `inv_freq` ([R/2] float32), cached.

    Keyed by the frequencies' values (not the tensor's identity: CLEX rows are fresh
    tensors every step), so a hit is always the same table. Every layer of a step and
    every step with the same frequencies reuses it.
    """
    size = -(-n // _TABLE_ROUND) * _TABLE_ROUND
    key = (inv_freq.detach().cpu().numpy().tobytes(), size)
    hit = _TABLES.get(key)
    if hit is None:
        if len(_TABLES) >= _TABLE_CACHE_SIZE:
            _TABLES.pop(next(iter(_TABLES)))
        hit = cos_sin(torch.arange(size, device=inv_freq.device), inv_freq)
        _TABLES[key] = hit
    return hit[0][:n], hit[1][:n]
