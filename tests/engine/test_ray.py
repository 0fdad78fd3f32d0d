"""Scale-out: vLLM engines inside Ray actors, the batch command, tensor parallelism (CPU).

* Engines in Ray actors (local cluster on 127.0.0.1) load the plugin through the
  `vllm.general_plugins` entry point and give exactly the single-process LM-Infinite
  outputs (greedy tokens, prompt logprobs).
* `python -m vllm_lminf.batch` with 2 replicas: bad lines reported and skipped, results
  streamed, a restart after a cut-off write reruns only the missing ids.
* Tensor parallel 2 (vLLM's multiprocessing executor) equals tensor parallel 1.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys

import pytest

from helpers.engine import TEST_ENV, run_engine, with_harness_path
from helpers.tiny_checkpoint import make_tiny_llama

pytestmark = pytest.mark.slow

LMINF = {"lm_infinite": {"n_global": 4, "n_local": 64}}
ENGINE = dict(max_model_len=1024, hf_overrides=LMINF)
# ignore_eos: the same number of tokens with and without a tokenizer (the batch command has one)
SAMPLING = dict(max_tokens=6, prompt_logprobs=0, logprobs=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), max_position_embeddings=128, seed=1)


@pytest.fixture(scope="module")
def prompts(module_seed):
    rng = random.Random(module_seed)
    return [[rng.randrange(3, 380) for _ in range(n)] for n in (300, 287, 311)]


@pytest.fixture(scope="module")
def baseline(tiny, prompts):
    """Single-process engine, plugin on: prompts 2.3x the trained length, window 64."""
    return run_engine(tiny, prompts, engine=ENGINE, sampling=SAMPLING)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": with_harness_path(TEST_ENV)}, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _engine_actor(ray):
    """A Ray actor class holding one vllm.LLM (defined here so Ray ships it by value)."""

    class Engine:
        def __init__(self, model: str, engine: dict):
            from vllm import LLM

            kw = dict(dtype="float32", skip_tokenizer_init=True, enforce_eager=True, seed=0)
            self.llm = LLM(model, **kw, **engine)

        def info(self) -> dict:
            import os

            from vllm_lminf.attention import LMInfAttention

            model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
            return {
                "pid": os.getpid(),
                "lminf_layers": sum(isinstance(m, LMInfAttention) for m in model.modules()),
                "omp": os.environ.get("OMP_NUM_THREADS"),
            }

        def generate(self, prompts: list[list[int]], sampling: dict) -> list[dict]:
            from vllm import SamplingParams, TokensPrompt

            outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                     SamplingParams(temperature=0.0, **sampling), use_tqdm=False)
            res = []
            for p, o in zip(prompts, outs):
                c = o.outputs[0]
                res.append({
                    "prompt_logprobs": [None] + [o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))],
                    "tokens": list(c.token_ids),
                    "logprobs": [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)],
                })
            return res

    return ray.remote(num_cpus=1)(Engine)


def _max_diff(a: list, b: list) -> float:
    return max(abs(x - y) for x, y in zip(a, b) if x is not None)


def test_tensor_parallel_2_matches_tp1(tiny, prompts, baseline):
    """vLLM's multiprocessing executor with TP=2 on CPU: the auto thread binding wants one
    NUMA node per rank, so each rank is bound to one core by hand."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    engine = dict(ENGINE, tensor_parallel_size=2, distributed_executor_backend="mp")
    tp2 = run_engine(tiny, prompts, engine=engine, sampling=SAMPLING,
                     env={"VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"})
    for got, want in zip(tp2, baseline):
        assert got["tokens"] == want["tokens"]
        # different reduction order across ranks: float32 rounding only
        assert _max_diff(got["prompt_logprobs"], want["prompt_logprobs"]) < 5e-5
        assert _max_diff(got["logprobs"], want["logprobs"]) < 5e-5


