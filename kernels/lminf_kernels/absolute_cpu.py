"""Λ attention on vLLM's CPU cache layout, keys rotated at their absolute position.

This is the CPU fast path. The cache is the one vLLM's own CPU attention reads (ISA
"vec"): per (block, kv head), B*D key elements stored dim-major ([D][B]) then B*D
value elements token-major ([B][D]). Keys and queries are rotated at their absolute
positions with angles computed in float64 (exact at any position, unlike a float32
angle table), so
  - a local logit <R(p) q, R(j) k> is already at distance p - j, and
  - a global key j is seen at the clamped distance d by rotating the query by d - p + j.
A sequence that never leaves the window is plain causal attention over this cache, so
callers may hand such rows to vLLM's own kernel.

Every row goes to the C++ kernel (`absolute_cpp`, query-tiled for prefill chunks); the
torch code below computes the same result where the kernel is unavailable, and is the
second implementation the tests hold the kernel against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .absolute_cpp import lambda_op, middle_blocks_op, middle_topk_op, rerotate_op
from .paged import (absolute_key_blocks, absolute_views, attend_local, band_mask, from_head_rows,
                    gather_span, global_seen, merge_global, merge_into_rows, to_head_rows)
from .pattern import UNBOUNDED, LambdaPattern
from .raw_torch import DEFAULT_QUERY_TILE
from .rope import RopeStyle, absolute_cos_sin, rotate
from .topk import (MAX_SCORE_ELEMENTS, TopKRows, attend_middle, attend_middle_blocks, middle_count, middle_values,
                   row_rule, summarize_blocks)

# Keys per work item of the C++ kernel when few queries must share the cores (decode: one
# long window split across cores); with many queries (prefill) each tile takes whole windows.
SPLIT_CHUNK_TOKENS = 1024
WHOLE_WINDOW_QUERIES = 1024
# Consecutive queries per tile (capped by the kernel at 16 query-head rows per kv head).
QUERY_TILE = 16


def global_queries(q_abs: torch.Tensor, positions: torch.Tensor, n_keys: int, pattern: LambdaPattern,
                   style: RopeStyle, inv_freq: torch.Tensor) -> torch.Tensor:
    """Queries rotated for each global key: [T, n_keys, Hq, D] float32, entry (t, j) equal
    to R(d - p_t + j) q_abs[t], so that its product with the stored R(j) k_j is the logit
    at distance d."""
    j = torch.arange(n_keys, dtype=torch.int64)
    c, s = absolute_cos_sin(pattern.distance_limit - positions[:, None] + j[None, :], inv_freq)
    q = q_abs[:, None].to(torch.float32).expand(-1, n_keys, -1, -1)
    return rotate(q, c[:, :, None], s[:, :, None], style)


class _UnrotationTables:
    """cos/sin of -j * inv_freq (float32, angles in float64) for key positions j < cap, per
    frequency table: the angles depend only on the position, so every top-k layer and step
    shares them; grown geometrically as sequences grow."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.tables: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, lo: int, hi: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = inv_freq.detach().cpu().numpy().tobytes()
        table = self.tables.get(key)
        if table is None or table[0].shape[0] < hi:
            cap = max(hi, 2 * table[0].shape[0]) if table is not None else max(hi, 4096)
            if table is None and len(self.tables) >= self.keep:
                self.tables.pop(next(iter(self.tables)))
            table = self.tables[key] = absolute_cos_sin(-torch.arange(cap), inv_freq)
        return table[0][lo:hi], table[1][lo:hi]


_UNROTATION = _UnrotationTables()


