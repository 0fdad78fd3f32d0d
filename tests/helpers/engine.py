"""Run one vLLM engine in a fresh subprocess and return its outputs as plain data
(used by the tests and the benchmarks).

Each engine gets its own process so that configurations (and plugin on/off) never
leak between engines, and a crash is a test failure rather than a dead session.

    results = run_engine(model_dir, prompts=[[ids...], ...], engine={...}, sampling={...})
    results[i] = {"prompt_logprobs": [None, lp1, ...], "tokens": [...], "logprobs": [...]}

A probe inspects or drives the engine after generation: a module-level function
`probe(llm, results, **probe_args)` returning JSON-able data. The child process imports
the file that defines it (by path) and calls it by its qualified name:

    out = run_engine(model_dir, prompts, probe=helpers.probe.plugin_layers)
    out == {"results": [...], "extra": <what the probe returned>}

This file is also the child's entry point: `python tests/helpers/engine.py IN OUT`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

TEST_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = TESTS_DIR.parent
#: What a child process needs on its path: `helpers` (tests/) and `lminf_kernels` (kernels/),
#: both from this work tree.
HARNESS_PATHS = (str(TESTS_DIR), str(REPO_DIR / "kernels"))


def with_harness_path(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` with tests/ and kernels/ in front of PYTHONPATH."""
    out = dict(env)
    rest = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p not in HARNESS_PATHS]
    out["PYTHONPATH"] = os.pathsep.join([*HARNESS_PATHS, *rest])
    return out


def probe_ref(fn: Callable) -> dict:
    """Where the child finds `fn`: the defining file and the qualified name."""
    qualname = getattr(fn, "__qualname__", None)
    code = getattr(fn, "__code__", None)
    if qualname is None or code is None or "<locals>" in qualname or "<lambda>" in qualname:
        raise ValueError(f"probe must be a module-level function, got {fn!r}")
    return {"file": str(Path(code.co_filename).resolve()), "qualname": qualname}


def run_engine(
    model: str | Path,
    prompts: list[list[int]],
    *,
    engine: dict | None = None,
    sampling: dict | None = None,
    plugin: bool = True,
    env: dict | None = None,
    probe: Callable | None = None,
    probe_args: dict | None = None,
    timeout: int = 900,
) -> list[dict] | dict:
    """Generate for token-id prompts. `engine` goes to LLM(...), `sampling` to
    SamplingParams(...). `plugin=False` runs stock vLLM (plugins disabled).

    `probe`: a module-level function, called in the child after generation as
    `probe(llm, results, **probe_args)` (`probe_args` must be JSON-able); what it returns
    (JSON-able) comes back as {"results": ..., "extra": ...}. Without a probe the
    results list is returned."""
    if probe_args is not None and probe is None:
        raise ValueError("probe_args given without a probe")
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "model": str(model),
            "prompts": prompts,
            "engine": engine or {},
            "sampling": sampling or {},
            "probe": None if probe is None else dict(probe_ref(probe), args=probe_args or {}),
        }
        inp, out = Path(tmp, "in.json"), Path(tmp, "out.json")
        inp.write_text(json.dumps(spec))
        full_env = dict(os.environ, **TEST_ENV, VLLM_CACHE_ROOT=tmp, VLLM_RPC_BASE_PATH=tmp)
        if not plugin:
            full_env["VLLM_PLUGINS"] = "none-such-plugin"
        full_env.update(env or {})
        full_env = with_harness_path(full_env)
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), str(inp), str(out)],
            env=full_env, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"engine subprocess failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
        data = json.loads(out.read_text())
    return data if probe is not None else data["results"]


def load_probe(ref: dict) -> Callable:
    """Import the file `ref["file"]` as a module of its own and return `ref["qualname"]`."""
    path = Path(ref["file"])
    name = "_lminf_probe_" + "".join(c if c.isalnum() else "_" for c in str(path.with_suffix("")))
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import probe file {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    obj = module
    for part in ref["qualname"].split("."):
        obj = getattr(obj, part)
    return obj


def _main(inp: str, out: str) -> None:
    from vllm import LLM, SamplingParams, TokensPrompt

    spec = json.loads(Path(inp).read_text())
    # resolve the probe before the engine starts: a bad reference fails in seconds
    probe = load_probe(spec["probe"]) if spec["probe"] else None
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
    if probe is not None:
        payload["extra"] = probe(llm, results, **spec["probe"]["args"])
    Path(out).write_text(json.dumps(payload))


if __name__ == "__main__":
    # Run by path, Python put tests/helpers/ first on sys.path: drop it, so that these
    # files (engine.py, server.py, probe.py, ...) cannot shadow top-level modules.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != Path(here)]
    for p in reversed(HARNESS_PATHS):
        if p not in sys.path:
            sys.path.insert(0, p)
    _main(sys.argv[1], sys.argv[2])
