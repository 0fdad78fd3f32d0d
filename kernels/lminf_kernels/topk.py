"""Top-k middle attention: LM-Infinite's retrieval variant, as a partial softmax merged
into the Λ result.

A query row at position p that uses top-k also sees, per query head, the `k` keys of the
middle  n_global <= j <= p - n_local  with the largest logit  <R(distance) q_raw, k_raw> * scale,
at that logit, in the same softmax as its global and window keys. A row whose middle holds
fewer than `k` keys is plain Λ. Which rows use it is the caller's choice (`TopKRows`):
the reference applies it to the last prompt row and every generated row.

The torch paths (`raw_torch`, `absolute_cpu`) call `attend_middle` for a tile of rows
after their local softmax and merge with `merge_partials`; `naive.py` is the dense
reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pattern import LambdaPattern

# Logit elements per `attend_middle` chunk (rows x middle keys x kv heads), ~64 MiB in float32.
MAX_SCORE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class TopKRows:
    """The top-k rule of one step: k, the scoring distance, and per sequence the first
    query position whose row uses it (a larger value than any position: none)."""

    k: int
    distance: int
    first_pos: list[int]

    def uses(self, i: int, last_pos: int, pattern: LambdaPattern) -> bool:
        """Whether any row of sequence i, whose last query is at `last_pos`, uses top-k."""
        return last_pos >= self.first_pos[i] and middle_count(last_pos, pattern) >= self.k


def middle_count(p, pattern: LambdaPattern):
    """Keys in the middle of query position p (int or integer tensor): n_global <= j <= p - n_local."""
    count = p - pattern.n_local + 1 - pattern.n_global
    return count.clamp(min=0) if isinstance(count, torch.Tensor) else max(0, count)


def row_rule(positions: torch.Tensor, first_pos: int, k: int, pattern: LambdaPattern, group: int):
    """For tile rows (query head in group, token) of consecutive positions: how many
    middle keys each sees and whether it uses top-k, each [group * T]."""
    counts = middle_count(positions, pattern)
    use = (positions >= first_pos) & (counts >= k)
    return counts.repeat(group), use.repeat(group)


def attend_middle(q: torch.Tensor, k_mid: torch.Tensor, v_mid: torch.Tensor, counts: torch.Tensor,
                  use: torch.Tensor, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k partial softmax of rows q [H, M, D] over middle keys k_mid / v_mid [H, N, D]
    (key i at position n_global + i, in the frame where <q, k_mid> is the logit at the
    scoring distance). Row m may see keys i < counts[m]; rows with use[m] False (or fewer
    than k keys) get lse = -inf and output 0. Returns (output [H, M, Dv], lse [H, M])."""
    h, m, _ = q.shape
    dv = v_mid.shape[-1]
    out = q.new_zeros(h, m, dv)
    lse = q.new_full((h, m), float("-inf"))
    rows = torch.nonzero(use & (counts >= k)).flatten()
    if len(rows) == 0:
        return out, lse
    n = int(counts[rows].max())
    k_mid, v_mid = k_mid[:, :n], v_mid[:, :n]
    step = max(1, MAX_SCORE_ELEMENTS // max(1, h * n))
    key_index = torch.arange(n)
    for c in range(0, len(rows), step):
        r = rows[c:c + step]
        s = torch.bmm(q[:, r], k_mid.transpose(1, 2)) * scale  # [H, r, n]
        s = s.masked_fill((key_index[None, :] >= counts[r][:, None])[None], float("-inf"))
        top, idx = s.topk(k, dim=-1)  # [H, r, k]
        v_sel = torch.gather(v_mid, 1, idx.reshape(h, -1, 1).expand(-1, -1, dv)).view(h, len(r), k, dv)
        lse_r = torch.logsumexp(top, dim=-1)
        p = torch.exp(top - lse_r[..., None])
        out[:, r] = torch.einsum("hrk,hrkd->hrd", p, v_sel.to(p.dtype))
        lse[:, r] = lse_r
    return out, lse


def merge_partials(res: torch.Tensor, lse: torch.Tensor, res2: torch.Tensor,
                   lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax from two partial ones over disjoint key sets: (output [H, M, Dv],
    lse [H, M]) each; `lse` must be finite (every row sees its own key), `lse2` may be -inf."""
    top = torch.maximum(lse, lse2)
    w1, w2 = torch.exp(lse - top), torch.exp(lse2 - top)
    total = w1 + w2
    return (res * w1[..., None] + res2 * w2[..., None]) / total[..., None], top + torch.log(total)
