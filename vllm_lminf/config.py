"""The `lm_infinite` model-config key: parsing and validation.

Enabled by a dict in config.json, or `hf_overrides={"lm_infinite": {...}}` /
`--hf-overrides '{"lm_infinite": {...}}'`:

    n_global         tokens at the start every query sees        (default 10)
    n_local          length of the local window                  (default L)
    distance_limit   rotary distance of the global tokens        (default L)
    allow_untrained_distance  permit n_local or distance_limit > L (default false)
    free_middle_blocks        return KV blocks nobody reads again to the pool (default true)

Top-k middle attention (LM-Infinite's retrieval variant; off unless `top_k` is set):
    top_k            middle keys each query row also attends, per query head  (int >= 1)
    top_k_from_layer first layer that uses it                     (default 4, as the reference)
    top_k_to_layer   layers from <= i < to use it                 (default: the layer count)
    top_k_distance   rotary distance the middle keys are scored and seen at (default d // 2)
    top_k_rows       "last": the last prompt row and every generated row (the reference);
                     "all": every row (prompt logprobs, perplexity)          (default "last")
    top_k_blocks     block mode instead of `top_k`: attend the middle tokens of the K KV blocks
                     with the best logit bound (per-block key min/max)       (int >= 1)
Top-k layers keep their whole KV (their middle is read); the other layers keep freeing it.

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
_TOP_K_FIELDS = ("top_k", "top_k_blocks", "top_k_from_layer", "top_k_to_layer", "top_k_distance", "top_k_rows")
TOP_K_ROWS = ("last", "all")
DEFAULT_TOP_K_FROM_LAYER = 4


@dataclass(frozen=True)
class TopKConfig:
    """Which layers and rows attend the `k` best middle keys, and at what rotary distance."""

    k: int
    from_layer: int
    to_layer: int
    distance: int
    rows: str  # "last" | "all"
    blocks: bool = False  # block mode: k counts KV blocks (`top_k_blocks`)

    def covers(self, layer: int) -> bool:
        return self.from_layer <= layer < self.to_layer


@dataclass(frozen=True)
class LMInfiniteConfig:
    n_global: int
    n_local: int
    distance_limit: int
    trained_length: int
    allow_untrained_distance: bool = False
    free_middle_blocks: bool = True
    top_k: TopKConfig | None = None

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
    allowed = set(_INT_FIELDS) | set(_BOOL_FIELDS) | set(_TOP_K_FIELDS)
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
    top_k = _parse_top_k(raw, hf_config, values["distance_limit"], length,
                         values.get("allow_untrained_distance", False))
    cfg = LMInfiniteConfig(trained_length=length, top_k=top_k, **values)
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


def _layer_count(hf_config: Any) -> int:
    text = hf_config.get_text_config() if callable(getattr(hf_config, "get_text_config", None)) else hf_config
    count = getattr(text, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"{CONFIG_KEY}.top_k needs config.num_hidden_layers (a positive integer), got {count!r}")
    return count


def _parse_top_k(raw: dict, hf_config: Any, distance_limit: int, length: int,
                 allow_untrained: bool) -> TopKConfig | None:
    if "top_k" in raw and "top_k_blocks" in raw:
        raise ValueError(f"{CONFIG_KEY}: set either top_k (exact: k middle keys) or top_k_blocks (block mode: "
                         "k middle blocks), not both")
    if "top_k" not in raw and "top_k_blocks" not in raw:
        given = sorted(set(raw) & set(_TOP_K_FIELDS))
        if given:
            raise ValueError(f"{CONFIG_KEY}: {given} only apply with {CONFIG_KEY}.top_k or top_k_blocks "
                             "(an integer >= 1) set")
        return None
    blocks = "top_k_blocks" in raw

    def integer(name: str, lo: int, default: int) -> int:
        val = raw.get(name, default)
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ValueError(f"{CONFIG_KEY}.{name} must be an integer >= {lo}, got {val!r}")
        return val

    layers = _layer_count(hf_config)
    k = integer("top_k_blocks" if blocks else "top_k", 1, 0)
    from_layer = integer("top_k_from_layer", 0, DEFAULT_TOP_K_FROM_LAYER)
    to_layer = integer("top_k_to_layer", 1, layers)
    if from_layer >= layers:
        raise ValueError(f"{CONFIG_KEY}.top_k_from_layer={from_layer} is past the model's last layer "
                         f"({layers - 1}); use a value in [0, {layers - 1}]")
    if to_layer > layers:
        raise ValueError(f"{CONFIG_KEY}.top_k_to_layer={to_layer} is past the model's layer count {layers}; "
                         f"use a value in [{from_layer + 1}, {layers}]")
    if from_layer >= to_layer:
        raise ValueError(f"{CONFIG_KEY}.top_k_from_layer={from_layer} must be < top_k_to_layer={to_layer} "
                         "(layers from <= i < to use top-k)")
    distance = integer("top_k_distance", 1, max(1, distance_limit // 2))
    if distance > length and not allow_untrained:
        raise ValueError(
            f"{CONFIG_KEY}.top_k_distance={distance} exceeds the trained length max_position_embeddings={length}; "
            f"use a value in [1, {length}], or set {CONFIG_KEY}.allow_untrained_distance=true to accept it.")
    rows = raw.get("top_k_rows", "last")
    if rows not in TOP_K_ROWS:
        raise ValueError(f"{CONFIG_KEY}.top_k_rows must be one of {list(TOP_K_ROWS)}, got {rows!r}")
    return TopKConfig(k=k, from_layer=from_layer, to_layer=to_layer, distance=distance, rows=rows, blocks=blocks)
