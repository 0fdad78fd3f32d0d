"""The CPU fast path: keys rotated at absolute positions, in vLLM's own CPU cache layout.

`AbsoluteRotary` replaces the model's rotary module: q and k are rotated at each token's
absolute position with angles taken in float64, inside the compiled graph, and vLLM's
own `do_kv_cache_update` stores the keys. A local logit is then already at distance
p - j; a global key j is read with the query rotated by d - p + j (the clamped distance d).

Per step, sequences no longer than the window are plain causal attention: they go to
vLLM's own CPU attention code (its metadata builder and impl, reused through
subclassing). Decodes and prefill chunks past the window go to the C++ kernel
(`lminf_kernels.absolute_cpu`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn
from vllm.config import get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.platforms import CpuArchEnum, current_platform
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from lminf_kernels.absolute_cpp import lambda_op
from lminf_kernels.absolute_cpu import (QueryPlan, Rerotation, lambda_attention_absolute,
                                        rerotate_blocks, update_block_summaries)
from lminf_kernels.paged import KEY_LAYOUTS
from lminf_kernels.pattern import LambdaPattern
from lminf_kernels.rope import RopeStyle, absolute_cos_sin, rotate

from .. import vllm_compat
from ..clex import clex_log_scale_tensor, clex_scale_index_tensor
from lminf_kernels.topk import TopKRows

from .common import (STEP_SHARE, BlockSummaries, LambdaBackend, StepBatch, group_top_k, no_work,
                     refuse_unsupported, step_top_k)

from . import ABSOLUTE as NAME
from . import ABSOLUTE_CLEX as CLEX_NAME
# vLLM CPU attention ISA whose cache layout our C++ kernel reads (keys dim-major per
# block). vLLM would pick "amx" for bf16 on AMX machines; its "vec" kernel runs on every x86.
# Groups whose rows never reach our kernels keep vLLM's pick (`cache_isa`).
ISA = "vec"


def cache_isa(vllm_pick: str, own_kernels: bool) -> str:
    """The cache layout (named by vLLM's CPU attention ISA) of one KV-cache group. Where a
    row may reach our C++ kernels (past the window, top-k) it is "vec", which they read.
    Otherwise (CLEX alone, or a window longer than any sequence) only vLLM's kernel and the
    CLEX re-rotation, which reads "vec" and "amx", touch the cache: vLLM's own pick stays, so
    on AMX CPUs those layers run vLLM's AMX kernel (~3x "vec" at 32K here)."""
    return vllm_pick if not own_kernels and vllm_pick in KEY_LAYOUTS else ISA


def supported(head_size: int) -> bool:
    """vLLM's x86 CPU kernels with a head size their "vec" layout takes."""
    return (
        current_platform.is_cpu()
        and current_platform.get_cpu_architecture() == CpuArchEnum.X86
        and head_size % 32 == 0
    )


class AbsoluteRotary(nn.Module):
    """RoPE at each token's absolute position, angles taken in float64 (stock's float32
    table loses ~0.06 rad at position 10^6)."""

    def __init__(self, source: nn.Module, style: RopeStyle, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.head_size = source.head_size
        self.rotary_dim = source.rotary_dim
        self.is_neox_style = source.is_neox_style
        self.style = style
        self.inv_freq64 = inv_freq.to(torch.float64)  # an attribute, not a buffer: never cast by .to(dtype)

    def forward(self, positions, query, key=None):
        cos, sin = absolute_cos_sin(positions, self.inv_freq64)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads

        def rot(x):
            shape = x.shape
            x = x.view(shape[0], -1, self.head_size)
            return rotate(x, cos, sin, self.style).to(x.dtype).view(shape)

        return rot(query), None if key is None else rot(key)


@dataclass
class Wave:
    """Query rows attended together. Their sequences (with CLEX: runs of rows at one t,
    each a pseudo-sequence ending at its last row) find every key they read in the cache,
    rotated with their frequencies, once the wave's own keys are stored."""

    rows: torch.Tensor | None  # the step's rows in this wave, None: every row in order
    batch: StepBatch  # its sequences, rows numbered within the wave
    inv_freq: torch.Tensor  # [R/2], or [len(batch.seq_lens), R/2] per sequence (CLEX)
    inside: CPUAttentionMetadata | None  # vLLM's metadata for sequences inside the window
    inside_rows: torch.Tensor | None  # their rows within the wave, None: every row of the wave
    beyond: list[int]  # the other sequences: our kernel
    plan: QueryPlan | None  # our kernel's inputs for them
    top_k: TopKRows | None = None  # top-k layers: the step's rule, per wave sequence
    # CLEX only (q and k arrive unrotated): per-row rotation (vLLM's rotary op over a
    # cos|sin table with one row per wave row, angles taken in float64) and query scale,
    # the wave's cache slots, and the cached keys to re-rotate before the wave because
    # their sequence's t stepped up (angles computed here, once per step, for every layer).
    cos_sin: torch.Tensor | None = None
    table_rows: torch.Tensor | None = None  # 0..rows-1: row i of cos_sin rotates wave row i
    row_scale: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    rerotate: list[Rerotation] = field(default_factory=list)


@dataclass
class AbsoluteMetadata:
    num_actual_tokens: int
    waves: list[Wave]


class AbsoluteMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        impls = {id(layer.impl): layer.impl
                 for layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).values()}
        impl = next(iter(impls.values()))
        if any(i.pattern != impl.pattern or i.clex is not impl.clex or not torch.equal(i.inv_freq, impl.inv_freq)
               for i in impls.values()):
            raise ValueError("vllm-lminf: all layers of one KV-cache group must share one Λ pattern and RoPE")
        self.pattern, self.clex = impl.pattern, impl.clex
        # one tensor for every group's builder: the top-k memo knows it by its address
        freq = impl.inv_freq.to(torch.float32)
        self._freq_key = tuple(freq.tolist())
        self.inv_freq = STEP_SHARE.get(("inv_freq", self._freq_key), lambda: freq)
        self.top_k = group_top_k(impls.values(), kv_cache_spec.block_size, impl.pattern.n_local)
        beyond_possible = impl.pattern.n_local < vllm_config.model_config.max_model_len
        vllm_compat.force_cpu_attention_isa(self, cache_isa(vllm_compat.cpu_attention_isa(self),
                                                            own_kernels=beyond_possible or self.top_k is not None))
        if self.clex is not None:
            vllm_compat.track_prompt_lengths()

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AbsoluteMetadata:
        m = common_attn_metadata
        batch = StepBatch.of(m)
        if self.clex is None:
            top_k = step_top_k(self.top_k, m.num_reqs, None, batch, self.kv_cache_spec.block_size, shared=True)
            return AbsoluteMetadata(batch.num_actual_tokens, [self._wave(m, batch, None, self.inv_freq, top_k)])
        return AbsoluteMetadata(batch.num_actual_tokens, self._clex_waves(m, batch))

    def _wave(self, m: CommonAttentionMetadata, batch: StepBatch, rows: torch.Tensor | None,
              inv_freq: torch.Tensor, top_k: TopKRows | None) -> Wave:
        # A sequence no longer than the window has no global branch and a window that
        # covers everything: plain causal attention, vLLM's kernel.
        inside = [i for i, s in enumerate(batch.seq_lens) if s <= self.pattern.n_local]
        beyond = [i for i, s in enumerate(batch.seq_lens) if s > self.pattern.n_local]
        vllm_md, inside_rows = None, None
        if inside:
            if rows is None and not beyond:
                vllm_md = super().build(0, m)  # the step as vLLM built it
            else:
                sub, inside_rows = _subset(m, batch, inside)
                vllm_md = super().build(0, sub)
        plan = None
        if beyond:
            def make():
                return QueryPlan.build(beyond, batch.query_start_loc, batch.seq_lens, self.pattern, inv_freq)
            # the model's frequencies (not a CLEX wave's): the batch decides the plan, every group shares it
            plan = STEP_SHARE.get(("plan", tuple(beyond), tuple(batch.query_start_loc), tuple(batch.seq_lens),
                                   self.pattern, self._freq_key), make) if inv_freq is self.inv_freq else make()
        return Wave(rows, batch, inv_freq, vllm_md, inside_rows, beyond, plan, top_k)

    def _clex_waves(self, m: CommonAttentionMetadata, batch: StepBatch) -> list[Wave]:
        """Wave w holds the w-th run of one t of every sequence (one wave but for a chunk
        that crosses a step of t, as in recompute after preemption)."""
        clex, pattern = self.clex, self.pattern
        prompt_lens = vllm_compat.prompt_lengths(m.num_reqs)
        qsl, lens = batch.query_start_loc, batch.seq_lens
        firsts = [s - (qsl[i + 1] - qsl[i]) for i, s in enumerate(lens)]
        runs = [clex.runs(first, s, p) for first, s, p in zip(firsts, lens, prompt_lens)]
        # t of the keys a sequence holds: those of its previous step's last row
        held = [clex.t_of(max(p, first)) if first > 0 else None for first, p in zip(firsts, prompt_lens)]
        table = clex.table
        waves = []
        for w in range(max((len(r) for r in runs), default=0)):
            rows, wave_qsl, wave_lens, owners, lengths, rerotate = [], [0], [], [], [], []
            for i, seq_runs in enumerate(runs):
                if w >= len(seq_runs):
                    continue
                lo, hi, length = seq_runs[w]
                t = clex.t_of(length)
                if held[i] is not None and held[i] != t:
                    delta = table[t - 1].double() - table[held[i] - 1].double()
                    # top-k layers read their middle too: every held key follows the new t
                    for a, b in (_read_later(pattern, lo) if self.top_k is None else [(0, lo)]):
                        plan = Rerotation.plan(batch.block_table[i], a, b, delta, self.kv_cache_spec.block_size)
                        if plan is not None:
                            rerotate.append(plan)
                held[i] = t
                start = qsl[i] + lo - firsts[i]
                rows.append(torch.arange(start, start + hi - lo))
                wave_qsl.append(wave_qsl[-1] + hi - lo)
                wave_lens.append(hi)
                owners.append(i)
                lengths.append(length)
            row_index = torch.cat(rows)
            owner = torch.tensor(owners, dtype=torch.long)
            sub = StepBatch(num_actual_tokens=len(row_index), query_start_loc=wave_qsl, seq_lens=wave_lens,
                            block_table=batch.block_table[owner],
                            query_start_loc_dev=torch.tensor(wave_qsl, dtype=torch.int32),
                            seq_lens_dev=torch.tensor(wave_lens, dtype=torch.int32))
            lengths_t = torch.tensor(lengths, dtype=torch.int64)
            freqs = table[clex_scale_index_tensor(lengths_t, clex.original_len, clex.cfg.max_factor) - 1]
            # one run per sequence and no padding rows: the wave is the step itself, as vLLM described it
            every_row = w == 0 and all(len(r) == 1 for r in runs) and len(row_index) == batch.num_actual_tokens
            top_k = step_top_k(self.top_k, m.num_reqs, owners, sub, self.kv_cache_spec.block_size)
            if every_row:
                wave = self._wave(m, batch, None, freqs, top_k)
            else:
                wave = self._wave(_pseudo(m, sub, m.slot_mapping[row_index]), sub, row_index, freqs, top_k)
            # rotation of each row at its absolute position with its run's frequencies
            counts = torch.tensor([b - a for a, b in zip(wave_qsl, wave_qsl[1:])])
            positions = torch.cat([torch.arange(n - c, n) for n, c in zip(wave_lens, counts.tolist())])
            cos, sin = absolute_cos_sin(positions, freqs.repeat_interleave(counts, 0))
            wave.cos_sin = torch.cat((cos, sin), dim=-1).to(self.dtype)
            if clex.cfg.log_scale:
                scale = clex_log_scale_tensor(lengths_t, clex.original_len).repeat_interleave(counts)
                wave.row_scale = scale[:, None, None].to(self.dtype)
            wave.slots = m.slot_mapping[row_index]
            wave.table_rows = torch.arange(len(row_index))
            wave.rerotate = rerotate
            waves.append(wave)
        return waves


def _read_later(pattern: LambdaPattern, p: int) -> list[tuple[int, int]]:
    """Key positions < p that some query at a position >= p may still read: the global
    tokens and the window of p (nothing between them is read again)."""
    window = pattern.local_start(p)
    if window <= pattern.n_global:
        return [(0, p)]
    return [(0, pattern.n_global), (window, p)]


def _subset(m: CommonAttentionMetadata, batch: StepBatch, seqs: list[int]) -> tuple[CommonAttentionMetadata, torch.Tensor]:
    """vLLM's metadata for the sequences `seqs` of `batch` (which `m` describes), and their rows."""
    qsl = batch.query_start_loc
    rows = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i in seqs])
    sub_qsl = [0] + list(itertools.accumulate(qsl[i + 1] - qsl[i] for i in seqs))
    lens = [batch.seq_lens[i] for i in seqs]
    sub = StepBatch(num_actual_tokens=len(rows), query_start_loc=sub_qsl, seq_lens=lens,
                    block_table=batch.block_table[torch.tensor(seqs)],
                    query_start_loc_dev=torch.tensor(sub_qsl, dtype=torch.int32),
                    seq_lens_dev=torch.tensor(lens, dtype=torch.int32))
    return _pseudo(m, sub, m.slot_mapping[rows]), rows


