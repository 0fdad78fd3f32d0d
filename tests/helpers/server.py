"""Start and drive an OpenAI-compatible vLLM server (`python -m vllm_lminf serve`) from
Python: used by the benchmarks and the tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers.engine import with_harness_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`with Server(model, args=[...]) as srv: srv.complete(prompt)`.

    plugin=False starts stock vLLM (the plugin is not loaded in any process).
    """

    def __init__(self, model: str | Path, *, args: list[str] = (), plugin: bool = True,
                 env: dict | None = None, log: Path | None = None, startup_timeout: float = 600):
        self.model = str(model)
        self.port = free_port()
        self.args = list(args)
        self.plugin = plugin
        # the server imports lminf_kernels from this work tree
        self.env = with_harness_path(dict(os.environ, **(env or {})))
        if not plugin:
            self.env["VLLM_PLUGINS"] = "none-such-plugin"
        self.log_path = Path(log) if log else None
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        cmd = [sys.executable, "-m", "vllm_lminf", "serve", self.model,
               "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up"
                                   + (f"; log: {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server did not become healthy in {self.startup_timeout}s")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 60) -> int | None:
        """SIGINT (a clean shutdown), then SIGKILL if it hangs; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def post(self, path: str, body: dict, timeout: float = 1800) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{path} -> HTTP {e.code}: {e.read().decode()[:2000]}") from None

    def complete(self, prompt: str | list[int], **params) -> dict:
        body = {"model": self.model, "prompt": prompt, "temperature": 0.0, "max_tokens": 32}
        body.update(params)
        return self.post("/v1/completions", body)
