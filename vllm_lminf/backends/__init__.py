"""The plugin's attention backends, one file per cache layout (as vLLM's
v1/attention/backends/): `absolute.py` (CPU fast path) and `raw.py` (raw keys: CLEX,
CUDA, everything else); `common.py` holds what both share.

Names registered in vLLM's AttentionBackendEnum -> class paths, imported lazily by vLLM
(registration must not import the backends: it runs in every process)."""

ABSOLUTE = "LMINF_ABSOLUTE"
ABSOLUTE_CLEX = "LMINF_ABSOLUTE_CLEX"
RAW = "LMINF_RAW"
REGISTERED = {
    ABSOLUTE: "vllm_lminf.backends.absolute.AbsoluteBackend",
    ABSOLUTE_CLEX: "vllm_lminf.backends.absolute.AbsoluteClexBackend",
    RAW: "vllm_lminf.backends.raw.RawBackend",
}
