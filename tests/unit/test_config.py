"""The `lm_infinite` key and start-up checks (no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_lminf.config import parse_lm_infinite
from lminf_kernels.pattern import UNBOUNDED
from vllm_lminf.max_len import allowed_max_len


def cfg(lminf=..., **kw):
    base = dict(max_position_embeddings=4096, architectures=["LlamaForCausalLM"], num_hidden_layers=30)
    base.update(kw)
    if lminf is not ...:
        base["lm_infinite"] = lminf
    return SimpleNamespace(**base)


def test_absent_means_off():
    assert parse_lm_infinite(cfg()) is None
    assert allowed_max_len(cfg()) is None


def test_defaults_follow_the_trained_length():
    c = parse_lm_infinite(cfg({}))
    assert (c.n_global, c.n_local, c.distance_limit, c.free_middle_blocks) == (10, 4096, 4096, True)
    assert parse_lm_infinite(cfg(True)) == c


@pytest.mark.parametrize(
    "value,message",
    [
        ({"n_global": -1}, "lm_infinite.n_global must be an integer >= 0, got -1"),
        ({"n_local": 0}, "lm_infinite.n_local must be an integer >= 1, got 0"),
        ({"n_local": 3.5}, "lm_infinite.n_local must be an integer >= 1, got 3.5"),
        ({"distance_limit": True}, "lm_infinite.distance_limit must be an integer >= 1, got True"),
        ({"window": 5}, "unknown key(s) ['window']; allowed keys:"),
        ({"free_middle_blocks": "yes"}, "lm_infinite.free_middle_blocks must be true or false"),
        ([1, 2], "lm_infinite must be a mapping"),
        ({"n_local": 5000}, "n_local=5000 exceeds the trained length max_position_embeddings=4096"),
        ({"distance_limit": 8192}, "allow_untrained_distance=true"),
    ],
)
def test_bad_values_name_the_field(value, message):
    with pytest.raises(ValueError) as err:
        parse_lm_infinite(cfg(value))
    assert message in str(err.value)


@pytest.mark.parametrize(
    "value,message",
    [
        ({"top_k": 0}, "lm_infinite.top_k must be an integer >= 1, got 0"),
        ({"top_k": 2.5}, "lm_infinite.top_k must be an integer >= 1, got 2.5"),
        ({"top_k": True}, "lm_infinite.top_k must be an integer >= 1, got True"),
        ({"top_k": 5, "top_k_from_layer": 10, "top_k_to_layer": 10}, "top_k_from_layer=10 must be < top_k_to_layer=10"),
        ({"top_k": 5, "top_k_from_layer": 30}, "top_k_from_layer=30 is past the model's last layer (29)"),
        ({"top_k": 5, "top_k_to_layer": 31}, "top_k_to_layer=31 is past the model's layer count 30"),
        ({"top_k": 5, "top_k_distance": 5000}, "top_k_distance=5000 exceeds the trained length"),
        ({"top_k": 5, "top_k_rows": "first"}, "lm_infinite.top_k_rows must be one of ['last', 'all'], got 'first'"),
        ({"top_k_rows": "all"}, "['top_k_rows'] only apply with lm_infinite.top_k"),
        ({"top_k": 5, "top_k_blocks": 2}, "set either top_k (exact: k middle keys) or top_k_blocks"),
        ({"top_k_blocks": 0}, "lm_infinite.top_k_blocks must be an integer >= 1, got 0"),
    ],
)
def test_bad_top_k_values_name_the_field(value, message):
    with pytest.raises(ValueError) as err:
        parse_lm_infinite(cfg(value))
    assert message in str(err.value)


def test_top_k_defaults_follow_the_reference():
    top_k = parse_lm_infinite(cfg({"top_k": 5})).top_k
    assert (top_k.k, top_k.from_layer, top_k.to_layer, top_k.distance, top_k.rows) == (5, 4, 30, 2048, "last")
    assert [i for i in range(30) if top_k.covers(i)] == list(range(4, 30))
    far = parse_lm_infinite(cfg({"top_k": 5, "top_k_distance": 5000, "allow_untrained_distance": True}))
    assert far.top_k.distance == 5000


def test_block_mode_settings_and_its_start_up_check():
    from vllm_lminf.backends.common import group_top_k

    top_k = parse_lm_infinite(cfg({"top_k_blocks": 4, "top_k_rows": "all"})).top_k
    assert (top_k.k, top_k.blocks, top_k.rows) == (4, True, "all")
    layers = [SimpleNamespace(top_k=None), SimpleNamespace(top_k=top_k)]
    assert group_top_k(layers, block_size=128, n_local=4096) is top_k
    with pytest.raises(ValueError, match=r"top_k_blocks needs n_local >= the KV block size \(128\), got n_local=64"):
        group_top_k(layers, block_size=128, n_local=64)


def test_untrained_distance_needs_opt_in():
    c = parse_lm_infinite(cfg({"n_local": 8192, "distance_limit": 9000, "allow_untrained_distance": True}))
    assert (c.n_local, c.distance_limit) == (8192, 9000)


def test_unsupported_architecture_is_refused_listing_supported():
    with pytest.raises(ValueError) as err:
        allowed_max_len(cfg({}, architectures=["GPT2LMHeadModel"]))
    assert "GPT2LMHeadModel" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_lm_infinite_lifts_the_length_cap():
    assert allowed_max_len(cfg({})) == UNBOUNDED


def test_register_is_reentrant_and_checks_the_version(monkeypatch):
    import vllm

    from vllm_lminf import register
    from vllm_lminf.registration import check_vllm_version

    register()
    register()
    monkeypatch.setattr(vllm, "__version__", "0.40.1")
    with pytest.raises(RuntimeError, match="supports vLLM 0.32.x only"):
        check_vllm_version()
