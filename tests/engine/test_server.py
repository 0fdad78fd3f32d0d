"""The OpenAI-compatible server with the plugin, on 127.0.0.1 (`python -m vllm_lminf serve`)."""

from __future__ import annotations

import json
import random

import pytest

from helpers.engine import TEST_ENV
from helpers.tiny_checkpoint import make_tiny_llama
from helpers.server import Server

pytestmark = pytest.mark.slow


def test_server_answers_past_the_trained_length_and_shuts_down_cleanly(tmp_path, seed):
    model = make_tiny_llama(tmp_path / "m", max_position_embeddings=128, seed=3)
    overrides = json.dumps({"lm_infinite": {"n_global": 4, "n_local": 64}})
    args = ["--max-model-len", "4096", "--dtype", "float32", "--hf-overrides", overrides, "--enforce-eager"]
    env = dict(TEST_ENV, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CACHE_ROOT=str(tmp_path),
               VLLM_RPC_BASE_PATH=str(tmp_path))
    words = "the of and to in is was for on that with as it by at from this be".split()
    rng = random.Random(seed)
    prompt = " ".join(rng.choice(words) for _ in range(400))
    srv = Server(model, args=args, env=env, log=tmp_path / "server.log")
    with srv:
        reply = srv.complete(prompt, max_tokens=8)
        # a token-id prompt as well, with logprobs
        ids = [rng.randrange(3, 380) for _ in range(700)]
        reply_ids = srv.complete(ids, max_tokens=4, logprobs=1)
    code = srv.proc.returncode
    assert reply["usage"]["prompt_tokens"] > 128, reply["usage"]
    assert reply["usage"]["completion_tokens"] == 8
    assert reply_ids["usage"]["prompt_tokens"] == 700
    assert len(reply_ids["choices"][0]["logprobs"]["token_logprobs"]) == 4
    assert code == 0, (code, (tmp_path / "server.log").read_text()[-3000:])


def test_server_refuses_bad_lm_infinite_settings_at_start(tmp_path):
    model = make_tiny_llama(tmp_path / "m", max_position_embeddings=128, seed=3)
    bad = json.dumps({"lm_infinite": {"n_global": 4, "n_local": "64"}})
    srv = Server(model, args=["--hf-overrides", bad, "--max-model-len", "1024"], env=TEST_ENV,
                 log=tmp_path / "server.log", startup_timeout=300)
    with pytest.raises(RuntimeError):
        srv.__enter__()
    log = (tmp_path / "server.log").read_text()
    assert "lm_infinite.n_local must be an integer >= 1, got '64'" in log
