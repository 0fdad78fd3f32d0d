"""Run one vLLM engine in a fresh subprocess and return its outputs as plain data
(used by the tests and the benchmarks).

Each engine gets its own process so that configurations (and plugin on/off) never
leak between engines, and a crash is a test failure rather than a dead session.

    results = run_engine(model_dir, prompts=[[ids...], ...], engine={...}, sampling={...})
    results[i] = {"prompt_logprobs": [None, lp1, ...], "tokens": [...], "logprobs": [...]}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TEST_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def run_engine(
    model: str | Path,
    prompts: list[list[int]],
    *,
    engine: dict | None = None,
    sampling: dict | None = None,
    plugin: bool = True,
    env: dict | None = None,
    script: str | None = None,
    timeout: int = 900,
) -> list[dict] | dict:
    """Generate for token-id prompts. `engine` goes to LLM(...), `sampling` to
    SamplingParams(...). `plugin=False` runs stock vLLM (plugins disabled).
    `script`: optional python run after generation with `llm` and `results` in scope;
    whatever it stores in `extra` is returned as {"results": ..., "extra": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "model": str(model),
            "prompts": prompts,
            "engine": engine or {},
            "sampling": sampling or {},
            "script": script,
        }
        inp, out = Path(tmp, "in.json"), Path(tmp, "out.json")
        inp.write_text(json.dumps(spec))
        full_env = dict(os.environ, **TEST_ENV, VLLM_CACHE_ROOT=tmp, VLLM_RPC_BASE_PATH=tmp)
        if not plugin:
            full_env["VLLM_PLUGINS"] = "none-such-plugin"
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_lminf.isolated", str(inp), str(out)],
            env=full_env, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"engine subprocess failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
        data = json.loads(out.read_text())
    return data if script else data["results"]


def _main(inp: str, out: str) -> None:
    from vllm import LLM, SamplingParams, TokensPrompt

    spec = json.loads(Path(inp).read_text())
    engine = dict(dtype="float32", skip_tokenizer_init=True, enforce_eager=True, seed=0)
    engine.update(spec["engine"])
    llm = LLM(spec["model"], **engine)
    sampling = dict(temperature=0.0, max_tokens=4)
    sampling.update(spec["sampling"])
    params = SamplingParams(**sampling)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], params, use_tqdm=False)
    results = []
    for prompt, o in zip(spec["prompts"], outputs):
        plp = None
        if o.prompt_logprobs is not None:
            plp = [None] + [o.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))]
        comp = o.outputs[0]
        lps = None
        if comp.logprobs is not None:
            lps = [step[tok].logprob for step, tok in zip(comp.logprobs, comp.token_ids)]
        results.append({"prompt_logprobs": plp, "tokens": list(comp.token_ids), "logprobs": lps})
    payload = {"results": results}
    if spec["script"]:
        scope = {"llm": llm, "results": results, "extra": None}
        exec(spec["script"], scope)
        payload["extra"] = scope["extra"]
    Path(out).write_text(json.dumps(payload))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
