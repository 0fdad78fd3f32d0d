"""Steps an in-process LLM (VLLM_ENABLE_V1_MULTIPROCESSING=0) request by request and
watches the KV pool while it works: peak blocks held per request, free blocks, preemptions.
Used by the tests and benchmarks as probes of `helpers.engine.run_engine(probe=...)`:
module-level functions `probe(llm, results, **args)` that return plain data."""

from __future__ import annotations

import torch


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def kv_manager(llm):
    return _core(llm).scheduler.kv_cache_manager


def kv_caches(llm) -> list[torch.Tensor]:
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.kv_caches


POISON = 1.0e4


def poison_free_blocks(llm) -> int:
    """Fill every block the pool currently holds free (freed middle blocks included:
    their ids stay stale in the worker's block table) with POISON.

    POISON is huge but finite: read as a key or value it changes the output by orders of
    magnitude, while a masked read stays harmless. (vLLM's own CPU kernel, which the
    plugin uses for sequences inside the window, reads the unwritten tail of a partly
    filled block and masks it; 0 * NaN would flag that legitimate read.)"""
    pool = kv_manager(llm).block_pool
    ids = [b.block_id for b in pool.free_block_queue.get_all_free_blocks() if not b.is_null]
    if ids:
        idx = torch.tensor(ids)
        for cache in kv_caches(llm):
            cache[idx] = POISON
    return len(ids)


