"""Offline batch inference over a JSONL file with a pool of vLLM engines on Ray Data.

    python -m vllm_lminf.batch --model DIR --input prompts.jsonl --output results.jsonl \\
        --replicas 2 [--engine-args JSON] [--max-tokens 128] [--temperature 0]

Input, one JSON object a line: {"id": ..., "prompt": "text"} or
{"id": ..., "prompt_token_ids": [1, 2, ...]}; `id` is a string or an integer, unique in
the file. Output, one ASCII JSON line per finished prompt, in completion order:
{"id", "text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason",
"replica"}.

How it runs: the prompts not yet in the output file become a Ray dataset, and
`map_batches` sends blocks of `--batch-size` prompts to a fixed pool of `--replicas`
actors, each holding one `vllm.LLM` built in its constructor (vLLM loads its general
plugins, this one included, in that process). The driver consumes the results with
`iter_batches` as blocks finish and appends them to the output (flushed and fsynced
per block), so an interrupted run keeps everything it finished: run the same command
again and it skips every id already in the output (a truncated last line, from a
kill mid-write, is dropped first).

Bad input lines (invalid JSON, no prompt, a duplicate id, ...) are reported with their
line number on stderr and in `<output>.errors.jsonl` (rewritten each run), and the run
goes on. A prompt the engine rejects (e.g. longer than max_model_len) is reported there
too and is retried by the next run. Exit status: 0 all done, 3 done but some lines or
prompts failed, 1 fatal error, 130 interrupted.

The plugin must be importable in every Ray worker that runs an engine: a local cluster
(started here unless --address / RAY_ADDRESS names one) shares this Python environment;
for a remote cluster install the package on the nodes or pass e.g.
--runtime-env '{"pip": ["vllm-lminf @ file:///path/to/wheel"]}' or
'{"py_modules": ["/path/to/vllm_lminf"]}'.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FATAL, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 3, 130


# --------------------------------------------------------------------------- input / output files


@dataclass
class Request:
    line: int
    id: str | int
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None

    def payload(self) -> str:
        if self.prompt_token_ids is not None:
            return json.dumps({"t": self.prompt_token_ids})
        return json.dumps({"p": self.prompt})


def id_key(value: Any) -> str:
    """Identity of an id across input and output: its JSON text (so 1 and "1" differ)."""
    return json.dumps(value)


def scan_output(path: Path, warn=None) -> set[str]:
    """Keys of the ids already in the output file. A last line without its newline (a
    write cut short) is cut off the file if it does not parse; if it parses, the
    missing newline is added so the next append starts a fresh line."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    done: set[str] = set()
    if not path.exists():
        return done
    with open(path, "rb+") as f:
        offset, lineno = 0, 0
        for raw in f:
            lineno += 1
            complete = raw.endswith(b"\n")
            rec = None
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
            ok = isinstance(rec, dict) and "id" in rec and "error" not in rec
            if not complete:
                if ok:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                else:
                    f.truncate(offset)
                    warn(f"{path}: dropped a truncated last line ({len(raw)} bytes, line {lineno}); "
                         "its prompt will be run again")
                    break
            if ok:
                done.add(id_key(rec["id"]))
            elif raw.strip():
                warn(f"{path}: line {lineno} is not a result record; ignored")
            offset += len(raw)
    return done