def test_engines_in_ray_actors_match_single_process(tiny, prompts, baseline, ray_cluster):
    ray = ray_cluster
    Engine = _engine_actor(ray)
    actors = [Engine.remote(str(tiny), ENGINE) for _ in range(2)]
    try:
        # each actor gets all prompts, in a different order
        orders = [list(range(len(prompts))), list(reversed(range(len(prompts))))]
        outs = ray.get([a.generate.remote([prompts[i] for i in o], SAMPLING) for a, o in zip(actors, orders)])
        infos = ray.get([a.info.remote() for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
    assert len({i["pid"] for i in infos} | {os.getpid()}) == 3  # two separate worker processes
    for info in infos:
        assert info["lminf_layers"] == 2, info  # the plugin swapped both attention layers
        assert info["omp"] == "1"  # runtime_env env_vars reached the actor
    for order, out in zip(orders, outs):
        for i, got in zip(order, out):
            want = baseline[i]
            assert got["tokens"] == want["tokens"]
            assert _max_diff(got["prompt_logprobs"], want["prompt_logprobs"]) < 1e-5
            assert _max_diff(got["logprobs"], want["logprobs"]) < 1e-5


def _batch(tiny, inp, out, replicas, address=None):
    engine = dict(ENGINE, dtype="float32", enforce_eager=True, seed=0)
    cmd = [sys.executable, "-m", "vllm_lminf.batch", "--model", str(tiny), "--input", str(inp),
           "--output", str(out), "--replicas", str(replicas), "--batch-size", "1", "--max-tokens", "6",
           "--sampling", '{"ignore_eos": true}', "--engine-args", json.dumps(engine), "--num-cpus", "2",
           "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--no-progress", "--wait-replicas", "300"]
    if address:
        cmd += ["--address", address]
    env = with_harness_path(dict(os.environ, **TEST_ENV))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line]


def test_batch_command_reports_bad_lines_streams_and_resumes(tiny, prompts, baseline, ray_cluster, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    errors = tmp_path / "out.jsonl.errors.jsonl"
    lines = [
        json.dumps({"id": "a", "prompt_token_ids": prompts[0]}),
        json.dumps({"id": 2, "prompt": "the quick brown fox jumps over the lazy dog " * 30}),
        '{"id": "broken", "prompt": ',  # line 3: invalid JSON
        json.dumps({"id": "c", "prompt_token_ids": prompts[1]}),
        json.dumps({"id": "a", "prompt": "again"}),  # line 5: duplicate id
        json.dumps({"id": "d", "prompt": "once upon a time " * 40}),
    ]
    inp.write_text("\n".join(lines) + "\n")

    r1 = _batch(tiny, inp, out, replicas=2)  # starts its own local cluster
    assert r1.returncode == 3, r1.stderr[-4000:]  # done, with bad lines
    assert f"{inp}:3: invalid JSON" in r1.stderr and f"{inp}:5: duplicate id" in r1.stderr
    assert [e["line"] for e in _records(errors)] == [3, 5]
    first = _records(out)
    by_id = {json.dumps(r["id"]): r for r in first}
    assert sorted(by_id) == sorted(['"a"', "2", '"c"', '"d"'])
    for rec in first:
        assert len(rec["token_ids"]) == 6 and rec["finish_reason"] == "length"
    # the batch command's LM-Infinite tokens are the single-process engine's
    assert by_id['"a"']["token_ids"] == baseline[0]["tokens"]
    assert by_id['"c"']["token_ids"] == baseline[1]["tokens"]
    assert by_id['"a"']["prompt_tokens"] == len(prompts[0])
    assert by_id["2"]["prompt_tokens"] > 128  # past the trained length
    assert len({r["replica"] for r in first}) == 2  # both engines took prompts

    # A run killed mid-write: two whole records, then half of the third.
    text = out.read_text().split("\n")
    out.write_text(text[0] + "\n" + text[1] + "\n" + text[2][: len(text[2]) // 2])
    # joins the running cluster this time
    r2 = _batch(tiny, inp, out, replicas=1, address=ray_cluster.get_runtime_context().gcs_address)
    assert r2.returncode == 3, r2.stderr[-4000:]
    assert "dropped a truncated last line" in r2.stderr
    assert "2 prompts to run, 2 already in" in r2.stderr
    second = _records(out)
    assert len(second) == 4 and second[:2] == first[:2]  # kept, not rerun
    for rec in second[2:]:
        assert rec["token_ids"] == by_id[json.dumps(rec["id"])]["token_ids"]

    # Nothing left: no cluster, no engine.
    r3 = _batch(tiny, inp, out, replicas=2)
    assert "0 prompts to run, 4 already in" in r3.stderr, r3.stderr[-4000:]
    assert _records(out) == second
