"""The raw-key backend's Triton route inside a vLLM engine, on CPU: `LMINF_RAW_KERNEL=triton`
with `TRITON_INTERPRET=1` runs the Triton kernel where CUDA would, so the wiring from vLLM's
metadata (query_start_loc / seq_lens device tensors, block tables, per-sequence frequency
rows) to the kernel is exercised end to end without a GPU. Compared with the float64
reference; a model with head size 80 takes the raw path (the CPU fast path needs a multiple
of 32). With top-k (issue 15) the Triton kernel computes Λ and its log-sum-exp, and the
torch code merges the middle partial of the rows that use top-k into it."""

from __future__ import annotations

import random
import sys

import pytest
import torch

from helpers.engine import run_engine
from helpers.reference import Reference, token_logprobs
from helpers.tiny_checkpoint import make_tiny_llama

pytestmark = pytest.mark.slow

TRAINED, G, W = 128, 4, 64


def kernels_used(llm, results) -> dict:
    """Which raw-path kernel modules the engine's process imported (the Triton one is
    imported on first use only), and the backend the layers run on."""
    from vllm_lminf.attention import LMInfAttention

    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    return {"triton": "lminf_kernels.raw_triton" in sys.modules,
            "backends": sorted({m.attn_backend.__name__ for m in model.modules() if isinstance(m, LMInfAttention)})}


TOP_K = {"top_k": 3, "top_k_from_layer": 1, "top_k_distance": 32}


@pytest.mark.parametrize("kernel,top_k", [("triton", False), ("torch", False), ("triton", True), ("torch", True)])
def test_raw_backend_kernels_in_an_engine_match_the_reference(tmp_path, kernel, top_k, seed):
    path = make_tiny_llama(tmp_path / "m", max_position_embeddings=TRAINED, head_dim=80, hidden_size=320, seed=3)
    rng = random.Random(seed)
    # past the window, inside it, a single token; chunked prefill mixes prefill and decode rows
    prompts = [[rng.randrange(3, 380) for _ in range(n)] for n in (300, 40, 1, 150)]
    env = {"LMINF_RAW_KERNEL": "triton", "TRITON_INTERPRET": "1"} if kernel == "triton" else {}
    lminf = {"n_global": G, "n_local": W, "distance_limit": W, **(TOP_K if top_k else {})}
    out = run_engine(path, prompts, env=env, probe=kernels_used,
                     engine=dict(max_model_len=1024, max_num_batched_tokens=96, hf_overrides={"lm_infinite": lminf}),
                     sampling=dict(max_tokens=6, prompt_logprobs=0, logprobs=0))
    assert out["extra"] == {"triton": kernel == "triton", "backends": ["RawBackend"]}
    ref = Reference(path)
    for p, o in zip(prompts, out["results"]):
        ids = p + o["tokens"]
        rule = (TOP_K["top_k"], TOP_K["top_k_distance"], 1, 2, len(p) - 1) if top_k else None
        want = token_logprobs(ref.logprobs(ids, lm_infinite=(G, W, float(W)), top_k=rule), ids)
        got = torch.tensor(o["prompt_logprobs"][1:] + o["logprobs"], dtype=torch.float64)
        assert (got - want[: len(got)]).abs().max().item() < 2e-4, len(p)
