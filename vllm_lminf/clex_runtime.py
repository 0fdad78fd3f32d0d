"""CLEX inside vLLM: config detection, weight capture, the per-row choice of t.

The ODE is solved once after the weights load (`vllm_lminf.clex`), with the upstream
code's quirk: the time embedding inside the ODE uses base 10000 whatever rope_theta is,
while the initial value is the checkpoint's own inv_freq (built with rope_theta).

One rule for t, per query row, as the reference (which runs a prompt in one forward at
t(P), then each generated token at t(current length), re-rotating its whole cache): the
row at position j uses t_j = t(max(P, j + 1)), P the request's original prompt length,
t(S) = min(ceil(S / L), max_factor); every key it attends is rotated with t_j, and
log_scale uses the same S. The same for a one-pass prompt, chunked prefill, decode and
recompute after preemption. A step's rows are regrouped into runs that share (t, S):
each run is a pseudo-sequence for the kernels (`ClexFrequencies.regroup`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

from .clex import (
    CLEX_REFERENCE_ODE_BASE,
    CLEX_WEIGHT_NAMES,
    ClexConfig,
    clex_config_from_hf_config,
    clex_log_scale_tensor,
    clex_scale_index,
    clex_scale_index_tensor,
    find_clex_rope_dict,
    solve_clex_frequencies,
)


def _rope_theta(hf_config) -> float:
    theta = getattr(hf_config, "rope_theta", None)
    params = getattr(hf_config, "rope_parameters", None)
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    if theta is None:
        raise ValueError("CLEX needs rope_theta in the model config")
    return float(theta)


@contextlib.contextmanager
def plain_rope_during_init(hf_config) -> Iterator[None]:
    """vLLM's get_rope rejects the 'clex' type: let the stock constructor build a
    plain RoPE module (used only for its rotary dim and style), then restore.
    transformers 5 may alias rope_scaling and rope_parameters; handle both."""
    clex = find_clex_rope_dict(hf_config)
    if clex is None:
        yield
        return
    saved = {a: getattr(hf_config, a, None) for a in ("rope_parameters", "rope_scaling")}
    plain = {k: v for k, v in clex.items() if k in ("rope_theta", "partial_rotary_factor")}
    plain.setdefault("rope_theta", _rope_theta(hf_config))
    if "partial_rotary_factor" not in plain:  # Phi / GPT-NeoX configs may keep it top level
        for name in ("partial_rotary_factor", "rotary_pct"):
            if getattr(hf_config, name, None) is not None:
                plain["partial_rotary_factor"] = float(getattr(hf_config, name))
                break
    plain["rope_type"] = "default"
    hf_config.rope_parameters = plain
    if find_clex_rope_dict(hf_config) is not None:
        hf_config.rope_scaling = dict(plain)
    try:
        yield
    finally:
        for attr, value in saved.items():
            if value is not None:
                setattr(hf_config, attr, value)


class ClexFrequencies:
    """Holds the solved frequency table [max_factor, R/2] and serves per-step rows."""

    def __init__(self, cfg: ClexConfig, *, original_len: int) -> None:
        self.cfg = cfg
        self.original_len = original_len
        self.table: torch.Tensor | None = None
        self.rotary_dim: int | None = None  # the model's, set while its attention is installed

    # -- loading -----------------------------------------------------------------
    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        load_rest: Callable[[Iterable[tuple[str, torch.Tensor]]], set[str]],
    ) -> set[str]:
        captured: dict[str, torch.Tensor] = {}

        def others():
            for name, tensor in weights:
                if name in CLEX_WEIGHT_NAMES:
                    captured[name] = tensor.detach().to(torch.float32).clone()
                else:
                    yield name, tensor

        loaded = load_rest(others())
        missing = [n for n in CLEX_WEIGHT_NAMES if n not in captured]
        if missing:
            raise ValueError(
                f"the config asks for CLEX rope scaling but the checkpoint lacks {missing}"
            )
        inv_freq, up, down = (captured[n] for n in CLEX_WEIGHT_NAMES)
        if self.rotary_dim is not None and 2 * inv_freq.numel() != self.rotary_dim:
            raise ValueError(
                f"{CLEX_WEIGHT_NAMES[0]} has {inv_freq.numel()} entries but the model's rotary dim is "
                f"{self.rotary_dim} (it needs rotary_dim / 2 = {self.rotary_dim // 2}): the CLEX tensors "
                "do not belong to this model"
            )
        self.table = solve_clex_frequencies(
            inv_freq, up, down, base=CLEX_REFERENCE_ODE_BASE, rotary_dim=2 * inv_freq.numel(), cfg=self.cfg
        ).to(torch.float32)
        return loaded

    def check_rotary_dim(self, rotary_dim: int) -> None:
        """Record the model's rotary dim (every layer must agree); the CLEX tensors are
        checked against it when the weights load."""
        if self.rotary_dim is not None and self.rotary_dim != rotary_dim:
            raise ValueError(f"CLEX needs one rotary dim for every layer, got {self.rotary_dim} and {rotary_dim}")
        self.rotary_dim = rotary_dim

    # -- per step ----------------------------------------------------------------
    def t_of(self, length: int) -> int:
        return clex_scale_index(length, self.original_len, self.cfg.max_factor)

    def runs(self, first: int, end: int, prompt_len: int) -> list[tuple[int, int, int]]:
        """Query positions [first, end) of one sequence as runs (lo, hi, S): every row of
        a run has S = max(P, j + 1) mapping to one t (and, with log_scale, one S)."""
        out: list[tuple[int, int, int]] = []
        lo = first
        if lo < min(end, prompt_len):  # prompt rows: all at S = P
            out.append((lo, min(end, prompt_len), prompt_len))
            lo = min(end, prompt_len)
        while lo < end:  # rows past the prompt: S = j + 1
            if self.cfg.log_scale:
                hi = lo + 1
            else:  # up to the next multiple of L (t steps there), or past the cap: the rest
                t = self.t_of(lo + 1)
                hi = end if t >= self.cfg.max_factor else min(end, t * self.original_len)
            out.append((lo, hi, hi))
            lo = hi
        if not self.cfg.log_scale:  # neighbours at one t are one run
            merged: list[tuple[int, int, int]] = []
            for run in out:
                if merged and self.t_of(merged[-1][2]) == self.t_of(run[2]):
                    merged[-1] = (merged[-1][0], run[1], run[2])
                else:
                    merged.append(run)
            out = merged
        return out

    def regroup(self, query_start_loc: list[int], seq_lens: list[int], prompt_lens: list[int]):
        """The step's query rows as pseudo-sequences of one (t, S) each.

        Returns (query_start_loc, seq_lens, owner, frequencies [runs, R/2], query_scale or
        None): pseudo-sequence k owns rows query_start_loc[k]:query_start_loc[k+1], which
        are the last tokens of a sequence of seq_lens[k] tokens read through the block-table
        row of sequence owner[k]."""
        if self.table is None:
            raise RuntimeError("CLEX frequencies used before the weights were loaded")
        qsl, lens, owner, lengths = [0], [], [], []
        for i, s in enumerate(seq_lens):
            a, b = query_start_loc[i], query_start_loc[i + 1]
            first = s - (b - a)
            for lo, hi, length in self.runs(first, s, prompt_lens[i]):
                qsl.append(a + hi - first)
                lens.append(hi)
                owner.append(i)
                lengths.append(length)
        t = clex_scale_index_tensor(torch.tensor(lengths, dtype=torch.int64), self.original_len, self.cfg.max_factor)
        freqs = self.table[t - 1]
        scale = None
        if self.cfg.log_scale:
            scale = clex_log_scale_tensor(torch.tensor(lengths, dtype=torch.int64), self.original_len).tolist()
        return qsl, lens, owner, freqs, scale


def build_clex(hf_config) -> ClexFrequencies | None:
    cfg = clex_config_from_hf_config(hf_config)
    if cfg is None:
        return None
    return ClexFrequencies(cfg, original_len=int(hf_config.max_position_embeddings))
