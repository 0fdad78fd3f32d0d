"""Independent float64 dense forward of the Llama family (no vLLM code).

The attention logit between query position ``p`` and key position ``j`` is
computed literally as

    logit(p, j) = scale * < R(delta[p, j]) q_raw[p], k_raw[j] >

where ``q_raw``/``k_raw`` are the projections *before* any rotation,
``R(delta)`` is the RoPE rotation by ``delta`` positions and ``delta`` is a
dense [T, T] matrix of rotary distances (NaN = masked). For the neox / HF
"rotate halves" layout, frequency ``i`` pairs dims ``a = i`` and
``b = i + r/2`` and rotating by angle ``phi`` maps ``(a, b)`` to
``(a cos - b sin, b cos + a sin)``. Hence

    < R(delta) q, k > = sum_i (q_a k_a + q_b k_b) cos(delta w_i)
                              + (q_a k_b - q_b k_a) sin(delta w_i)
                        + sum over non-rotary dims of q k

which is what :func:`pairwise_logits` evaluates (in query-row chunks to bound
memory). For plain causal attention ``delta[p, j] = p - j``; for LM-Infinite
it is ``p - j`` on the local window and the distance limit on global keys.

A second, faster implementation (``impl="fast"``) uses
``<R(p)q, R(j)k> = <R(p-j)q, k>`` - standard RoPE for the local part and
``R(d) q_raw . k_raw`` for the global part - and must agree with the literal
one; the tests check that.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

F64 = torch.float64


# --------------------------------------------------------------------------
# RoPE helpers
# --------------------------------------------------------------------------
def default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """w_i = base^(-2i/r), i = 0 .. r/2-1, in float64."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=F64) / rotary_dim))


