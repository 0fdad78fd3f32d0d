"""KV-cache policy for Λ attention layers."""

from __future__ import annotations

from vllm.model_executor.layers.attention import Attention


def spec_factory(lminf):
    """Function (layer, vllm_config) -> KVCacheSpec for the plugin's layers."""

    def stock_spec(layer, vllm_config):
        return Attention.get_kv_cache_spec(layer, vllm_config)

    return stock_spec


def register_kv_policy() -> None:
    pass
