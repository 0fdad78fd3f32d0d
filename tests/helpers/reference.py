"""The float64 reference forward for every model family the tests run (no vLLM code, no
plugin kernels): Llama, Mistral, Qwen2, Qwen3, Mixtral, Phi and GPT-NeoX, with causal,
LM-Infinite and/or CLEX attention.

The attention logit between query position ``p`` and key position ``j`` is computed
literally as

    logit(p, j) = scale * < R(delta[p, j]) q_raw[p], k_raw[j] >

where ``q_raw``/``k_raw`` are the projections *before* any rotation, ``R(delta)`` is the
RoPE rotation by ``delta`` positions and ``delta`` is a dense [Tq, S] matrix of rotary
distances (NaN = masked). For the neox / HF "rotate halves" layout, frequency ``i``
pairs dims ``a = i`` and ``b = i + r/2`` and rotating by angle ``phi`` maps ``(a, b)``
to ``(a cos - b sin, b cos + a sin)``. Hence

    < R(delta) q, k > = sum_i (q_a k_a + q_b k_b) cos(delta w_i)
                              + (q_a k_b - q_b k_a) sin(delta w_i)
                        + sum over non-rotary dims of q k

which is what :func:`pairwise_logits` evaluates (in query-row chunks to bound memory).
For plain causal attention ``delta[p, j] = p - j``; for LM-Infinite it is ``p - j`` on
the local window and the distance limit on global keys.

Everything around attention is the family's own transformers model class, loaded in
float64, with three changes:

* every rotary module returns cos = 1, sin = 0, so q and k reach attention unrotated
  (``q * 1 + rotate_half(q) * 0 == q`` exactly) and transformers' KV cache holds raw keys;
* attention is a registered attention function computing the literal logits above;
* RMSNorm and the MoE router, which transformers evaluates in float32, run in float64.

Norms (Qwen3's q/k RMSNorm, Phi's LayerNorm), MoE routing, partial rotary slicing,
parallel residuals and biases are transformers' code. tests/unit/test_reference.py
checks this forward against transformers' own (rotary + sdpa) forward and against a
hand-written double-loop forward from the formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

F64 = torch.float64
LMInfinite = tuple[int, int, float]


# --------------------------------------------------------------------------
# RoPE frequencies and rotary distances
# --------------------------------------------------------------------------
def default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """w_i = base^(-2i/r), i = 0 .. r/2-1, in float64."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=F64) / rotary_dim))


def step_delta(q_pos: torch.Tensor, S: int, lm_infinite: LMInfinite | None) -> torch.Tensor:
    """[Tq, S] rotary distances for queries at positions ``q_pos`` over keys 0..S-1
    (NaN = masked). Causal: ``p - j`` for ``j <= p``. LM-Infinite ``(G, W, d)``: local keys
    ``p - W < j <= p`` use ``p - j``; global keys ``j < G`` with ``j <= p - W`` use ``d``;
    all other keys are masked."""
    p = q_pos.to(torch.long)[:, None]
    j = torch.arange(S)[None, :]
    G, W, d = lm_infinite if lm_infinite is not None else (0, math.inf, 0.0)
    local = (j <= p) & (j > p - W)
    glob = (j < G) & (j <= p - W)
    delta = torch.full((q_pos.numel(), S), math.nan, dtype=F64)
    delta = torch.where(local, (p - j).to(F64), delta)
    return torch.where(glob, torch.full_like(delta, float(d)), delta)


def causal_delta(T: int) -> torch.Tensor:
    """delta[p, j] = p - j for j <= p, NaN (masked) otherwise."""
    return step_delta(torch.arange(T), T, None)


def lm_infinite_delta(T: int, n_global: int, n_local: int, dist: float) -> torch.Tensor:
    """LM-Infinite rotary distances of a whole sequence, [T, T] (NaN = masked)."""
    return step_delta(torch.arange(T), T, (n_global, n_local, dist))