def rotate(x: torch.Tensor, angle_pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation of the first ``2*len(inv_freq)`` dims of ``x``.

    ``x``: [..., T, D]; ``angle_pos``: [T] positions (or distances), float.
    Remaining dims pass through unchanged.
    """
    half = inv_freq.numel()
    r = 2 * half
    ang = angle_pos.to(F64)[:, None] * inv_freq[None, :]  # [T, half]
    cos, sin = torch.cos(ang), torch.sin(ang)
    a, b, rest = x[..., :half], x[..., half:r], x[..., r:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def causal_delta(T: int) -> torch.Tensor:
    """delta[p, j] = p - j for j <= p, NaN (masked) otherwise."""
    p = torch.arange(T, dtype=F64)
    d = p[:, None] - p[None, :]
    return torch.where(d >= 0, d, torch.full_like(d, math.nan))


def lm_infinite_delta(T: int, n_global: int, n_local: int, dist: float) -> torch.Tensor:
    """LM-Infinite rotary distances (NaN = masked).

    Local keys ``p - W < j <= p`` use ``p - j``; global keys ``j < G`` with
    ``j <= p - W`` use ``dist``; all other keys are masked.
    """
    p = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    local = (j <= p) & (j > p - n_local)
    glob = (j < n_global) & (j <= p - n_local)
    delta = torch.full((T, T), math.nan, dtype=F64)
    delta = torch.where(local, (p - j).to(F64), delta)
    delta = torch.where(glob, torch.full_like(delta, float(dist)), delta)
    return delta


def pairwise_logits(
    q: torch.Tensor, k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, chunk_elems: int = 1 << 22
) -> torch.Tensor:
    """<R(delta[p,j]) q[h,p], k[h,j]> for all h, p, j, with NaN delta -> -inf.

    ``q``, ``k``: [H, T, D] raw (unrotated), ``delta``: [T, T]. Returns [H, T, T].
    """
    H, T, D = q.shape
    half = inv_freq.numel()
    r = 2 * half
    qa, qb, qr = q[..., :half], q[..., half:r], q[..., r:]
    ka, kb, kr = k[..., :half], k[..., half:r], k[..., r:]
    out = torch.empty(H, T, T, dtype=F64)
    rows = max(1, chunk_elems // max(1, H * T * max(half, 1)))
    for s in range(0, T, rows):
        e = min(T, s + rows)
        dl = torch.nan_to_num(delta[s:e], nan=0.0)  # [c, T]
        ang = dl[:, :, None] * inv_freq[None, None, :]  # [c, T, half]
        cos, sin = torch.cos(ang), torch.sin(ang)
        # C[h,p,j,i] = qa ka + qb kb ; S[h,p,j,i] = qa kb - qb ka
        c_term = qa[:, s:e, None, :] * ka[:, None, :, :] + qb[:, s:e, None, :] * kb[:, None, :, :]
        s_term = qa[:, s:e, None, :] * kb[:, None, :, :] - qb[:, s:e, None, :] * ka[:, None, :, :]
        blk = (c_term * cos + s_term * sin).sum(-1)
        if qr.shape[-1]:
            blk = blk + qr[:, s:e] @ kr.transpose(-1, -2)
        out[:, s:e] = blk
    return out.masked_fill(torch.isnan(delta)[None], -math.inf)


def fast_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    inv_freq: torch.Tensor,
    lm_infinite: tuple[int, int, float] | None,
) -> torch.Tensor:
    """Same result as :func:`pairwise_logits` for causal / LM-Infinite deltas."""
    H, T, D = q.shape
    pos = torch.arange(T, dtype=F64)
    std = rotate(q, pos, inv_freq) @ rotate(k, pos, inv_freq).transpose(-1, -2)  # delta = p - j
    if lm_infinite is None:
        delta = causal_delta(T)
        return std.masked_fill(torch.isnan(delta)[None], -math.inf)
    G, W, d = lm_infinite
    delta = lm_infinite_delta(T, G, W, d)
    glob_val = rotate(q, torch.full((T,), float(d), dtype=F64), inv_freq) @ k.transpose(-1, -2)
    pi = torch.arange(T)[:, None]
    ji = torch.arange(T)[None, :]
    is_local = (ji <= pi) & (ji > pi - W)
    out = torch.where(is_local[None], std, glob_val)
    return out.masked_fill(torch.isnan(delta)[None], -math.inf)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
def _load_safetensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {ckpt}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            out[k] = v.to(F64) if v.is_floating_point() else v
    return out


class RefLlama:
    """float64 teacher-forced forward of a Llama/Mistral/Qwen2 checkpoint.

    ``impl``: "pairwise" (literal per-pair rotation, default) or "fast".
    """

    def __init__(self, ckpt_dir: str | Path, *, impl: str = "pairwise"):
        if impl not in ("pairwise", "fast"):
            raise ValueError(f"impl must be 'pairwise' or 'fast', got {impl!r}")
        self.impl = impl
        self.ckpt_dir = Path(ckpt_dir)
        self.config = cfg = json.loads((self.ckpt_dir / "config.json").read_text())
        self.w = _load_safetensors(self.ckpt_dir)

        self.hidden = cfg["hidden_size"]
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads") or self.n_heads
        self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
        if cfg.get("model_type") == "qwen2":  # vLLM/HF Qwen2 ignore head_dim
            self.head_dim = self.hidden // self.n_heads
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.vocab = cfg["vocab_size"]
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise NotImplementedError(f"hidden_act {act!r}")

        rope_params = cfg.get("rope_parameters") or {}
        self.rope_theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
        prf = cfg.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0))
        self.rotary_dim = int(self.head_dim * float(prf))
        if self.rotary_dim % 2:
            raise ValueError("rotary dim must be even")
        scaling = cfg.get("rope_scaling")
        if not scaling and rope_params.get("rope_type", rope_params.get("type", "default")) != "default":
            scaling = rope_params
        self.rope_scaling = scaling or None

        if "lm_head.weight" in self.w:
            self.lm_head = self.w["lm_head.weight"]
        elif cfg.get("tie_word_embeddings", False):
            self.lm_head = self.w["model.embed_tokens.weight"]
        else:
            raise KeyError("lm_head.weight missing and tie_word_embeddings is false")

    # -- rope ---------------------------------------------------------------
    def config_inv_freq(self) -> torch.Tensor:
        """inv_freq from config.json: default or ``linear`` scaling only."""
        inv = default_inv_freq(self.rotary_dim, self.rope_theta)
        if self.rope_scaling:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind == "linear":
                inv = inv / float(self.rope_scaling["factor"])  # == positions / factor
            elif kind != "default":
                raise NotImplementedError(
                    f"rope scaling {kind!r} not supported by the reference; pass inv_freq_for_len"
                )
        return inv

    # -- layers -------------------------------------------------------------
    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.w[name]

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self.w[name + ".weight"].T
        b = self.w.get(name + ".bias")
        return y + b if b is not None else y

    def _attention(
        self,
        x: torch.Tensor,
        prefix: str,
        inv_freq: torch.Tensor,
        lm_infinite: tuple[int, int, float] | None,
        delta: torch.Tensor,
        q_scale: float,
    ) -> torch.Tensor:
        T = x.shape[0]
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        q = self._lin(x, prefix + "q_proj").view(T, H, D).transpose(0, 1)  # [H, T, D]
        k = self._lin(x, prefix + "k_proj").view(T, KV, D).transpose(0, 1)
        v = self._lin(x, prefix + "v_proj").view(T, KV, D).transpose(0, 1)
        rep = H // KV
        k = k.repeat_interleave(rep, dim=0)  # query head h uses kv head h // rep
        v = v.repeat_interleave(rep, dim=0)
        q = q * q_scale
        if self.impl == "pairwise":
            logits = pairwise_logits(q, k, delta, inv_freq)
        else:
            logits = fast_logits(q, k, inv_freq, lm_infinite)
        logits = logits * (D**-0.5)
        probs = torch.softmax(logits, dim=-1)
        o = (probs @ v).transpose(0, 1).reshape(T, H * D)
        return self._lin(o, prefix + "o_proj")

    def _mlp(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        g = self._lin(x, prefix + "gate_proj")
        u = self._lin(x, prefix + "up_proj")
        return self._lin(torch.nn.functional.silu(g) * u, prefix + "down_proj")

    # -- public -------------------------------------------------------------
    def logits(
        self,
        token_ids: Sequence[int],
        *,
        lm_infinite: tuple[int, int, float] | None = None,
        inv_freq_for_len: Callable[[int], torch.Tensor] | None = None,
        query_scale_for_len: Callable[[int], float] | None = None,
    ) -> torch.Tensor:
        """Next-token logits [T, vocab] (float64) at every position."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        T = ids.numel()
        if T == 0:
            raise ValueError("empty token_ids")
        if inv_freq_for_len is not None:
            inv_freq = torch.as_tensor(inv_freq_for_len(T), dtype=F64).flatten()
            if inv_freq.numel() != self.rotary_dim // 2:
                raise ValueError(f"inv_freq has {inv_freq.numel()} entries, expected {self.rotary_dim // 2}")
        else:
            inv_freq = self.config_inv_freq()
        q_scale = float(query_scale_for_len(T)) if query_scale_for_len is not None else 1.0
        if lm_infinite is not None:
            G, W, d = lm_infinite
            lm_infinite = (int(G), int(W), float(d))
            if W < 1:
                raise ValueError("n_local must be >= 1")
            delta = lm_infinite_delta(T, *lm_infinite)
        else:
            delta = causal_delta(T)

        x = self.w["model.embed_tokens.weight"][ids]
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            h = self._rms(x, p + "input_layernorm.weight")
            x = x + self._attention(h, p + "self_attn.", inv_freq, lm_infinite, delta, q_scale)
            h = self._rms(x, p + "post_attention_layernorm.weight")
            x = x + self._mlp(h, p + "mlp.")
        x = self._rms(x, "model.norm.weight")
        return x @ self.lm_head.T

    def logprobs(
        self,
        token_ids: Sequence[int],
        *,
        lm_infinite: tuple[int, int, float] | None = None,
        inv_freq_for_len: Callable[[int], torch.Tensor] | None = None,
        query_scale_for_len: Callable[[int], float] | None = None,
    ) -> torch.Tensor:
        """log_softmax of the next-token logits, [T, vocab] float64.

        Row ``t`` is the distribution of token ``t + 1`` given tokens
        ``0..t``. ``lm_infinite = (n_global, n_local, distance_limit)``.
        ``inv_freq_for_len(S)`` / ``query_scale_for_len(S)`` are called once
        with ``S = len(token_ids)`` and apply to the whole sequence.
        """
        lg = self.logits(
            token_ids,
            lm_infinite=lm_infinite,
            inv_freq_for_len=inv_freq_for_len,
            query_scale_for_len=query_scale_for_len,
        )
        return torch.log_softmax(lg, dim=-1)

    def greedy_generate(
        self,
        token_ids: Sequence[int],
        n_new: int,
        *,
        lm_infinite: tuple[int, int, float] | None = None,
        inv_freq_for_len: Callable[[int], torch.Tensor] | None = None,
        query_scale_for_len: Callable[[int], float] | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[int]:
        """Greedy decoding by re-running the full forward every step.

        The token at index ``S`` is predicted from a forward over the ``S``
        tokens ``0..S-1``, so the callables see ``S`` = current length (the
        caller maps that to whatever length convention it needs). Returns the
        new token ids only.
        """
        seq = list(token_ids)
        new: list[int] = []
        for _ in range(n_new):
            lg = self.logits(
                seq,
                lm_infinite=lm_infinite,
                inv_freq_for_len=inv_freq_for_len,
                query_scale_for_len=query_scale_for_len,
            )[-1]
            nxt = int(torch.argmax(lg))
            new.append(nxt)
            seq.append(nxt)
            if nxt in stop_token_ids:
                break
        return new


# --------------------------------------------------------------------------
# Step-by-step generation with a cache of raw keys (CLEX semantics)
# --------------------------------------------------------------------------
def _step_delta(q_pos: torch.Tensor, S: int, lm_infinite) -> torch.Tensor:
    """[Tq, S] rotary distances for queries at q_pos over keys 0..S-1 (NaN = masked)."""
    p = q_pos[:, None]
    j = torch.arange(S)[None, :]
    G, W, d = lm_infinite if lm_infinite is not None else (0, math.inf, 0.0)
    local = (j <= p) & (j > p - W)
    glob = (j < G) & (j <= p - W)
    delta = torch.full((q_pos.numel(), S), math.nan, dtype=F64)
    delta = torch.where(local, (p - j).to(F64), delta)
    return torch.where(glob, torch.full_like(delta, float(d)), delta)


def _step_logits(q: torch.Tensor, k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """<R(delta[t, j]) q[h, t], k[h, j]>: q [H, Tq, D], k [H, S, D] -> [H, Tq, S]."""
    half = inv_freq.numel()
    r = 2 * half
    ang = torch.nan_to_num(delta, nan=0.0)[:, :, None] * inv_freq  # [Tq, S, half]
    cos, sin = torch.cos(ang), torch.sin(ang)
    qa, qb, qr = q[..., None, :half], q[..., None, half:r], q[..., r:]  # [H, Tq, 1, half]
    ka, kb, kr = k[:, None, :, :half], k[:, None, :, half:r], k[..., r:]  # [H, 1, S, half]
    out = ((qa * ka + qb * kb) * cos + (qa * kb - qb * ka) * sin).sum(-1)
    if qr.shape[-1]:
        out = out + qr @ kr.transpose(-1, -2)
    return out.masked_fill(torch.isnan(delta)[None], -math.inf)


def incremental_logprobs(
    ref: "RefLlama",
    prompt: Sequence[int],
    new_tokens: Sequence[int],
    *,
    lm_infinite: tuple[int, int, float] | None = None,
    inv_freq_for_len: Callable[[int], torch.Tensor] | None = None,
    query_scale_for_len: Callable[[int], float] | None = None,
) -> torch.Tensor:
    """Log-probs of `new_tokens` generated after `prompt`, one step at a time, the way a
    serving engine with a raw-key cache computes them: the prompt in one step, then one
    token per step; each token's raw K/V is computed once, in its own step, and kept;
    every step rotates all the keys it attends with that step's frequencies (its total
    length S picks them) and scales its queries by that step's factor."""
    H, KV, D = ref.n_heads, ref.n_kv, ref.head_dim
    rep = H // KV
    caches: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * ref.n_layers
    steps = [list(prompt)] + [[t] for t in new_tokens[:-1]]
    out = []
    S = 0
    for k_step, ids in enumerate(steps):
        S += len(ids)
        inv = torch.as_tensor(inv_freq_for_len(S), dtype=F64) if inv_freq_for_len else ref.config_inv_freq()
        qs = float(query_scale_for_len(S)) if query_scale_for_len else 1.0
        delta = _step_delta(torch.arange(S - len(ids), S), S, lm_infinite)
        x = ref.w["model.embed_tokens.weight"][torch.as_tensor(ids)]
        for i in range(ref.n_layers):
            p = f"model.layers.{i}."
            h = ref._rms(x, p + "input_layernorm.weight")
            T = h.shape[0]
            q = ref._lin(h, p + "self_attn.q_proj").view(T, H, D).transpose(0, 1) * qs
            kn = ref._lin(h, p + "self_attn.k_proj").view(T, KV, D).transpose(0, 1)
            vn = ref._lin(h, p + "self_attn.v_proj").view(T, KV, D).transpose(0, 1)
            if caches[i] is not None:
                kn, vn = torch.cat((caches[i][0], kn), 1), torch.cat((caches[i][1], vn), 1)
            caches[i] = (kn, vn)
            logits = _step_logits(q, kn.repeat_interleave(rep, 0), delta, inv) * D**-0.5
            o = (torch.softmax(logits, -1) @ vn.repeat_interleave(rep, 0)).transpose(0, 1).reshape(T, H * D)
            x = x + ref._lin(o, p + "self_attn.o_proj")
            h = ref._rms(x, p + "post_attention_layernorm.weight")
            x = x + ref._mlp(h, p + "mlp.")
        last = ref._rms(x[-1:], "model.norm.weight") @ ref.lm_head.T
        out.append(torch.log_softmax(last[0], -1)[new_tokens[k_step]].item())
    return torch.tensor(out, dtype=F64)
