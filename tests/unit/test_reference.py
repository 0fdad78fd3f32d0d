"""Validate the float64 reference forward in tests/helpers/reference.py (one reference for
every family): against transformers' own forward, and against the formula written out."""

from __future__ import annotations

import math
import random

import pytest
import torch

from helpers.families import FAMILIES, hf_logprobs, make_family_checkpoint
from helpers.reference import (
    Reference,
    causal_delta,
    default_inv_freq,
    lm_infinite_delta,
    pairwise_logits,
    step_delta,
)
from helpers.tiny_checkpoint import make_tiny_llama


def _ids(n: int, vocab: int, seed: int, k: int = 0) -> list[int]:
    """Random token ids; `seed` is the test's (conftest), `k` tells draws within a test apart."""
    g = torch.Generator().manual_seed(seed * 1000 + k)
    return [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=0)


@pytest.fixture(scope="module")
def ref(ckpt):
    return Reference(ckpt)


# --------------------------------------------------------------------------
# HF transformers in float64 (patched to stay in float64 throughout)
# --------------------------------------------------------------------------
def _hf_logprobs(ckpt, ids: list[int], monkeypatch) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama as ml

    # Stock HF upcasts/downcasts RMSNorm and RoPE through float32; keep the
    # same math but in float64 so a 1e-9 comparison is meaningful.
    def rms_forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    def rope_forward(self, x, position_ids):
        cfg = self.config
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv = default_inv_freq(dim, float(cfg.rope_parameters["rope_theta"]))
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    monkeypatch.setattr(ml.LlamaRMSNorm, "forward", rms_forward)
    monkeypatch.setattr(ml.LlamaRotaryEmbedding, "forward", rope_forward)
    # "sdpa" rather than "eager": eager computes its softmax in float32.
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64, attn_implementation="sdpa")
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(out.to(torch.float64), -1)


def test_matches_hf_transformers(ckpt, monkeypatch, seed):
    ids = _ids(40, 384, seed, 1)
    ref = Reference(ckpt)
    ours = ref.logprobs(ids)
    theirs = _hf_logprobs(ckpt, ids, monkeypatch)
    assert ours.shape == (40, ref.vocab)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_heads=4, num_kv_heads=1, tie_word_embeddings=True),
        dict(hidden_size=96, num_heads=6, num_kv_heads=3, head_dim=8, tie_word_embeddings=False),
        dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=True, extra_config={"attention_bias": True}),
    ],
)
def test_gqa_tied_bias_match_hf(tmp_path, monkeypatch, kw, seed):
    ckpt = make_tiny_llama(tmp_path, seed=3, **kw)
    ids = _ids(24, 384, seed, 2)
    ours = Reference(ckpt).logprobs(ids)
    theirs = _hf_logprobs(ckpt, ids, monkeypatch)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-9)


def test_linear_rope_scaling_matches_hf(tmp_path, monkeypatch, seed):
    ckpt = make_tiny_llama(tmp_path, extra_config={"rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    ids = _ids(20, 384, seed, 4)
    ref = Reference(ckpt)
    ours = ref.logprobs(ids)
    # Linear scaling == frequencies divided by the factor.
    base = Reference(ckpt)
    base.rope_scaling = None
    alt = base.logprobs(ids, inv_freq_for_len=lambda S: default_inv_freq(ref.rotary_dim, 10000.0) / 4.0)
    torch.testing.assert_close(ours, alt, rtol=0, atol=1e-12)
    # Not equal to the unscaled model.
    assert (ours - base.logprobs(ids)).abs().max() > 1e-4

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64, attn_implementation="sdpa").eval()
    with torch.no_grad():
        hf = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    # Stock HF RoPE runs in float32, so only a loose comparison here.
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-4)