def pairwise_logits(
    q: torch.Tensor, k: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, chunk_elems: int = 1 << 22
) -> torch.Tensor:
    """<R(delta[p,j]) q[h,p], k[h,j]> for all h, p, j, with NaN delta -> -inf.

    ``q``: [H, Tq, D], ``k``: [H, S, D], both raw (unrotated); ``delta``: [Tq, S].
    Returns [H, Tq, S].
    """
    H, Tq, D = q.shape
    S = k.shape[1]
    half = inv_freq.numel()
    r = 2 * half
    qa, qb, qr = q[..., :half], q[..., half:r], q[..., r:]
    ka, kb, kr = k[..., :half], k[..., half:r], k[..., r:]
    out = torch.empty(H, Tq, S, dtype=F64)
    rows = max(1, chunk_elems // max(1, H * S * max(half, 1)))
    for s in range(0, Tq, rows):
        e = min(Tq, s + rows)
        dl = torch.nan_to_num(delta[s:e], nan=0.0)  # [c, S]
        ang = dl[:, :, None] * inv_freq[None, None, :]  # [c, S, half]
        cos, sin = torch.cos(ang), torch.sin(ang)
        # C[h,p,j,i] = qa ka + qb kb ; S[h,p,j,i] = qa kb - qb ka
        c_term = qa[:, s:e, None, :] * ka[:, None, :, :] + qb[:, s:e, None, :] * kb[:, None, :, :]
        s_term = qa[:, s:e, None, :] * kb[:, None, :, :] - qb[:, s:e, None, :] * ka[:, None, :, :]
        blk = (c_term * cos + s_term * sin).sum(-1)
        if qr.shape[-1]:
            blk = blk + qr[:, s:e] @ kr.transpose(-1, -2)
        out[:, s:e] = blk
    return out.masked_fill(torch.isnan(delta)[None], -math.inf)


# --------------------------------------------------------------------------
# transformers hooks
# --------------------------------------------------------------------------
_ATTN_NAME = "lminf_float64_reference"
#: What the attention function needs for the forward in progress (set by Reference).
_STATE: dict = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, H, Tq, D], key/value [1, KV, S, D] (unrotated; the cache included);
    the Tq queries are the last Tq positions of S. Returns [1, Tq, H, D]."""
    st = _STATE
    q = query[0].to(F64) * st["q_scale"]
    k, v = key[0].to(F64), value[0].to(F64)
    Tq, S = q.shape[1], k.shape[1]
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)  # head h uses kv head h // rep
    delta = step_delta(torch.arange(S - Tq, S), S, st["lm_infinite"])
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    logits = pairwise_logits(q, k, delta, st["inv_freq"]) * scale
    top_k = st.get("top_k")
    if top_k is not None and top_k[2] <= module.layer_idx < top_k[3]:
        logits = _with_top_k(logits, q, k, torch.arange(S - Tq, S), st["lm_infinite"], st["inv_freq"], scale, top_k)
    out = torch.softmax(logits, dim=-1) @ v
    return out.transpose(0, 1)[None].to(query.dtype), None


def _with_top_k(logits, q, k, q_pos, lm_infinite, inv_freq, scale, top_k):
    """LM-Infinite's top-k middle attention on top of the Λ logits [H, Tq, S]: a row at
    position p >= first_pos whose middle G <= j <= p - W holds at least k keys also sees,
    per head, the k middle keys with the largest logit at rotary distance `distance`."""
    kk, distance, _, _, first_pos = top_k[:5]
    block_size = top_k[5] if len(top_k) > 5 else None
    G, W, _ = lm_infinite
    p = q_pos[:, None]
    j = torch.arange(k.shape[1])[None, :]
    middle = (j >= G) & (j <= p - W)
    mid_delta = torch.where(middle, torch.tensor(float(distance), dtype=F64), torch.tensor(math.nan, dtype=F64))
    mid = pairwise_logits(q, k, mid_delta, inv_freq) * scale  # -inf off the middle
    if block_size is None:
        rows = (q_pos >= first_pos) & (middle.sum(1) >= kk)
        best = mid.topk(kk, dim=-1).indices  # [H, Tq, kk]
        chosen = torch.zeros_like(mid, dtype=torch.bool).scatter_(-1, best, True) & rows[None, :, None]
        return torch.where(chosen, mid, logits)
    # block mode: bound of each full block, sum_c max(q_c max_c, q_c min_c), q rotated by `distance`
    half = inv_freq.numel()
    ang = float(distance) * inv_freq
    qa, qb = q[..., :half], q[..., half:2 * half]
    q_d = torch.cat((qa * ang.cos() - qb * ang.sin(), qb * ang.cos() + qa * ang.sin(), q[..., 2 * half:]), -1)
    full = k.shape[1] // block_size
    if full < kk:  # no row's middle spans kk blocks
        return logits
    kb = k[:, : full * block_size].reshape(k.shape[0], full, block_size, -1)
    lo, hi = kb.amin(2), kb.amax(2)  # [H, nb, D]
    bound = torch.maximum(q_d[:, :, None] * hi[:, None], q_d[:, :, None] * lo[:, None]).sum(-1)  # [H, Tq, nb]
    last = q_pos - W
    b = torch.arange(full)[None, :]
    in_middle = (b >= G // block_size) & (b <= last[:, None] // block_size) & (last[:, None] >= G)  # [Tq, nb]
    rows = (q_pos >= first_pos) & (in_middle.sum(1) >= kk)
    best = bound.masked_fill(~in_middle[None], -math.inf).topk(kk, dim=-1).indices  # [H, Tq, kk]
    chosen_blocks = torch.zeros_like(bound, dtype=torch.bool).scatter_(-1, best, True)
    chosen_blocks = torch.cat((chosen_blocks, torch.zeros_like(chosen_blocks[..., :1])), -1)  # the partial block: never
    chosen = chosen_blocks[..., (j[0] // block_size).clamp(max=full)] & middle[None] & rows[None, :, None]
    return torch.where(chosen, mid, logits)


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(_ATTN_NAME, _reference_attention)
    AttentionMaskInterface.register(_ATTN_NAME, sdpa_mask)  # built, then ignored


def _identity_rotary(module: torch.nn.Module) -> None:
    rot = 2 * module.inv_freq.numel()

    def forward(x, position_ids, *args, **kwargs):
        shape = (*position_ids.shape, rot)
        return torch.ones(shape, dtype=x.dtype), torch.zeros(shape, dtype=x.dtype)

    module.forward = forward


def _float64_rms_norm(module: torch.nn.Module) -> None:
    """weight * x / sqrt(mean(x^2) + eps), in the input's dtype (transformers: float32)."""
    eps = module.variance_epsilon

    def forward(x):
        return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    module.forward = forward


