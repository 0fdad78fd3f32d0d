"""Start-up checks run in the front-end process, before any worker starts."""

from __future__ import annotations

from .config import parse_lm_infinite
from .registration import OVERRIDES

# LM-Infinite has no length limit of its own; this bounds int32 positions in vLLM.
UNBOUNDED_MAX_LEN = 1 << 30


def allowed_max_len(hf_config) -> int | None:
    """Largest max_model_len the plugin allows for this config, or None when the
    plugin's features are off. Raises ValueError for bad settings."""
    from .clex_runtime import clex_cap

    lminf = parse_lm_infinite(hf_config)
    cap = clex_cap(hf_config)
    if lminf is None and cap is None:
        return None
    archs = list(getattr(hf_config, "architectures", None) or [])
    unsupported = [a for a in archs if a not in OVERRIDES]
    if unsupported or not archs:
        raise ValueError(
            f"vllm-lminf does not support architecture(s) {unsupported or archs}; "
            f"supported: {sorted(OVERRIDES)}"
        )
    if lminf is not None:
        return UNBOUNDED_MAX_LEN
    return cap