def _pseudo(m: CommonAttentionMetadata, batch: StepBatch, slots: torch.Tensor) -> CommonAttentionMetadata:
    """vLLM's metadata describing `batch` (pseudo-sequences over the same block tables)."""
    qsl = torch.tensor(batch.query_start_loc, dtype=torch.int32)
    return m.replace(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=torch.tensor(batch.seq_lens, dtype=torch.int32),
        num_reqs=len(batch.seq_lens), num_actual_tokens=batch.num_actual_tokens,
        max_query_len=max(b - a for a, b in zip(batch.query_start_loc, batch.query_start_loc[1:])),
        max_seq_len=max(batch.seq_lens), block_table_tensor=batch.block_table, slot_mapping=slots, positions=None,
        _num_computed_tokens_cache=None, _token_to_req_indices_cache=None,
    )


class AbsoluteImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, *vllm_args,
                 pattern: LambdaPattern, style: RopeStyle, inv_freq: torch.Tensor, clex=None, top_k=None,
                 **vllm_kwargs) -> None:
        refuse_unsupported(*vllm_args, **vllm_kwargs)
        super().__init__(num_heads, head_size, scale, num_kv_heads, None, None, "auto")
        self.pattern, self.style, self.inv_freq, self.clex = pattern, style, inv_freq, clex
        self.top_k = top_k  # TopKConfig when this layer attends the top-k middle keys
        self.summaries = BlockSummaries()  # block mode
        # build/load the C++ kernels now, at start-up: not inside the first request that needs them
        lambda_op()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: AbsoluteMetadata | None, output,
                output_scale=None, output_block_scale=None) -> torch.Tensor:
        if no_work(attn_metadata, output_scale, output_block_scale):
            return output
        n = attn_metadata.num_actual_tokens
        query, output = query[:n], output[:n]
        for wave in attn_metadata.waves:
            q = query if wave.rows is None else query.index_select(0, wave.rows)
            out = output if wave.rows is None else q.new_empty(q.shape)
            if self.clex is not None:
                q = self._rotate_and_store(layer, wave, q, key[:n], value[:n], kv_cache)
            self._attend(layer, wave, q, kv_cache, out)
            if wave.rows is not None:
                output.index_copy_(0, wave.rows, out.to(output.dtype))
        return output

    def _rotate_and_store(self, layer, wave: Wave, q, key, value, kv_cache) -> torch.Tensor:
        """CLEX: bring held keys to the wave's t, rotate its q and k rows (in place, as
        vLLM's own rotary does), store its K/V."""
        from vllm import _custom_ops as ops

        for plan in wave.rerotate:
            rerotate_blocks(kv_cache, plan, self.style, key_layout=layer.isa)
        if wave.rows is not None:
            key, value = key.index_select(0, wave.rows), value.index_select(0, wave.rows)
        if wave.row_scale is not None:
            q = q * wave.row_scale
        q2, k2 = q.flatten(1), key.flatten(1)  # the op takes [tokens, heads * head_size], rotates in place
        ops.rotary_embedding(wave.table_rows, q2, k2, self.head_size, wave.cos_sin, self.style.neox)
        super().do_kv_cache_update(layer, k2.view_as(key), value, kv_cache, wave.slots)
        return q2.view_as(q)

    def _attend(self, layer, wave: Wave, q, kv_cache, out) -> None:
        if wave.inside is not None:
            if wave.inside_rows is None:
                super().forward(layer, q, None, None, kv_cache, wave.inside, out)
            else:
                sub_out = q.new_empty(q[: len(wave.inside_rows)].shape)
                super().forward(layer, q.index_select(0, wave.inside_rows), None, None, kv_cache, wave.inside,
                                sub_out)
                out.index_copy_(0, wave.inside_rows, sub_out.to(out.dtype))
        b = wave.batch
        top_k = wave.top_k if self.top_k is not None else None
        summary = None
        if top_k is not None and top_k.blocks:
            # every block the step fills, also of sequences inside the window (read later)
            summary = self.summaries.of(kv_cache)
            update_block_summaries(kv_cache, summary, top_k.filled, self.style, wave.inv_freq)
        if wave.beyond:
            lambda_attention_absolute(q, kv_cache, b.block_table, b.query_start_loc, b.seq_lens,
                                      pattern=self.pattern, style=self.style, inv_freq=wave.inv_freq,
                                      scale=self.scale, out=out, sequences=wave.beyond, top_k=top_k,
                                      block_summary=summary, plan=wave.plan)


class AbsoluteBackend(LambdaBackend, CPUAttentionBackend):
    """vLLM's CPU backend (cache layout, kv-cache update) with the Λ kernel past the window."""

    NAME, IMPL, BUILDER = NAME, AbsoluteImpl, AbsoluteMetadataBuilder


class AbsoluteClexBackend(AbsoluteBackend):
    """The same with CLEX: q and k arrive unrotated (their t depends on the step), so the
    impl rotates them and stores the keys itself."""

    NAME = CLEX_NAME
    forward_includes_kv_cache_update = True