def _float64_topk_router(module: torch.nn.Module) -> None:
    """Mixtral's router (softmax, top-k, renormalise) without its float32 softmax."""

    def forward(hidden_states):
        hidden_states = hidden_states.reshape(-1, module.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states, module.weight)
        top, idx = torch.topk(torch.softmax(logits, dim=-1), module.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), idx

    module.forward = forward


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
class Reference:
    """float64 teacher-forced forward of a checkpoint written by `make_tiny_llama` or
    `make_family_checkpoint` (any of the families above), with causal, LM-Infinite and/or
    CLEX attention."""

    def __init__(self, ckpt_dir: str | Path):
        import transformers as tf

        _register()
        self.ckpt_dir = Path(ckpt_dir)
        config = tf.AutoConfig.from_pretrained(str(self.ckpt_dir))
        rope = dict(config.rope_parameters or {})
        self.rope_theta = float(rope["rope_theta"])
        self.rope_scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")) == "default":
            self.rope_scaling = None
        # The model is built with plain RoPE (whose rotation is disabled below anyway);
        # transformers has no 'clex' rope type, and the CLEX tensors stay unused.
        plain = {k: v for k, v in rope.items() if k in ("rope_theta", "partial_rotary_factor")}
        if getattr(config, "rope_scaling", None) is not None:  # may alias rope_parameters
            config.rope_scaling = None
        config.rope_parameters = dict(plain, rope_type="default")
        self.config = config
        self.vocab = config.vocab_size
        self.model = tf.AutoModelForCausalLM.from_pretrained(
            str(self.ckpt_dir), config=config, dtype=F64, attn_implementation=_ATTN_NAME,
            experts_implementation="eager",  # grouped_mm has no float64
        ).eval()
        rotaries = []
        for m in self.model.modules():
            name = type(m).__name__
            if name.endswith("RotaryEmbedding"):
                rotaries.append(m)
                _identity_rotary(m)
            elif name.endswith("RMSNorm"):
                _float64_rms_norm(m)
            elif name == "MixtralTopKRouter":
                _float64_topk_router(m)
            elif "Router" in name:
                raise NotImplementedError(f"{name}: check that it runs in float64, then add it here")
        assert rotaries, "no rotary module found"
        self.rotary_dim = 2 * rotaries[0].inv_freq.numel()

    # -- rope ---------------------------------------------------------------
    def config_inv_freq(self) -> torch.Tensor:
        """inv_freq from config.json: default or ``linear`` scaling only."""
        inv = default_inv_freq(self.rotary_dim, self.rope_theta)
        if self.rope_scaling:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind == "linear":
                return inv / float(self.rope_scaling["factor"])  # == positions / factor
            raise NotImplementedError(
                f"rope scaling {kind!r} not supported by the reference; pass inv_freq_for_len"
            )
        return inv

    def _step_state(self, S: int, lm_infinite, inv_freq_for_len, query_scale_for_len, top_k=None) -> dict:
        """Frequencies and query scale of a step whose sequence is S tokens long."""
        if inv_freq_for_len is not None:
            inv = torch.as_tensor(inv_freq_for_len(S), dtype=F64).flatten()
            if inv.numel() != self.rotary_dim // 2:
                raise ValueError(f"inv_freq has {inv.numel()} entries, expected {self.rotary_dim // 2}")
        else:
            inv = self.config_inv_freq()
        if lm_infinite is not None:
            G, W, d = lm_infinite
            if W < 1:
                raise ValueError("n_local must be >= 1")
            lm_infinite = (int(G), int(W), float(d))
        if top_k is not None and lm_infinite is None:
            raise ValueError("top_k needs lm_infinite")
        return dict(inv_freq=inv, lm_infinite=lm_infinite, top_k=top_k,
                    q_scale=1.0 if query_scale_for_len is None else float(query_scale_for_len(S)))

    @torch.no_grad()
    def _forward(self, ids: Sequence[int], state: dict, cache=None):
        _STATE.clear()
        _STATE.update(state)
        try:
            return self.model(input_ids=torch.as_tensor([list(ids)], dtype=torch.long),
                              past_key_values=cache, use_cache=cache is not None)
        finally:
            _STATE.clear()

    # -- public -------------------------------------------------------------
    def logits(
        self,
        token_ids: Sequence[int],
        *,
        lm_infinite: LMInfinite | None = None,
        inv_freq_for_len: Callable[[int], torch.Tensor] | None = None,
        query_scale_for_len: Callable[[int], float] | None = None,
        top_k: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Next-token logits [T, vocab] (float64) at every position. top_k = (k, distance,
        from_layer, to_layer, first_pos[, block_size]): LM-Infinite's top-k middle attention
        in layers from <= i < to, for the rows at positions >= first_pos (with block_size:
        block mode, k blocks)."""
        ids = list(token_ids)
        if not ids:
            raise ValueError("empty token_ids")
        state = self._step_state(len(ids), lm_infinite, inv_freq_for_len, query_scale_for_len, top_k)
        return self._forward(ids, state).logits[0].to(F64)

    def logprobs(
        self,
        token_ids: Sequence[int],
        *,
        lm_infinite: LMInfinite | None = None,
        inv_freq_for_len: Callable[[int], torch.Tensor] | None = None,
        query_scale_for_len: Callable[[int], float] | None = None,
        top_k: tuple[int, int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """log_softmax of the next-token logits, [T, vocab] float64.

        Row ``t`` is the distribution of token ``t + 1`` given tokens ``0..t``.
        ``lm_infinite = (n_global, n_local, distance_limit)``. ``inv_freq_for_len(S)`` /
        ``query_scale_for_len(S)`` are called once with ``S = len(token_ids)`` and apply
        to the whole sequence.
        """
        lg = self.logits(token_ids, lm_infinite=lm_infinite, inv_freq_for_len=inv_freq_for_len,
                         query_scale_for_len=query_scale_for_len, top_k=top_k)
        return torch.log_softmax(lg, dim=-1)

    def greedy_generate(
        self,
        token_ids: Sequence[int],
        n_new: int,
        *,
        lm_infinite: LMInfinite | None = None,
        inv_freq_for_len: Callable[[int], torch.Tensor] | None = None,
        query_scale_for_len: Callable[[int], float] | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[int]:
        """Greedy decoding by re-running the full forward every step: the token at index
        ``S`` is predicted from a forward over the ``S`` tokens ``0..S-1``, so the callables
        see ``S`` = current length. Returns the new token ids only."""
        seq = list(token_ids)
        new: list[int] = []
        for _ in range(n_new):
            lg = self.logits(seq, lm_infinite=lm_infinite, inv_freq_for_len=inv_freq_for_len,
                             query_scale_for_len=query_scale_for_len)[-1]
            nxt = int(torch.argmax(lg))
            new.append(nxt)
            seq.append(nxt)
            if nxt in stop_token_ids:
                break
        return new

    def incremental_logprobs(
        self,
        prompt: Sequence[int],
        new_tokens: Sequence[int],
        *,
        lm_infinite: LMInfinite | None = None,
        inv_freq_for_len: Callable[[int], torch.Tensor] | None = None,
        query_scale_for_len: Callable[[int], float] | None = None,
        top_k: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """Log-probs of `new_tokens` generated after `prompt`, one step at a time, the way a
        serving engine with a raw-key cache computes them (CLEX semantics): the prompt in
        one step, then one token per step; each token's raw K/V is computed once, in its
        own step, and kept (transformers' cache, which holds raw keys here); every step
        rotates all the keys it attends with that step's frequencies (its total length S
        picks them) and scales its queries by that step's factor."""
        from transformers import DynamicCache

        cache = DynamicCache()
        steps = [list(prompt)] + [[t] for t in new_tokens[:-1]]
        out, S = [], 0
        for tok, ids in zip(new_tokens, steps):
            S += len(ids)
            res = self._forward(ids, self._step_state(S, lm_infinite, inv_freq_for_len, query_scale_for_len, top_k),
                                cache)
            cache = res.past_key_values
            out.append(torch.log_softmax(res.logits[0, -1].to(F64), -1)[tok].item())
        return torch.tensor(out, dtype=F64)


def token_logprobs(lp: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """logprob of ids[i] given ids[:i], i >= 1, from [T, vocab] log-probs."""
    return lp[torch.arange(len(ids) - 1), torch.tensor(list(ids[1:]))]
