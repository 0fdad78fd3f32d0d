"""The one max-length policy: how long a sequence the plugin lets vLLM hold.

  - plugin off (no lm_infinite, no CLEX): vLLM's own rule, untouched;
  - CLEX alone: L * max_factor (the reference's frequency table ends there);
  - LM-Infinite (with or without CLEX): unbounded (`UNBOUNDED`, which bounds int32
    positions in the kernels).
Runs in the front-end process through `vllm_compat.lift_max_len_cap`, so bad settings
stop the engine at start, before any worker exists.
"""

from __future__ import annotations

from lminf_kernels.pattern import UNBOUNDED

from .clex import clex_config_from_hf_config
from .config import SUPPORTED_ARCHITECTURES, parse_lm_infinite


def clex_cap(hf_config) -> int | None:
    """Longest sequence CLEX alone may serve (L * max_factor), or None without CLEX."""
    cfg = clex_config_from_hf_config(hf_config)
    if cfg is None:
        return None
    return int(hf_config.max_position_embeddings) * cfg.max_factor


def allowed_max_len(hf_config) -> int | None:
    """Largest max_model_len the plugin allows for this config, or None when the
    plugin's features are off. Raises ValueError for bad settings."""
    lminf = parse_lm_infinite(hf_config)
    cap = clex_cap(hf_config)
    if lminf is None and cap is None:
        return None
    archs = list(getattr(hf_config, "architectures", None) or [])
    unsupported = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if unsupported or not archs:
        raise ValueError(
            f"vllm-lminf does not support architecture(s) {unsupported or archs}; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    return UNBOUNDED if lminf is not None else cap
