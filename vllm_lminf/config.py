"""The `lm_infinite` model-config key: parsing and validation.

Enabled by a dict in config.json, or `hf_overrides={"lm_infinite": {...}}` /
`--hf-overrides '{"lm_infinite": {...}}'`:

    n_global         tokens at the start every query sees        (default 10)
    n_local          length of the local window                  (default L)
    distance_limit   rotary distance of the global tokens        (default L)
    allow_untrained_distance  permit n_local or distance_limit > L (default false)
    free_middle_blocks        return KV blocks nobody reads again to the pool (default true)

L is the checkpoint's trained length (`max_position_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lminf_kernels.pattern import LambdaPattern

# architecture -> the plugin's override class in vllm_lminf.models
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "LMInfLlamaForCausalLM",
    "MistralForCausalLM": "LMInfMistralForCausalLM",
    "Qwen2ForCausalLM": "LMInfQwen2ForCausalLM",
    "Qwen3ForCausalLM": "LMInfQwen3ForCausalLM",
    "MixtralForCausalLM": "LMInfMixtralForCausalLM",
    "PhiForCausalLM": "LMInfPhiForCausalLM",
    "GPTNeoXForCausalLM": "LMInfGPTNeoXForCausalLM",
}

CONFIG_KEY = "lm_infinite"
DEFAULT_N_GLOBAL = 10
_INT_FIELDS = {"n_global": 0, "n_local": 1, "distance_limit": 1}
_BOOL_FIELDS = ("allow_untrained_distance", "free_middle_blocks")


@dataclass(frozen=True)
class LMInfiniteConfig:
    n_global: int
    n_local: int
    distance_limit: int
    trained_length: int
    allow_untrained_distance: bool = False
    free_middle_blocks: bool = True

    @property
    def pattern(self) -> LambdaPattern:
        return LambdaPattern(self.n_global, self.n_local, self.distance_limit)


def trained_length(hf_config: Any) -> int:
    length = getattr(hf_config, "max_position_embeddings", None)
    if not isinstance(length, int) or length < 1:
        raise ValueError(
            "lm_infinite needs the checkpoint's trained length: config.max_position_embeddings "
            f"must be a positive integer, got {length!r}"
        )
    return length


def _raw_settings(hf_config: Any) -> Any:
    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None:
        text = getattr(hf_config, "get_text_config", None)
        if callable(text):
            raw = getattr(text(), CONFIG_KEY, None)
    return raw


def parse_lm_infinite(hf_config: Any) -> LMInfiniteConfig | None:
    """The validated settings, or None when the key is absent (plugin features off).

    Raises ValueError naming the offending field and the allowed values.
    """
    raw = _raw_settings(hf_config)
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{CONFIG_KEY} must be a mapping (or true for the defaults), got {raw!r}")
    allowed = set(_INT_FIELDS) | set(_BOOL_FIELDS)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"{CONFIG_KEY}: unknown key(s) {unknown}; allowed keys: {sorted(allowed)}")
    length = trained_length(hf_config)
    values: dict[str, Any] = {"n_global": DEFAULT_N_GLOBAL, "n_local": length, "distance_limit": length}
    for name, lo in _INT_FIELDS.items():
        if name in raw:
            val = raw[name]
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{CONFIG_KEY}.{name} must be an integer >= {lo}, got {val!r}")
            values[name] = val
    for name in _BOOL_FIELDS:
        if name in raw:
            if not isinstance(raw[name], bool):
                raise ValueError(f"{CONFIG_KEY}.{name} must be true or false, got {raw[name]!r}")
            values[name] = raw[name]
    cfg = LMInfiniteConfig(trained_length=length, **values)
    if not cfg.allow_untrained_distance:
        for name in ("n_local", "distance_limit"):
            if getattr(cfg, name) > length:
                raise ValueError(
                    f"{CONFIG_KEY}.{name}={getattr(cfg, name)} exceeds the trained length "
                    f"max_position_embeddings={length}: the model never saw rotary distances "
                    f"that large. Use a value in [1, {length}], or set "
                    f"{CONFIG_KEY}.allow_untrained_distance=true to accept it."
                )
    return cfg