class _BlockRotationTables:
    """The C++ middle ops' angle tables per (frequencies, block size): cos/sin of j0 f at
    block starts [blocks, R/2] and of b f per slot [R/2, B] (float32, angles in float64),
    shared by every top-k layer and step; grown geometrically."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.tables: dict[tuple[bytes, int], tuple[torch.Tensor, ...]] = {}

    def get(self, n_blocks: int, block_size: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (inv_freq.detach().cpu().numpy().tobytes(), block_size)
        table = self.tables.get(key)
        if table is None or table[0].shape[0] < n_blocks:
            cap = max(n_blocks, 2 * table[0].shape[0]) if table is not None else max(n_blocks, 64)
            if table is None and len(self.tables) >= self.keep:
                self.tables.pop(next(iter(self.tables)))
            blk_cos, blk_sin = absolute_cos_sin(torch.arange(cap) * block_size, inv_freq)
            off_cos, off_sin = absolute_cos_sin(torch.arange(block_size), inv_freq)
            table = self.tables[key] = (blk_cos.contiguous(), blk_sin.contiguous(), off_cos.t().contiguous(),
                                        off_sin.t().contiguous())
        return table[0][:n_blocks], table[1][:n_blocks], table[2], table[3]


_BLOCK_ROTATION = _BlockRotationTables()


def _middle_keys(views, row, hi: int, pattern: LambdaPattern, style: RopeStyle, inv_freq: torch.Tensor):
    """The middle keys [n_global, hi) of one sequence rotated back to raw (R(-j) R(j) k),
    float32 [Hkv, N, D], and a reader of their values by middle index."""
    k_mid, _ = gather_span(views, row, pattern.n_global, hi, with_values=False)
    c, s = _UNROTATION.get(pattern.n_global, hi, inv_freq)
    return rotate(k_mid.to(torch.float32), c, s, style), middle_values(views, row, pattern.n_global)


def _absolute_fetch(views, block_row: torch.Tensor, block_size: int, style: RopeStyle, inv_freq: torch.Tensor):
    """Block mode: a sequence's logical blocks [H, r, k] -> their keys rotated back to raw
    and their values, [H, r, k, B, D] float32."""
    keys, values = views
    heads = torch.arange(keys.shape[1])[:, None, None]

    def fetch(logical: torch.Tensor):
        ids = block_row[logical].long()
        pos = logical[..., None] * block_size + torch.arange(block_size)
        c, s = _UNROTATION.get(0, int(pos.max()) + 1, inv_freq)
        return rotate(keys[ids, heads].to(torch.float32), c[pos], s[pos], style), values[ids, heads].to(torch.float32)

    return fetch


def update_block_summaries(kv_cache: torch.Tensor, summary: torch.Tensor, filled, style: RopeStyle,
                           inv_freq: torch.Tensor) -> None:
    """Block mode: summarize the blocks this step filled, their keys rotated back to raw.
    inv_freq: [R/2], or [num_seqs, R/2] (indexed by the filled blocks' sequences)."""
    ids, first, seq = filled
    if not len(ids):
        return
    keys = absolute_views(kv_cache)[0][ids]  # [n, H, B, D] rotated at absolute positions
    freq = inv_freq if inv_freq.dim() == 1 else inv_freq[seq][:, None, :]
    c, s = absolute_cos_sin(-(first[:, None] + torch.arange(keys.shape[2])), freq)  # [n, B, R/2]
    summary[ids] = summarize_blocks(rotate(keys.to(torch.float32), c[:, None], s[:, None], style))


def _torch_rows(query, kv_cache, row, first_pos, pattern, style, inv_freq, scale, out, query_tile,
                lse_out: torch.Tensor | None = None):
    """Λ attention of one sequence's consecutive queries [first_pos, first_pos + T); each
    row's log-sum-exp into `lse_out` [T, Hq] when given (as the C++ kernel returns it)."""
    tq_all, hq, dh = query.shape
    hkv = kv_cache.shape[1]
    group = hq // hkv
    views = absolute_views(kv_cache)
    span_lo = pattern.local_start(first_pos)
    k_span, v_span = gather_span(views, row, span_lo, first_pos + tq_all)
    # contiguous copies: torch's CPU flash kernel misreads some strided K/V views
    k_span, v_span = k_span.to(torch.float32).contiguous(), v_span.to(torch.float32).contiguous()
    for t0 in range(0, tq_all, query_tile):
        t1 = min(tq_all, t0 + query_tile)
        tq = t1 - t0
        pa, pb = first_pos + t0, first_pos + t1 - 1
        q = query[t0:t1].to(torch.float32)
        q_heads = to_head_rows(q, hkv).reshape(hkv, group * tq, dh)
        lo = pattern.local_start(pa)
        keys = slice(lo - span_lo, pb + 1 - span_lo)
        mask = band_mask(pa, pb, lo, pattern.n_local, group) if tq > 1 else None
        res, lse = attend_local(q_heads, k_span[:, keys], v_span[:, keys], mask, scale)
        g_hi = pattern.global_end(pb)
        if g_hi > 0:
            k_g, v_g = gather_span(views, row, 0, g_hi)
            q_g = global_queries(q, torch.arange(pa, pb + 1), g_hi, pattern, style, inv_freq)  # [tq, g, Hq, D]
            q_g = q_g.view(tq, g_hi, hkv, group, dh).permute(2, 3, 0, 1, 4)  # [Hkv, G, tq, g, D]
            s_g = torch.einsum("hgtjd,hjd->hgtj", q_g, k_g.to(torch.float32)) * scale
            seen = global_seen(pa, pb, g_hi, pattern.n_local)
            s_g = s_g.masked_fill(~seen, float("-inf")).reshape(hkv, group * tq, g_hi)
            res, lse = merge_global(res, lse, s_g, v_g)
        out[t0:t1] = from_head_rows(res, tq).to(out.dtype)
        if lse_out is not None:
            lse_out[t0:t1] = from_head_rows(lse[..., None], tq)[..., 0]


@dataclass
class QueryPlan:
    """Per-step inputs of the C++ kernel for a set of query rows, shared by every layer."""

    token_index: torch.Tensor  # [S] query rows, consecutive per sequence
    rows: torch.Tensor  # [S] block-table row of each query
    lo: torch.Tensor  # [S] first local key
    pos: torch.Tensor  # [S] query position
    n_glob: torch.Tensor  # [S] global keys outside the window
    glob_cos: torch.Tensor  # [S, g_max, R/2]: rotation taking R(p) q to R(d + j) q, contiguous
    glob_sin: torch.Tensor
    chunk_tokens: int  # keys per kernel work item
    leading: bool = False  # token_index == 0..S-1

    @classmethod
    def build(cls, sequences: list[int], query_start_loc: list[int], seq_lens: list[int], pattern: LambdaPattern,
              inv_freq: torch.Tensor) -> "QueryPlan":
        """inv_freq: [R/2] shared, or [num_seqs, R/2] per sequence (CLEX)."""
        counts = [query_start_loc[i + 1] - query_start_loc[i] for i in sequences]
        token_index = torch.cat([torch.arange(query_start_loc[i], query_start_loc[i + 1]) for i in sequences]
                                + [torch.zeros(0, dtype=torch.int64)])
        rows = torch.repeat_interleave(torch.tensor(sequences, dtype=torch.int64),
                                       torch.tensor(counts, dtype=torch.int64))
        # a sequence's queries are its last tokens
        pos = torch.cat([torch.arange(seq_lens[i] - c, seq_lens[i]) for i, c in zip(sequences, counts)]
                        + [torch.zeros(0, dtype=torch.int64)])
        lo, n_glob = pattern.local_start(pos), pattern.global_end(pos)
        g_max = int(n_glob.max()) if len(pos) else 0
        j = torch.arange(g_max, dtype=torch.int64)
        freq = inv_freq if inv_freq.dim() == 1 else inv_freq[rows][:, None, :]
        c, s = absolute_cos_sin(pattern.distance_limit - pos[:, None] + j[None, :], freq)
        chunk = SPLIT_CHUNK_TOKENS if sum(counts) < WHOLE_WINDOW_QUERIES else UNBOUNDED
        leading = torch.equal(token_index, torch.arange(len(token_index)))
        return cls(token_index, rows, lo, pos, n_glob, c.contiguous(), s.contiguous(), chunk, leading)

    def covers(self, n_rows: int) -> bool:
        """Whether the plan's rows are all n_rows query rows, in order (the kernel's output
        rows are then the query's)."""
        return self.leading and self.token_index.shape[0] == n_rows


def kernel_results(query, kv_cache, block_table, plan: QueryPlan, *, style,
                   scale) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The planned query rows through the C++ kernel: (result [S, Hq, D], log-sum-exp
    [S, Hq]), float32, row r answering query row plan.token_index[r]. None if the kernel
    is unavailable."""
    op = lambda_op()
    if op is None:
        return None
    q = (query if plan.covers(query.shape[0]) else query.index_select(0, plan.token_index)).to(torch.float32)
    q = q.contiguous()
    return op(q, plan.glob_cos, plan.glob_sin, kv_cache, block_table, plan.rows, plan.lo, plan.pos, plan.n_glob,
              scale, style.rotary_dim, style.neox, plan.chunk_tokens, QUERY_TILE)


def kernel_rows(query, kv_cache, block_table, plan: QueryPlan, *, style, scale, out,
                lse: torch.Tensor | None = None) -> bool:
    """The planned query rows through the C++ kernel (their log-sum-exp into `lse` [T, Hq]
    when given). Returns False if the kernel is unavailable (nothing written)."""
    if plan.token_index.shape[0] == 0:
        return lambda_op() is not None
    got = kernel_results(query, kv_cache, block_table, plan, style=style, scale=scale)
    if got is None:
        return False
    res, res_lse = got
    if plan.covers(query.shape[0]):
        out.copy_(res)
        if lse is not None:
            lse.copy_(res_lse)
        return True
    out.index_copy_(0, plan.token_index, res.to(out.dtype))
    if lse is not None:
        lse.index_copy_(0, plan.token_index, res_lse)
    return True


@dataclass
class _MiddleInputs:
    """What the C++ middle ops need of one sequence's rows in a step besides the layer's
    query, cache and block-table row: the same for every layer, so built once per step
    (`TopKRows.memo`, which the step's KV-cache groups share)."""

    per_row: torch.Tensor  # exact: middle key count per row (0: no top-k); blocks: last middle position (-1)
    keys_max: int
    tables: tuple[torch.Tensor, ...]  # `_BLOCK_ROTATION` for the rows' middle
    freq: torch.Tensor  # contiguous float32 [R/2]


def _middle_inputs(first_pos: int, tq: int, bs: int, top_k: TopKRows, seq: int, pattern: LambdaPattern,
                   inv_freq: torch.Tensor) -> _MiddleInputs:
    # inv_freq keyed by address: the memo holds it, so no other tensor can take its place
    key = (seq, first_pos, tq, bs, pattern, inv_freq.data_ptr(), inv_freq.stride(0))
    hit = top_k.memo.get(key)
    if hit is not None:
        return hit[0]
    pos = torch.arange(first_pos, first_pos + tq)
    if top_k.blocks:  # per row its last middle position, -1 where the row does not use top-k
        per_row = torch.where(pos >= top_k.first_pos[seq], pos - pattern.n_local, torch.full_like(pos, -1))
        keys_max = max(0, int(per_row.max()) + 1 - pattern.n_global)
    else:  # per row its middle key count, 0 where the row does not use top-k
        per_row = middle_count(pos, pattern)
        per_row = torch.where((pos >= top_k.first_pos[seq]) & (per_row >= top_k.k), per_row, torch.zeros_like(per_row))
        keys_max = int(per_row.max())
    tables = _BLOCK_ROTATION.get((pattern.n_global + max(keys_max, 1) - 1) // bs + 1, bs, inv_freq)
    inputs = _MiddleInputs(per_row, keys_max, tables, inv_freq.contiguous())
    top_k.memo[key] = (inputs, inv_freq)
    return inputs


def _kernel_merge(query, kv_cache, row, first_pos: int, top_k: TopKRows, seq: int, pattern: LambdaPattern,
                  style: RopeStyle, inv_freq, scale: float, out, lse, block_summary) -> bool:
    """The middle partial of one sequence's rows (queries at absolute positions from
    first_pos) merged into their Λ result (out, lse) in place by the C++ ops, as the torch
    code below computes it. row: the sequence's block-table row (int32 or int64). False
    (nothing written) when the ops are unavailable."""
    op = middle_blocks_op() if top_k.blocks else middle_topk_op()
    if op is None or not (out.is_contiguous() and lse.is_contiguous()):
        return False
    tq, hq = query.shape[:2]
    m = _middle_inputs(first_pos, tq, kv_cache.shape[2], top_k, seq, pattern, inv_freq)
    summary = (block_summary,) if top_k.blocks else ()
    args = (*m.tables, top_k.k, scale, style.rotary_dim, style.neox, m.freq, top_k.distance)
    # exact mode's logit buffer is bounded by chunks of rows; block mode keeps no such buffer
    step = tq if top_k.blocks else max(1, MAX_SCORE_ELEMENTS // max(1, hq * m.keys_max))
    if step >= tq:  # one call (decode): no slicing
        op(query, kv_cache, row, m.per_row, pattern.n_global, *summary, *args, first_pos, out, lse)
        return True
    for a in range(0, tq, step):
        op(query[a:a + step], kv_cache, row, m.per_row[a:a + step], pattern.n_global, *summary, *args, first_pos + a,
           out[a:a + step], lse[a:a + step])
    return True


def _merge_middle(query, kv_cache, row, first_pos, pattern, style, inv_freq, scale, out, lse, top_k: TopKRows,
                  seq: int, block_summary, use_extension: bool = True) -> None:
    """Top-k rows of one sequence whose Λ result (out [T, Hq, D], lse [T, Hq]) is computed:
    their middle partial softmax merged in (the C++ ops when available, else torch)."""
    skip = max(0, top_k.first_pos[seq] - first_pos)  # rows before the rule's first position stay Λ
    if skip:
        query, out, lse, first_pos = query[skip:], out[skip:], lse[skip:], first_pos + skip
    if use_extension and _kernel_merge(query, kv_cache, row, first_pos, top_k, seq, pattern, style, inv_freq, scale,
                                       out, lse, block_summary):
        return
    tq, hq, dh = query.shape
    hkv = kv_cache.shape[1]
    group = hq // hkv
    views = absolute_views(kv_cache)
    pos = torch.arange(first_pos, first_pos + tq)
    c, s = absolute_cos_sin(top_k.distance - pos, inv_freq)
    q = rotate(query.to(torch.float32), c[:, None], s[:, None], style)  # R(distance) q_raw
    counts, use = row_rule(pos, top_k.first_pos[seq], top_k.k, pattern, group)
    q_mid = to_head_rows(q, hkv).reshape(hkv, group * tq, dh)
    if top_k.blocks:
        fetch = _absolute_fetch(views, row, top_k.block_size, style, inv_freq)
        part = attend_middle_blocks(q_mid, block_summary, row, fetch, (pos - pattern.n_local).repeat(group), use,
                                    top_k.k, scale, top_k.block_size, pattern.n_global)
    else:
        k_mid, values = _middle_keys(views, row, first_pos + tq - pattern.n_local, pattern, style, inv_freq)
        part = attend_middle(q_mid, k_mid, values, counts, use, top_k.k, scale)
    merge_into_rows(out, lse, part)


def lambda_attention_absolute(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                              query_start_loc: list[int], seq_lens: list[int], *, pattern: LambdaPattern,
                              style: RopeStyle, inv_freq: torch.Tensor, scale: float,
                              out: torch.Tensor | None = None, query_tile: int = DEFAULT_QUERY_TILE,
                              use_extension: bool = True, plan: QueryPlan | None = None,
                              sequences: list[int] | None = None, top_k: TopKRows | None = None,
                              block_summary: torch.Tensor | None = None) -> torch.Tensor:
    """Λ attention for a batch (prefill chunks and decodes mixed).

    query: [T, Hq, D] rotated at absolute positions (`absolute_cos_sin`), sequence i
    owning rows query_start_loc[i]:query_start_loc[i+1], its queries being the last
    tokens of its seq_lens[i] tokens. kv_cache holds this step's keys already (rotated
    the same way, `paged.store_kv(paged.absolute_views(kv_cache), ...)`). inv_freq: [R/2], or
    [num_seqs, R/2] per sequence (CLEX), float32. plan: the step's `QueryPlan` for exactly
    `sequences` (built here when not given). sequences: compute only these (others' output
    rows are left untouched). use_extension=False: torch only. top_k: the step's top-k rule
    (None: Λ only): the C++ kernel (or the torch code) computes Λ and its log-sum-exp, the
    middle partial of the rows that use top-k is merged in (`topk.py`). block_summary: the layer's block
    summaries (block mode, `update_block_summaries`).
    """
    if out is None:
        out = torch.empty_like(query)
    inv_freq = inv_freq.to(torch.float32)
    todo = range(len(seq_lens)) if sequences is None else sequences
    todo = [i for i in todo if query_start_loc[i + 1] > query_start_loc[i]]
    with_top_k = [i for i in todo if top_k is not None and top_k.uses(i, seq_lens[i] - 1, pattern)]
    # acc: the Λ result; with top-k it stays float32 with its log-sum-exp (lse) until the
    # middle partials are merged in, then is rounded to out's dtype once
    acc, lse, on_kernel = out, None, False
    if todo and use_extension:
        if plan is None:
            plan = QueryPlan.build(todo, query_start_loc, seq_lens, pattern, inv_freq)
        if block_table.dtype != torch.int32:
            block_table = block_table.to(torch.int32)
        if with_top_k and plan.covers(query.shape[0]):
            got = kernel_results(query, kv_cache, block_table, plan, style=style, scale=scale)
            if got is not None:  # every row planned (decode): the kernel's own outputs are acc and lse
                (acc, lse), on_kernel = got, True
    if with_top_k and lse is None:
        lse = query.new_empty(query.shape[:2], dtype=torch.float32)
        if out.dtype != torch.float32:
            acc = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    if todo and use_extension and not on_kernel:
        on_kernel = kernel_rows(query, kv_cache, block_table, plan, style=style, scale=scale, out=acc, lse=lse)
    n_rows = query.shape[0]
    for i in todo:
        a, b = query_start_loc[i], query_start_loc[i + 1]
        freq = inv_freq if inv_freq.dim() == 1 else inv_freq[i]
        whole = a == 0 and b == n_rows  # one sequence (a decode step at batch 1): no slicing
        q_i, acc_i = (query, acc) if whole else (query[a:b], acc[a:b])
        lse_i = lse if whole or lse is None else lse[a:b]
        if not on_kernel:
            _torch_rows(q_i, kv_cache, block_table[i], seq_lens[i] - (b - a), pattern, style, freq, scale, acc_i,
                        query_tile, lse_i)
        if i in with_top_k:
            _merge_middle(q_i, kv_cache, block_table[i], seq_lens[i] - (b - a), pattern, style, freq, scale, acc_i,
                          lse_i, top_k, i, block_summary, use_extension)
    if acc is not out:
        if sum(query_start_loc[i + 1] - query_start_loc[i] for i in todo) == n_rows:
            out.copy_(acc)
        else:  # rows of other sequences stay untouched
            for i in todo:
                out[query_start_loc[i]:query_start_loc[i + 1]] = acc[query_start_loc[i]:query_start_loc[i + 1]]
    return out


def rerotate_keys(kv_cache: torch.Tensor, block_row: torch.Tensor, lo: int, hi: int, delta_freq: torch.Tensor,
                  style: RopeStyle) -> None:
    """Turn the cached keys of positions [lo, hi) of one sequence, rotated at their absolute
    position with frequencies f, into the same keys rotated with f + delta_freq (CLEX's
    frequencies changing with t): R((f + δ) j) = R(δ j) R(f j), angles in float64."""
    if hi <= lo:
        return
    keys, _ = absolute_views(kv_cache)
    pos = torch.arange(lo, hi)
    bs = keys.shape[2]
    blk, off = block_row[pos // bs].long(), pos % bs
    c, s = absolute_cos_sin(pos, delta_freq)
    keys[blk, :, off] = rotate(keys[blk, :, off], c[:, None], s[:, None], style).to(keys.dtype)


@dataclass
class Rerotation:
    """`rerotate_keys` for a run of whole blocks, prepared once per step and applied per
    layer in the cache's own key layout ([D][B] per block and head): the blocks holding
    positions [lo, hi), cos/sin of δ·j per channel pair and slot ([nb, R/2, B], float32,
    angles in float64), and which slots are in [lo, hi) (the rest stay bit for bit)."""

    blocks: torch.Tensor  # [nb] block ids
    cos: torch.Tensor
    sin: torch.Tensor
    inside: torch.Tensor  # [nb, 1, B] bool
    lo: int  # the same as a slot range counted from the first block's slot 0
    hi: int

    @classmethod
    def plan(cls, block_row: torch.Tensor, lo: int, hi: int, delta_freq: torch.Tensor,
             block_size: int) -> Rerotation | None:
        if hi <= lo:
            return None
        first, end = lo // block_size, -(-hi // block_size)
        pos = torch.arange(first * block_size, end * block_size).view(end - first, block_size)
        c, s = absolute_cos_sin(pos.reshape(-1), delta_freq)  # [nb * B, R/2]
        c = c.view(end - first, block_size, -1).transpose(1, 2).contiguous()
        s = s.view(end - first, block_size, -1).transpose(1, 2).contiguous()
        inside = ((pos >= lo) & (pos < hi))[:, None, :]
        start = first * block_size
        return cls(block_row[first:end].long().contiguous(), c, s, inside, lo - start, hi - start)


def rerotate_blocks(kv_cache: torch.Tensor, plan: Rerotation, style: RopeStyle, *, use_extension: bool = True,
                    key_layout: str = "vec") -> None:
    """Apply a `Rerotation` to one layer's cache, in place: the C++ op (one pass over the
    keys, both cores), else one gather, a float32 rotation over [nb, H, D, B] and one
    scatter. Both give the bits of the per-position `rerotate_keys`, their reference.

    key_layout: "vec" (keys [D][B] per block and head, what every other op here reads) or
    "amx" ([B/16][D/2][16][2]: vLLM's layout for bf16 on AMX CPUs, used where nothing but
    vLLM's own kernel and this op reads the cache, as with CLEX alone)."""
    keys_t = absolute_key_blocks(kv_cache, key_layout)  # validates the layout
    op = rerotate_op() if use_extension else None
    if op is not None:
        op(kv_cache, plan.blocks, plan.cos, plan.sin, plan.lo, plan.hi, style.rotary_dim, style.neox,
           key_layout == "amx")
        return
    _, h, bs, d2 = kv_cache.shape
    x = keys_t[plan.blocks].reshape(len(plan.blocks), h, d2 // 2, bs).to(torch.float32)  # [nb, H, D, B]
    r = style.rotary_dim
    if style.neox:
        x1, x2 = x[:, :, : r // 2], x[:, :, r // 2 : r]
    else:
        x1, x2 = x[:, :, 0:r:2], x[:, :, 1:r:2]
    c, s, inside = plan.cos[:, None], plan.sin[:, None], plan.inside[:, None]
    y1 = torch.where(inside, x1 * c - x2 * s, x1)
    y2 = torch.where(inside, x2 * c + x1 * s, x2)
    if style.neox:
        x[:, :, : r // 2], x[:, :, r // 2 : r] = y1, y2
    else:
        x[:, :, 0:r:2], x[:, :, 1:r:2] = y1, y2
    keys_t[plan.blocks] = x.to(kv_cache.dtype).view((len(plan.blocks),) + keys_t.shape[1:])
