"""vllm-lminf: LM-Infinite and CLEX for stock vLLM, loaded as a general plugin."""

__version__ = "0.1.0"


def register() -> None:
    """Entry point of `vllm.general_plugins` (runs in every vLLM process, maybe often)."""
    from .registration import register_all

    register_all()