def _check_token_ids(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "'prompt_token_ids' must be a non-empty list of integers"
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        return "'prompt_token_ids' must hold non-negative integers only"
    return None


def read_requests(path: Path, done: set[str]) -> tuple[list[Request], list[dict], int]:
    """Parse the input file: (requests still to run, bad-line records, number skipped
    because their id is already in the output)."""
    todo: list[Request] = []
    errors: list[dict] = []
    first_line: dict[str, int] = {}
    skipped = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue

            def bad(msg: str, rid: Any = None) -> None:
                errors.append({"line": lineno, "id": rid, "error": msg})

            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad(f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                bad(f"invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(rec, dict):
                bad(f"expected a JSON object, got {type(rec).__name__}")
                continue
            if "id" not in rec:
                bad("missing 'id'")
                continue
            rid = rec["id"]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                bad("'id' must be a string or an integer")
                continue
            key = id_key(rid)
            if key in first_line:
                bad(f"duplicate id {key} (first on line {first_line[key]})", rid)
                continue
            has_text, has_ids = "prompt" in rec, "prompt_token_ids" in rec
            if has_text and has_ids:
                bad("give 'prompt' or 'prompt_token_ids', not both", rid)
                continue
            if not has_text and not has_ids:
                bad("missing 'prompt' (or 'prompt_token_ids')", rid)
                continue
            if has_text and (not isinstance(rec["prompt"], str) or not rec["prompt"]):
                bad("'prompt' must be a non-empty string", rid)
                continue
            if has_ids and (msg := _check_token_ids(rec["prompt_token_ids"])):
                bad(msg, rid)
                continue
            first_line[key] = lineno
            if key in done:
                skipped += 1
                continue
            todo.append(Request(lineno, rid, rec.get("prompt"), rec.get("prompt_token_ids")))
    return todo, errors, skipped


# --------------------------------------------------------------------------- the engine replica


class Replica:
    """One vLLM engine in one Ray actor (Ray Data calls it once per block)."""

    def __init__(self, model: str, engine_args: dict, sampling: dict, seed: int | None):
        from vllm import LLM

        self.llm = LLM(model, **engine_args)
        self.sampling, self.seed = sampling, seed
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.ready_at = time.time()

    def _params(self, line: int):
        from vllm import SamplingParams

        kw = dict(self.sampling)
        if self.seed is not None:
            kw["seed"] = self.seed + line  # per prompt: the same output on any replica
        return SamplingParams(**kw)

    @staticmethod
    def _prompt(payload: dict):
        from vllm import TextPrompt, TokensPrompt

        if "t" in payload:
            return TokensPrompt(prompt_token_ids=payload["t"])
        return TextPrompt(prompt=payload["p"])

    def _record(self, out) -> dict:
        comp = out.outputs[0]
        return {
            "text": comp.text,
            "token_ids": list(comp.token_ids),
            "prompt_tokens": len(out.prompt_token_ids or []),
            "completion_tokens": len(comp.token_ids),
            "finish_reason": comp.finish_reason,
            "replica": self.name,
        }

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        start = time.time()
        rows = [int(r) for r in batch["row"]]
        lines = [int(x) for x in batch["line"]]
        prompts = [self._prompt(json.loads(str(p))) for p in batch["req"]]
        params = [self._params(line) for line in lines]
        try:
            results = [self._record(o) for o in self.llm.generate(prompts, params, use_tqdm=False)]
        except Exception:  # one bad prompt fails the call: run them one by one to isolate it
            results = []
            for prompt, sp in zip(prompts, params):
                try:
                    results.append(self._record(self.llm.generate([prompt], [sp], use_tqdm=False)[0]))
                except Exception as e:  # noqa: BLE001 - reported per prompt
                    results.append({"error": f"{type(e).__name__}: {e}"[:2000]})
        meta = json.dumps({"replica": self.name, "ready": self.ready_at, "start": start, "end": time.time()})
        return {
            "row": np.asarray(rows, dtype=np.int64),
            "res": np.asarray([json.dumps(r) for r in results], dtype=object),
            "meta": np.asarray([meta] * len(rows), dtype=object),
        }


# --------------------------------------------------------------------------- driver


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    first_batch_start: float | None = None
    finished: float | None = None
    total_valid: int = 0
    skipped: int = 0
    bad_lines: int = 0
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replicas: dict = field(default_factory=dict)

    def add_meta(self, meta: dict, n: int) -> None:
        r = self.replicas.setdefault(meta["replica"], {"ready": meta["ready"], "prompts": 0, "busy_s": 0.0})
        r["prompts"] += n
        r["busy_s"] += meta["end"] - meta["start"]
        if self.first_batch_start is None or meta["start"] < self.first_batch_start:
            self.first_batch_start = meta["start"]

    def as_dict(self) -> dict:
        end = self.finished or time.time()
        wall = end - self.started
        window = end - self.first_batch_start if self.first_batch_start else None
        d = {k: v for k, v in self.__dict__.items() if k != "replicas"}
        d.update(
            wall_s=round(wall, 3),
            # from the first engine call to the last result: excludes Ray and engine start-up
            generate_window_s=round(window, 3) if window else None,
            prompts_per_s=round(self.completed / window, 4) if window else None,
            completion_tokens_per_s=round(self.completion_tokens / window, 2) if window else None,
            replicas=self.replicas,
        )
        return d


def _json_arg(text: str | None, what: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--{what}: invalid JSON: {e}")
    if not isinstance(value, dict):
        raise SystemExit(f"--{what}: expected a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m vllm_lminf.batch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", required=True, help="model directory or name, as for vllm.LLM")
    ap.add_argument("--input", required=True, type=Path, help="JSONL prompts")
    ap.add_argument("--output", required=True, type=Path, help="JSONL results (appended to; resumable)")
    ap.add_argument("--replicas", type=int, default=1, help="engines (Ray actors), one vllm.LLM each")
    ap.add_argument("--engine-args", default=None,
                    help='JSON object of vllm.LLM keyword arguments, e.g. \'{"max_model_len": 32768, '
                         '"hf_overrides": {"lm_infinite": {"n_global": 10}}}\'')
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None,
                    help="sampling seed; prompt on input line n uses seed+n, on whichever replica")
    ap.add_argument("--sampling", default=None, help="JSON object of extra vllm.SamplingParams fields")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="prompts per engine call; results are written after each call")
    ap.add_argument("--wait-replicas", type=float, default=0, metavar="SECONDS",
                    help="wait up to this long for all replicas to start before sending prompts "
                         "(default 0: start with the first ready one; for benchmarks)")
    ap.add_argument("--address", default=None,
                    help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (default: all)")
    ap.add_argument("--cpus-per-replica", type=float, default=None,
                    help="default: cluster CPUs / replicas on CPU machines, 1 with GPUs")
    ap.add_argument("--gpus-per-replica", type=float, default=None,
                    help="default: tensor x pipeline parallel size (0 on CPU, and with the "
                         "'ray' distributed executor, which places its own workers)")
    ap.add_argument("--runtime-env", default=None,
                    help='JSON Ray runtime_env for the job, e.g. \'{"pip": [...]}\' for remote clusters')
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the engine actors (repeatable)")
    ap.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                    help="what the engines run on (auto: this machine's vLLM platform)")
    ap.add_argument("--stats-json", type=Path, default=None, help="write run statistics here")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="show Ray Data and engine logs")
    return ap


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def actor_env(cpu: bool, cpus_per_replica: float, user_env: dict[str, str]) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if cpu:
        threads = str(max(1, int(cpus_per_replica)))
        env.update({
            # uniproc executor in the actor itself, torch using the actor's CPU share
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "OMP_NUM_THREADS": threads,
            # vLLM's CPU default is a fraction of the node's memory per engine; with
            # several engines per node give each a fixed KV budget (GiB) instead
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
        })
    env.update(user_env)
    return env


def run(args: argparse.Namespace) -> int:
    stats = Stats()
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    engine_args = _json_arg(args.engine_args, "engine-args")
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    sampling.update(_json_arg(args.sampling, "sampling"))
    runtime_env = _json_arg(args.runtime_env, "runtime-env")
    user_env = {}
    for item in args.env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SystemExit(f"--env {item!r}: expected KEY=VALUE")
        user_env[k] = v
    if args.replicas < 1 or args.batch_size < 1:
        raise SystemExit("--replicas and --batch-size must be >= 1")
    if not args.input.is_file():
        raise SystemExit(f"--input {args.input}: no such file")

    errors_path = args.output.with_name(args.output.name + ".errors.jsonl")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    done = scan_output(args.output, warn=say)
    todo, bad, skipped = read_requests(args.input, done)
    stats.total_valid, stats.skipped, stats.bad_lines = len(todo) + skipped, skipped, len(bad)
    with open(errors_path, "w", encoding="utf-8") as ef:
        for e in bad:
            say(f"{args.input}:{e['line']}: {e['error']}")
            ef.write(json.dumps(e) + "\n")
    say(f"{len(todo)} prompts to run, {skipped} already in {args.output}, {len(bad)} bad input lines")

    if not todo:
        return _finish(args, stats, say)

    # Fail fast on options vLLM would reject, before any cluster or engine starts.
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    try:
        SamplingParams(**sampling)
        EngineArgs(model=args.model, **engine_args)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"bad engine or sampling arguments: {e}")

    import ray
    import ray.data

    cpu = {"cpu": True, "gpu": False}.get(args.device) if args.device != "auto" else _is_cpu_platform()
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    init_kw: dict[str, Any] = dict(log_to_driver=args.verbose, logging_level=logging.INFO if args.verbose else logging.WARNING)
    if address:
        init_kw["address"] = address
    else:
        init_kw.update(address="local", num_cpus=args.num_cpus, include_dashboard=False,
                       _node_ip_address="127.0.0.1")
    ray.init(runtime_env=runtime_env or None, **init_kw)
    try:
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
        tp = int(engine_args.get("tensor_parallel_size", 1)) * int(engine_args.get("pipeline_parallel_size", 1))
        ray_executor = engine_args.get("distributed_executor_backend") == "ray"
        cpus = args.cpus_per_replica or (max(1.0, math.floor(cluster_cpus / args.replicas)) if cpu else 1.0)
        gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (0 if cpu or ray_executor else tp)
        if cpu and not address and cpus * args.replicas > cluster_cpus:
            raise SystemExit(f"{args.replicas} replicas x {cpus} CPUs do not fit the local cluster's "
                             f"{cluster_cpus:g} CPUs (lower --cpus-per-replica or raise --num-cpus)")
        # Actor-level env_vars are merged into the job's runtime_env (pip, py_modules, ...).
        # Precedence: --env over the runtime_env's env_vars over the CPU defaults.
        env = {**actor_env(cpu, cpus, {}), **runtime_env.get("env_vars", {}), **user_env}
        try:
            return _stream(args, todo, engine_args, sampling, cpus, gpus, {"env_vars": env}, errors_path, stats, say)
        except Exception as e:  # noqa: BLE001 - engine start-up or Ray failure: report, keep results
            say(f"error: {type(e).__name__}: {str(e)[-4000:]}")
            say(f"{stats.completed} results saved in {args.output}; fix the cause and run the same "
                "command again to resume")
            _finish(args, stats, say)
            return EXIT_FATAL
    finally:
        ray.shutdown()


