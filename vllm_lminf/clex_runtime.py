"""CLEX inside vLLM: config detection, weight capture, per-step frequency choice.

The ODE is solved once after the weights load (`vllm_lminf.clex`); each engine step
then picks, per sequence, the row for t = min(ceil(S / L), max_factor), S being the
sequence's length at the end of the step. Because the cache holds raw keys, every
key the step attends is rotated with that row, which is what the reference does
by re-rotating its whole cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

from .clex import (
    CLEX_WEIGHT_NAMES,
    ClexConfig,
    clex_config_from_hf_config,
    clex_log_scale_tensor,
    clex_scale_index_tensor,
    find_clex_rope_dict,
    solve_clex_frequencies,
)


def _rope_theta(hf_config) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    params = getattr(hf_config, "rope_parameters", None)
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    if theta is None:
        raise ValueError("CLEX needs rope_theta in the model config")
    return float(theta)


@contextlib.contextmanager
def plain_rope_during_init(hf_config) -> Iterator[None]:
    """vLLM's get_rope rejects the 'clex' type: let the stock constructor build a
    plain RoPE module (used only for its rotary dim and style), then restore.
    transformers 5 may alias rope_scaling and rope_parameters; handle both."""
    clex = find_clex_rope_dict(hf_config)
    if clex is None:
        yield
        return
    saved = {a: getattr(hf_config, a, None) for a in ("rope_parameters", "rope_scaling")}
    plain = {k: v for k, v in clex.items() if k in ("rope_theta", "partial_rotary_factor")}
    plain.setdefault("rope_theta", _rope_theta(hf_config))
    if "partial_rotary_factor" not in plain:  # Phi / GPT-NeoX configs may keep it top level
        for name in ("partial_rotary_factor", "rotary_pct"):
            if getattr(hf_config, name, None) is not None:
                plain["partial_rotary_factor"] = float(getattr(hf_config, name))
                break
    plain["rope_type"] = "default"
    hf_config.rope_parameters = plain
    if find_clex_rope_dict(hf_config) is not None:
        hf_config.rope_scaling = dict(plain)
    try:
        yield
    finally:
        for attr, value in saved.items():
            if value is not None:
                setattr(hf_config, attr, value)


class ClexFrequencies:
    """Holds the solved frequency table [max_factor, R/2] and serves per-step rows."""

    def __init__(self, cfg: ClexConfig, *, original_len: int, base: float) -> None:
        self.cfg = cfg
        self.original_len = original_len
        self.base = base
        self.table: torch.Tensor | None = None
        self.rotary_dim: int | None = None  # the model's, set while its attention is installed

    # -- loading -----------------------------------------------------------------
    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        load_rest: Callable[[Iterable[tuple[str, torch.Tensor]]], set[str]],
    ) -> set[str]:
        captured: dict[str, torch.Tensor] = {}

        def others():
            for name, tensor in weights:
                if name in CLEX_WEIGHT_NAMES:
                    captured[name] = tensor.detach().to(torch.float32).clone()
                else:
                    yield name, tensor

        loaded = load_rest(others())
        missing = [n for n in CLEX_WEIGHT_NAMES if n not in captured]
        if missing:
            raise ValueError(
                f"the config asks for CLEX rope scaling but the checkpoint lacks {missing}"
            )
        inv_freq, up, down = (captured[n] for n in CLEX_WEIGHT_NAMES)
        if self.rotary_dim is not None and 2 * inv_freq.numel() != self.rotary_dim:
            raise ValueError(
                f"{CLEX_WEIGHT_NAMES[0]} has {inv_freq.numel()} entries but the model's rotary dim is "
                f"{self.rotary_dim} (it needs rotary_dim / 2 = {self.rotary_dim // 2}): the CLEX tensors "
                "do not belong to this model"
            )
        self.table = solve_clex_frequencies(
            inv_freq, up, down, base=self.base, rotary_dim=2 * inv_freq.numel(), cfg=self.cfg
        ).to(torch.float32)
        return loaded

    def check_rotary_dim(self, rotary_dim: int) -> None:
        """Record the model's rotary dim (every layer must agree); the CLEX tensors are
        checked against it when the weights load."""
        if self.rotary_dim is not None and self.rotary_dim != rotary_dim:
            raise ValueError(f"CLEX needs one rotary dim for every layer, got {self.rotary_dim} and {rotary_dim}")
        self.rotary_dim = rotary_dim

    # -- per step ----------------------------------------------------------------
    def _seq_lens(self, metadata) -> torch.Tensor:
        return torch.tensor(metadata.seq_lens, dtype=torch.int64)

    def scale_index(self, metadata) -> torch.Tensor:
        """t per sequence of this step (1-based)."""
        return clex_scale_index_tensor(self._seq_lens(metadata), self.original_len, self.cfg.max_factor)

    def frequencies(self, metadata) -> torch.Tensor:
        cached = metadata.step_cache.get("clex_freq")
        if cached is None:
            if self.table is None:
                raise RuntimeError("CLEX frequencies used before the weights were loaded")
            cached = self.table[self.scale_index(metadata) - 1]
            metadata.step_cache["clex_freq"] = cached
        return cached

    def query_scale(self, metadata) -> list[float] | None:
        if not self.cfg.log_scale:
            return None
        cached = metadata.step_cache.get("clex_qscale")
        if cached is None:
            cached = clex_log_scale_tensor(self._seq_lens(metadata), self.original_len).tolist()
            metadata.step_cache["clex_qscale"] = cached
        return cached


def build_clex(hf_config) -> ClexFrequencies | None:
    cfg = clex_config_from_hf_config(hf_config)
    if cfg is None:
        return None
    return ClexFrequencies(cfg, original_len=int(hf_config.max_position_embeddings), base=_rope_theta(hf_config))
