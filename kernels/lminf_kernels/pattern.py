"""The Λ pattern: which keys a query sees and at what rotary distance.

Query at position p sees
  - local keys   p - n_local < j <= p    at distance p - j,
  - global keys  j < n_global, j <= p - n_local   at distance `distance_limit`.
With n_local >= the sequence length this is ordinary causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# "No limit": longer than any sequence the plugin lets vLLM hold (max_model_len is capped
# here), and small enough for int32 position arithmetic in every kernel.
UNBOUNDED = 1 << 30


@dataclass(frozen=True)
class LambdaPattern:
    n_global: int
    n_local: int
    distance_limit: int

    def __post_init__(self) -> None:
        for name, lo in (("n_global", 0), ("n_local", 1), ("distance_limit", 1)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or not lo <= val <= UNBOUNDED:
                raise ValueError(f"{name} must be an integer in [{lo}, {UNBOUNDED}], got {val!r}")

    @classmethod
    def causal(cls) -> "LambdaPattern":
        """Plain causal attention (every earlier key at its true distance)."""
        return cls(n_global=0, n_local=UNBOUNDED, distance_limit=1)

    # Both bounds take an int or an integer tensor of positions (elementwise), so the
    # per-step plans and the scalar loops read the window from this one place.
    def local_start(self, p):
        """First key of the local window of query position p."""
        return _clip(p - self.n_local + 1, 0, None)

    def global_end(self, p):
        """Keys [0, global_end(p)) are seen through the global branch by query p."""
        return _clip(p - self.n_local + 1, 0, self.n_global)


def _clip(x, lo: int, hi: int | None):
    if isinstance(x, torch.Tensor):
        return x.clamp(min=lo, max=hi)
    return max(lo, x if hi is None else min(hi, x))