def test_unsupported_scaling_raises(tmp_path):
    ckpt = make_tiny_llama(tmp_path, extra_config={"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    ref = Reference(ckpt)
    with pytest.raises(NotImplementedError):
        ref.logprobs([1, 5, 6])
    # Explicit frequencies bypass the config's scaling.
    ref.logprobs([1, 5, 6], inv_freq_for_len=lambda S: default_inv_freq(ref.rotary_dim, 10000.0))


# --------------------------------------------------------------------------
# LM-Infinite semantics
# --------------------------------------------------------------------------
def test_lm_infinite_wide_window_is_causal(ref, seed):
    ids = _ids(30, ref.vocab, seed, 5)
    plain = ref.logprobs(ids)
    for G, W, d in [(0, 30, 5), (4, 30, 2), (2, 100, 1000)]:
        torch.testing.assert_close(ref.logprobs(ids, lm_infinite=(G, W, d)), plain, rtol=0, atol=1e-12)


def test_lm_infinite_changes_output(ref, seed):
    ids = _ids(30, ref.vocab, seed, 6)
    plain = ref.logprobs(ids)
    lmi = ref.logprobs(ids, lm_infinite=(2, 6, 6))
    # Positions whose window still covers everything are unchanged ...
    torch.testing.assert_close(lmi[:6], plain[:6], rtol=0, atol=1e-12)
    # ... later ones differ.
    assert (lmi[8:] - plain[8:]).abs().max() > 1e-3


def test_delta_matrices():
    d = lm_infinite_delta(8, 2, 3, 9.0)
    assert d[0, 0] == 0 and math.isnan(d[0, 1])
    assert d[5, 5] == 0 and d[5, 4] == 1 and d[5, 3] == 2
    assert math.isnan(d[5, 2])  # not local (5-3 < 2 is false) and not global
    assert d[5, 0] == 9 and d[5, 1] == 9
    assert d[2, 0] == 2 and d[2, 1] == 1  # local wins over global
    assert d[3, 0] == 9 and d[3, 1] == 2
    c = causal_delta(4)
    assert c[3, 0] == 3 and math.isnan(c[0, 3])


def _explicit_rotate(vec: torch.Tensor, delta: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate one vector by ``delta`` positions, pair by pair, without tricks."""
    half = inv_freq.numel()
    out = vec.clone()
    for i in range(half):
        phi = delta * float(inv_freq[i])
        a, b = float(vec[i]), float(vec[i + half])
        out[i] = a * math.cos(phi) - b * math.sin(phi)
        out[i + half] = b * math.cos(phi) + a * math.sin(phi)
    return out


def test_step_delta_rows_are_the_whole_sequence_rows():
    """Queries at the end of a sequence (a decode step, a prefill chunk) see the rows of
    the whole sequence's matrix."""
    for lmi in (None, (2, 3, 9.0), (0, 1, 1.0)):
        full = causal_delta(10) if lmi is None else lm_infinite_delta(10, *lmi)
        part = step_delta(torch.arange(6, 10), 10, lmi)
        assert torch.equal(torch.isnan(part), torch.isnan(full[6:]))
        assert torch.equal(torch.nan_to_num(part), torch.nan_to_num(full[6:]))


def test_pairwise_identity_against_explicit_rotation(seed):
    g = torch.Generator().manual_seed(seed)
    H, T, D = 2, 9, 12
    q = torch.randn(H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(H, T, D, generator=g, dtype=torch.float64)
    inv = default_inv_freq(8, 100.0)  # partial rotary: 8 of 12 dims
    delta = torch.randint(-5, 20, (T, T), generator=g).to(torch.float64)
    delta[0, 3] = math.nan
    got = pairwise_logits(q, k, delta, inv, chunk_elems=50)  # force chunking
    for h in range(H):
        for p in range(T):
            for j in range(T):
                if math.isnan(delta[p, j]):
                    assert got[h, p, j] == -math.inf
                    continue
                want = float(_explicit_rotate(q[h, p], float(delta[p, j]), inv) @ k[h, j])
                assert abs(float(got[h, p, j]) - want) < 1e-12
    # Relative rotation identity <R(m)q, R(n)k> = <R(m-n)q, k>.
    m, n = 13.0, 4.0
    lhs = _explicit_rotate(q[0, 0], m, inv) @ _explicit_rotate(k[0, 0], n, inv)
    rhs = _explicit_rotate(q[0, 0], m - n, inv) @ k[0, 0]
    assert abs(float(lhs - rhs)) < 1e-12


def _brute_force_logprobs(ckpt, ids: list[int], G: int, W: int, dist: float) -> torch.Tensor:
    """Whole Llama forward from the checkpoint's files (config.json, safetensors), written
    out by hand, with attention as a python double loop."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((ckpt / "config.json").read_text())
    w = {k: v.double() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    T = len(ids)
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    inv = default_inv_freq(D, cfg["rope_theta"])
    eps = cfg["rms_norm_eps"]
    lm_head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]

    def rms(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[name]

    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    for layer in range(cfg["num_hidden_layers"]):
        p_ = f"model.layers.{layer}."
        h = rms(x, p_ + "input_layernorm.weight")
        q = (h @ w[p_ + "self_attn.q_proj.weight"].T).view(T, H, D)
        k = (h @ w[p_ + "self_attn.k_proj.weight"].T).view(T, KV, D)
        v = (h @ w[p_ + "self_attn.v_proj.weight"].T).view(T, KV, D)
        o = torch.zeros(T, H, D, dtype=torch.float64)
        for hh in range(H):
            kvh = hh // (H // KV)
            for p in range(T):
                keys, scores = [], []
                for j in range(p + 1):
                    if p - W < j:
                        dl = p - j
                    elif j < G:
                        dl = dist
                    else:
                        continue
                    keys.append(j)
                    scores.append(float(_explicit_rotate(q[p, hh], dl, inv) @ k[j, kvh]) / math.sqrt(D))
                s = torch.tensor(scores, dtype=torch.float64)
                pr = torch.softmax(s, 0)
                o[p, hh] = sum(pr[n] * v[j, kvh] for n, j in enumerate(keys))
        x = x + o.reshape(T, H * D) @ w[p_ + "self_attn.o_proj.weight"].T
        h = rms(x, p_ + "post_attention_layernorm.weight")
        g = h @ w[p_ + "mlp.gate_proj.weight"].T
        u = h @ w[p_ + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ w[p_ + "mlp.down_proj.weight"].T
    x = rms(x, "model.norm.weight")
    return torch.log_softmax(x @ lm_head.T, -1)


def test_lm_infinite_brute_force(ckpt, ref, seed):
    ids = _ids(12, ref.vocab, seed, 8)
    want = _brute_force_logprobs(ckpt, ids, G=2, W=4, dist=4.0)
    got = ref.logprobs(ids, lm_infinite=(2, 4, 4))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_families_match_transformers_forward(family, tmp_path, seed):
    """Per family, the reference (unrotated q/k, literal pairwise attention, float64 norms
    and router) equals transformers' own float64 forward (its rotary module, eager
    attention); transformers computes its rotary angles and some norms in float32, hence
    the tolerance. LM-Infinite with a window covering the whole sequence is causal."""
    path = make_family_checkpoint(family, tmp_path / family, max_position_embeddings=64, seed=11)
    ref = Reference(path)
    ids = _ids(50, ref.vocab, seed, 12)
    ours = ref.logprobs(ids)
    torch.testing.assert_close(ours, hf_logprobs(path, ids, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(ref.logprobs(ids, lm_infinite=(3, 50, 7)), ours, rtol=0, atol=1e-12)
    assert (ref.logprobs(ids, lm_infinite=(3, 8, 8)) - ours).abs().max() > 1e-3


# --------------------------------------------------------------------------
# CLEX-style hooks and generation
# --------------------------------------------------------------------------
def test_length_callables_and_greedy(ref, seed):
    ids = _ids(10, ref.vocab, seed, 10)
    seen = []

    def inv_for_len(S):
        seen.append(S)
        return default_inv_freq(ref.rotary_dim, 10000.0) * (1.0 + 0.01 * S)

    lp = ref.logprobs(ids, inv_freq_for_len=inv_for_len, query_scale_for_len=lambda S: 1.5)
    assert seen == [10]
    assert (lp - ref.logprobs(ids)).abs().max() > 1e-4

    # Query scale 1 and config frequencies == default path.
    torch.testing.assert_close(
        ref.logprobs(ids, inv_freq_for_len=lambda S: ref.config_inv_freq(), query_scale_for_len=lambda S: 1.0),
        ref.logprobs(ids),
        rtol=0,
        atol=0,
    )

    seen.clear()
    new = ref.greedy_generate(ids, 4, inv_freq_for_len=inv_for_len)
    assert seen == [10, 11, 12, 13] and len(new) == 4
    plain_new = ref.greedy_generate(ids, 3)
    # Greedy equals argmax of the teacher-forced logprobs over the result.
    lp_all = ref.logprobs(ids + plain_new)
    assert [int(lp_all[t].argmax()) for t in range(9, 12)] == plain_new


def test_tokenizer_roundtrip(ckpt):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    assert len(tok) <= 512 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    text = "The quick brown fox, naïve café 漢字 🙂 and <weird> ~~symbols~~!"
    enc = tok(text)["input_ids"]
    assert enc[0] == tok.bos_token_id and tok.unk_token_id not in enc
    assert tok.decode(enc, skip_special_tokens=True) == text


def test_incremental_equals_full_recompute_when_nothing_depends_on_the_step(tmp_path, seed):
    """With fixed frequencies and no query scale, generating step by step from a cache
    of raw keys is the same computation as re-running the whole sequence."""
    path = make_tiny_llama(tmp_path / "m", max_position_embeddings=64, seed=11)
    ref = Reference(path)
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 300) for _ in range(40)]
    new = [rng.randrange(3, 300) for _ in range(6)]
    for lminf in (None, (2, 8, 8)):
        inc = ref.incremental_logprobs(prompt, new, lm_infinite=lminf)
        seq = prompt + new
        full = torch.stack([ref.logprobs(seq[:S], lm_infinite=lminf)[-1, seq[S]] for S in range(40, 46)])
        assert (inc - full).abs().max().item() < 1e-10


def test_incremental_uses_each_step_frequencies(tmp_path, seed):
    """CLEX semantics: the first generated token comes from the prompt's own step (a full
    forward at S = len(prompt)); later steps reuse raw keys computed at earlier steps, so
    with length-dependent frequencies they differ from a full recompute at their S."""
    path = make_tiny_llama(tmp_path / "m", max_position_embeddings=64, seed=11)
    ref = Reference(path)
    rng = random.Random(seed)
    ids = [rng.randrange(3, 300) for _ in range(12)]
    kw = dict(inv_freq_for_len=lambda S: ref.config_inv_freq() * (1 + 0.05 * S),
              query_scale_for_len=lambda S: 1 + S / 50)
    inc = ref.incremental_logprobs(ids[:8], ids[8:], **kw)
    full = torch.stack([ref.logprobs(ids[:S], **kw)[-1, ids[S]] for S in range(8, 12)])
    assert abs(inc[0].item() - full[0].item()) < 1e-10
    assert (inc - full)[1:].abs().min().item() > 1e-8