def track(llm, prompts, *, max_tokens, abort=None, poison=False, logprobs=True):
    """Run prompts to completion (or abort), recording per-request peak held blocks.

    abort: {index: "prefill" | "decode"} aborts request i once it is mid-prefill or
    has produced its first tokens. Returns plain data.
    """
    from vllm import SamplingParams, TokensPrompt

    mgr = kv_manager(llm)
    managers = mgr.coordinator.single_type_managers
    # the Λ group's manager when there is one (top-k layers add keep-all groups beside it)
    single = next((m for m in managers if type(m).__name__ == "LambdaAttentionManager"), managers[0])
    pool = mgr.block_pool
    sched = _core(llm).scheduler
    free_start = pool.get_num_free_blocks()
    abort = abort or {}
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            logprobs=0 if logprobs else None, prompt_logprobs=0 if logprobs else None)
    names = [f"r{i}" for i in range(len(prompts))]
    for name, ids in zip(names, prompts):
        llm.llm_engine.add_request(name, TokensPrompt(prompt_token_ids=ids), params)
    peak = {n: 0 for n in names}
    peak_by_group = {n: [0] * len(managers) for n in names}
    preemptions = {}
    max_running = 0
    done = {}
    aborted = []
    steps = 0
    while llm.llm_engine.has_unfinished_requests():
        for out in llm.llm_engine.step():
            if out.finished:
                done[out.request_id] = out
        steps += 1
        max_running = max(max_running, len(sched.running))
        for rid, req in list(sched.requests.items()):
            # vLLM may suffix the id we gave ("r0" -> "r0-<random>")
            key = next((n for n in names if rid == n or rid.startswith(n + "-")), None)
            if key is None:
                continue
            held = sum(not b.is_null for b in single.req_to_blocks.get(rid, []))
            peak[key] = max(peak[key], held)
            for g, m in enumerate(managers):
                peak_by_group[key][g] = max(peak_by_group[key][g],
                                            sum(not b.is_null for b in m.req_to_blocks.get(rid, [])))
            preemptions[key] = max(preemptions.get(key, 0), req.num_preemptions)
            i = names.index(key)
            mode = abort.get(i)
            mid_prefill = 0 < req.num_computed_tokens < req.num_prompt_tokens
            mid_decode = req.num_output_tokens > 0
            if (mode == "prefill" and mid_prefill) or (mode == "decode" and mid_decode):
                llm.llm_engine.abort_request([key])
                aborted.append(key)
                abort.pop(i)
        if poison:
            poison_free_blocks(llm)
    results = []
    for n, ids in zip(names, prompts):
        o = done.get(n)
        if o is None or n in aborted:
            results.append(None)
            continue
        comp = o.outputs[0]
        plp = None
        if o.prompt_logprobs is not None:
            plp = [None] + [o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
        lps = [s[t].logprob for s, t in zip(comp.logprobs, comp.token_ids)] if comp.logprobs else None
        results.append({"tokens": list(comp.token_ids), "prompt_logprobs": plp, "logprobs": lps})
    spec = single.kv_cache_spec
    bound = spec.max_blocks_per_request() if hasattr(spec, "max_blocks_per_request") else None
    return {
        "results": results,
        "peak_held": peak,
        "bound": bound,
        "block_size": single.block_size,
        "free_start": free_start,
        "free_end": pool.get_num_free_blocks(),
        "pool_blocks": pool.num_gpu_blocks,
        "preemptions": preemptions,
        "aborted": aborted,
        "steps": steps,
        "max_running": max_running,
        "manager": type(single).__name__,
        "group_managers": [type(m).__name__ for m in managers],
        "peak_held_by_group": peak_by_group,
    }


# --------------------------------------------------------------------------
# Probes for run_engine(probe=..., probe_args=...)
# --------------------------------------------------------------------------
def tracked(llm, results, *, prompts, abort=None, **kw):
    """`track(llm, prompts, **kw)` as a probe (run_engine is given no prompts of its own).
    `abort`'s keys may arrive as strings (JSON object keys)."""
    abort = {int(i): mode for i, mode in abort.items()} if abort else None
    return track(llm, prompts, abort=abort, **kw)


def plugin_layers(llm, results):
    """The model class vLLM built, how many attention layers the plugin swapped in, and
    the backends they run on."""
    from vllm_lminf.attention import LMInfAttention

    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    layers = [m for m in model.modules() if isinstance(m, LMInfAttention)]
    return {"class": type(model).__name__, "swapped": len(layers),
            "backends": sorted({layer.attn_backend.__name__ for layer in layers}),
            # the CPU cache layout (vLLM's ISA name) the layers' builders chose, where set
            "isas": sorted({str(getattr(layer, "isa", None)) for layer in layers})}


def sequential(llm, results, *, prompts, max_tokens):
    """Each prompt alone, one after the other (so later ones may hit the prefix cache):
    greedy outputs with their logprobs, and each request's cached-token count. No prompt
    logprobs: vLLM skips the prefix cache for requests that ask for them."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0)
    outs, cached = [], []
    for ids in prompts:
        o = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        comp = o.outputs[0]
        outs.append({"tokens": list(comp.token_ids),
                     "logprobs": [s[t].logprob for s, t in zip(comp.logprobs, comp.token_ids)]})
        cached.append(o.num_cached_tokens or 0)
    return {"results": outs, "cached_tokens": cached}


def poison_uncached_free_blocks(llm) -> int:
    """POISON every free block that no longer carries a prefix-cache hash (freed and not
    cached, or evicted for reuse): a hit may read cached blocks only."""
    pool = kv_manager(llm).block_pool
    ids = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()
           if not b.is_null and b.block_hash is None]
    if ids:
        idx = torch.tensor(ids)
        for cache in kv_caches(llm):
            cache[idx] = POISON
    return len(ids)


def conversations(llm, results, *, first_turns, follow_ups, max_tokens, poison=False):
    """Multi-turn serving, one request at a time: every first turn, then for each
    conversation a follow-up that resends its history (prompt + answer) plus new tokens,
    so other conversations churn the pool in between. `poison` fills every uncached free
    block with POISON before each request. Returns greedy outputs with logprobs, each
    request's cached-token count, and the pool's free blocks before and after."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    pool = kv_manager(llm).block_pool
    free_start = pool.get_num_free_blocks()

    def serve(ids):
        if poison:
            poison_uncached_free_blocks(llm)
        o = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        comp = o.outputs[0]
        return {"prompt_len": len(ids), "tokens": list(comp.token_ids), "cached_tokens": o.num_cached_tokens or 0,
                "logprobs": [s[t].logprob for s, t in zip(comp.logprobs, comp.token_ids)]}

    first = [serve(ids) for ids in first_turns]
    second = [serve(ids + f["tokens"] + new) for ids, f, new in zip(first_turns, first, follow_ups)]
    return {"first": first, "follow_up": second, "free_start": free_start, "free_end": pool.get_num_free_blocks(),
            "pool_blocks": pool.num_gpu_blocks}


def kv_groups(llm, results):
    """The KV-cache groups vLLM formed: per group its manager, spec type and layer indices."""
    from vllm.model_executor.models.utils import extract_layer_index

    mgr = kv_manager(llm)
    groups = mgr.kv_cache_config.kv_cache_groups
    return [{"manager": type(m).__name__, "spec": type(g.kv_cache_spec).__name__,
             "layers": sorted(extract_layer_index(n) for n in g.layer_names)}
            for m, g in zip(mgr.coordinator.single_type_managers, groups)]


# --------------------------------------------------------------------------
# Test side (the parent process)
# --------------------------------------------------------------------------
def run_tracked(model, prompts, *, overrides, max_tokens, block_size, engine=None, **kw):
    """An engine in a subprocess (max_model_len 65536, chunks of 128 tokens, `engine` on top)
    stepped by `track`; returns what `track` returned."""
    from helpers.engine import run_engine

    eng = dict(max_model_len=65536, block_size=block_size, max_num_batched_tokens=128, hf_overrides=overrides)
    eng.update(engine or {})
    # generate() is given no prompts: all work happens in the probe
    return run_engine(model, [], engine=eng, probe=tracked,
                      probe_args=dict(kw, prompts=prompts, max_tokens=max_tokens))["extra"]


def same_outputs(a, b, tol=2e-4):
    """Equal greedy tokens, and prompt + generated logprobs within `tol`."""
    assert a["tokens"] == b["tokens"]
    x = torch.tensor(a["prompt_logprobs"][1:] + a["logprobs"])
    y = torch.tensor(b["prompt_logprobs"][1:] + b["logprobs"])
    assert (x - y).abs().max().item() <= tol