def _stream(args, todo, engine_args, sampling, cpus, gpus, job_env, errors_path, stats, say) -> int:
    import ray.data
    from tqdm import tqdm

    from vllm_lminf.batch import Replica  # by reference, also when this file runs as __main__

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(args.verbose)
    ctx.execution_options.preserve_order = False
    ctx.max_consecutive_actor_init_deaths = 2 * args.replicas  # a broken engine fails the run
    if args.wait_replicas > 0:
        ctx.wait_for_min_actors_s = int(math.ceil(args.wait_replicas))
    if not args.verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)

    # Enough blocks to keep every replica busy; Ray Data would merge blocks smaller than
    # batch_size, so the batch size is what the blocks hold.
    n_blocks = max(math.ceil(len(todo) / args.batch_size), min(len(todo), args.replicas))
    batch_size = math.ceil(len(todo) / n_blocks)
    rows = [{"row": i, "line": r.line, "req": r.payload()} for i, r in enumerate(todo)]
    ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
    remote = dict(num_cpus=cpus, runtime_env=job_env)
    if gpus:
        remote["num_gpus"] = gpus
    ds = ds.map_batches(
        Replica,
        fn_constructor_kwargs=dict(model=args.model, engine_args=engine_args, sampling=sampling, seed=args.seed),
        batch_size=batch_size,
        batch_format="numpy",
        # One block in flight per engine: a replica that is ready first does not queue up
        # blocks that a replica still starting could take (LLM.generate is synchronous).
        compute=ray.data.ActorPoolStrategy(size=args.replicas, max_tasks_in_flight_per_actor=1),
        **remote,
    )
    bar = tqdm(total=len(todo), unit="prompt", desc="batch", file=sys.stderr,
               disable=args.no_progress, dynamic_ncols=True)
    try:
        with open(args.output, "a", encoding="utf-8") as out, open(errors_path, "a", encoding="utf-8") as ef:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                lines, errs = [], []
                for row, res, meta in zip(batch["row"], batch["res"], batch["meta"]):
                    req = todo[int(row)]
                    rec = json.loads(str(res))
                    if "error" in rec:
                        errs.append({"line": req.line, "id": req.id, "error": "engine: " + rec["error"]})
                        continue
                    lines.append(json.dumps({"id": req.id, **rec}) + "\n")
                    stats.prompt_tokens += rec["prompt_tokens"]
                    stats.completion_tokens += rec["completion_tokens"]
                if len(batch["meta"]):
                    stats.add_meta(json.loads(str(batch["meta"][0])), len(batch["meta"]))
                out.writelines(lines)
                out.flush()
                os.fsync(out.fileno())
                for e in errs:
                    say(f"{args.input}:{e['line']}: {e['error']}")
                    ef.write(json.dumps(e) + "\n")
                ef.flush()
                stats.completed += len(lines)
                stats.failed += len(errs)
                bar.update(len(lines) + len(errs))
    except KeyboardInterrupt:
        bar.close()
        say(f"interrupted: {stats.completed} results saved in {args.output}; "
            "run the same command again to resume")
        _finish(args, stats, say)
        return EXIT_INTERRUPTED
    bar.close()
    return _finish(args, stats, say)


def _finish(args, stats: Stats, say) -> int:
    stats.finished = time.time()
    d = stats.as_dict()
    rate = f", {d['prompts_per_s']} prompts/s, {d['completion_tokens_per_s']} generated tokens/s" if d["prompts_per_s"] else ""
    say(f"done: {stats.completed} new results, {stats.skipped} skipped (already done), "
        f"{stats.bad_lines} bad lines, {stats.failed} failed prompts in {d['wall_s']:.1f} s{rate}")
    if args.stats_json:
        args.stats_json.parent.mkdir(parents=True, exist_ok=True)
        args.stats_json.write_text(json.dumps(d, indent=2) + "\n")
    return EXIT_PARTIAL if (stats.bad_lines or stats.failed) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
