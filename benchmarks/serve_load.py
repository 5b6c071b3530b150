"""Serving throughput under concurrent load, loopback only: sqltune's batching transformers engine
against a plain one-request-at-a-time transformers server, sqltune's vLLM engine against vLLM's own
OpenAI server, and sqltune's llama.cpp engine against llama.cpp's own server (the same xllamacpp
wheel, the same GGUF, the same threads and slots), on the same model.

    nice -n 10 python benchmarks/serve_load.py                          # trains a tiny model first
    nice -n 10 python benchmarks/serve_load.py --model models/sqltune-sql --levels 1,4,16,64
    python benchmarks/serve_load.py --skip-vllm                          # without .venv-vllm
    python benchmarks/serve_load.py --model models/smollm2-135m-sql --only-llamacpp --levels 1,4,16 --batch 16
    python benchmarks/serve_load.py --model models/smollm2-135m-sql --only-dtypes   # transformers fp32 vs bf16

llama.cpp's server gets `ignore_eos` where sqltune gets min_tokens = max_tokens: both generate exactly
--tokens tokens. The resident memory (RSS) of each server process is read after every level; the
largest goes in the results.

Every request asks for exactly --tokens tokens (min_tokens = max_tokens), so servers are compared
on the same work. Each concurrency level sends a bounded number of requests (--requests-per-client
per client, at least 8) with a time cap; results go to benchmarks/results/serve_load.json.
Targets: at 16 clients sqltune >= 4x the plain server's tokens/s; sqltune+vLLM >= 95% of vLLM's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SHARED = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"


# --- the plain server: one request at a time, model.generate per request ---------------------------

def plain_server(model_dir: str, port: int) -> None:
    """What serving looks like without batching: a single-threaded HTTP server calling generate()."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._reply(200, {"status": "ready"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = tok(body["prompt"], add_special_tokens=False, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=body["max_tokens"],
                                     min_new_tokens=body.get("min_tokens", 0), do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            new = out[0, ids["input_ids"].shape[1]:]
            self._reply(200, {"choices": [{"text": tok.decode(new, skip_special_tokens=True)}],
                              "usage": {"prompt_tokens": int(ids["input_ids"].shape[1]),
                                        "completion_tokens": int(new.shape[0])}})

        def _reply(self, status: int, data: dict[str, Any]) -> None:
            raw = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: Any) -> None:
            pass

    class Plain(HTTPServer):
        request_queue_size = 256  # waiting clients queue in the listen backlog, served one by one

    Plain(("127.0.0.1", port), Handler).serve_forever()


# --- servers under test ------------------------------------------------------------------------------

class Server:
    def __init__(self, name: str, cmd: list[str], url: str, ready_path: str, env: dict[str, str]) -> None:
        self.name, self.cmd, self.url, self.ready_path = name, cmd, url, ready_path
        self.env = {**os.environ, **env}
        self.log = tempfile.NamedTemporaryFile(prefix=f"serve-load-{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: see {self.log.name}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready: see {self.log.name}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def free_port() -> int:
    from sqltune.serve.process import free_port as fp

    return fp()


def sqltune_server(name: str, model: str, engine: str, python: str, batch: int, dtype: str = "",
                   env: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> Server:
    port = free_port()
    cmd = [python, "-m", "sqltune", "serve", "--model", model, "--engine", engine, "--host", "127.0.0.1",
           "--port", str(port), "--max-batch-size", str(batch), "--max-queue", "256", "--max-tokens-limit", "2048",
           "--request-timeout", "600", "--log-level", "warning", "--served-model-name", "sqltune-sql", *extra]
    if dtype:
        cmd += ["--dtype", dtype]
    if engine == "vllm":
        cmd.append("--vllm-enforce-eager")
    return Server(name, cmd, f"http://127.0.0.1:{port}", "/ready", {"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})})


def measure_llamacpp(model: str, prompts: list[str], levels: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """sqltune (transformers, then llama.cpp) and llama.cpp's own server on one GGUF, exported once into a
    cache both llama.cpp servers read; the same threads (the CPUs this process may use) and slots."""
    sys.path.insert(0, str(ROOT))
    from sqltune.engines.llamacpp_engine import cpu_threads, export_once

    cache = Path(tempfile.mkdtemp(prefix="serve-load-cache-"))
    gguf = export_once(Path(model), args.gguf_quant, cache)
    out = {"sqltune-transformers": measure(sqltune_server("sqltune-transformers", model, "transformers",
                                                          sys.executable, args.batch), prompts, levels, args)}
    out["sqltune-llamacpp"] = measure(sqltune_server(
        "sqltune-llamacpp", model, "llamacpp", sys.executable, args.batch, env={"SQLTUNE_CACHE": str(cache)},
        extra=("--gguf-quant", args.gguf_quant, "--max-model-len", "1024")), prompts, levels, args)  # 1024 a slot, as below
    out["llamacpp-server"] = measure(llamacpp_own_server(str(gguf), args.batch, cpu_threads()), prompts, levels,
                                     args, extra={"ignore_eos": True})
    return out


def vllm_own_server(model: str, batch: int) -> Server:
    port = free_port()
    # the same engine settings as sqltune's vLLM engine: fp32 on CPU, eager, the same batch size
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "sqltune-sql", "--dtype", "float32", "--enforce-eager",
           "--max-num-seqs", str(batch), "--disable-log-stats", "--uvicorn-log-level", "warning"]
    return Server("vllm-openai", cmd, f"http://127.0.0.1:{port}", "/health", {"VLLM_CPU_KVCACHE_SPACE": "1"})


def llamacpp_own_server(gguf: str, slots: int, threads: int) -> Server:
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "llamacpp-server", "--model", gguf, "--port", str(port),
           "--slots", str(slots), "--threads", str(threads)]
    return Server("llamacpp-server", cmd, f"http://127.0.0.1:{port}", "/health", {})


def run_llamacpp_server(gguf: str, port: int, slots: int, threads: int) -> None:
    """llama.cpp's own HTTP server (the wheel's build of llama-server), nothing of sqltune in the path."""
    import xllamacpp as xl

    params = xl.CommonParams()
    params.model.path = gguf
    params.n_parallel, params.n_ctx = slots, slots * 1024
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    params.port = port
    params.warmup = False
    server = xl.Server(params)
    print("listening", server.listening_address, flush=True)
    while True:
        time.sleep(3600)


def plain(model: str) -> Server:
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "plain-server", "--model", model, "--port", str(port)]
    return Server("plain-transformers", cmd, f"http://127.0.0.1:{port}", "/", {})


# --- load ---------------------------------------------------------------------------------------------

async def run_level(url: str, path: str, prompts: list[str], clients: int, requests: int, tokens: int,
                    cap_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    completion_tokens = 0
    errors = 0
    sent = 0
    started = time.perf_counter()

    async def client(http: httpx.AsyncClient, k: int) -> None:
        nonlocal completion_tokens, errors, sent
        while sent < requests and time.perf_counter() - started < cap_s:
            prompt = prompts[(sent + k) % len(prompts)]
            sent += 1
            t0 = time.perf_counter()
            body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "model": "sqltune-sql"}
            r = await http.post(url + path, json={**body, **(extra or {"min_tokens": tokens})})
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            completion_tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http, k) for k in range(clients)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "errors": errors, "seconds": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 3), "tokens_per_s": round(completion_tokens / wall, 1),
            "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3) if latencies else None}


def rss_mb(server: Server) -> float:
    import psutil

    proc = psutil.Process(server.proc.pid)  # type: ignore[union-attr]
    return round(sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20, 1)


def measure(server: Server, prompts: list[str], levels: list[int], args: argparse.Namespace,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with server:
        asyncio.run(run_level(server.url, "/v1/completions", prompts, 2, 4, args.tokens, 120, extra))  # warm-up
        rss = [rss_mb(server)]
        for clients in levels:
            requests = max(8, clients * args.requests_per_client)
            row = asyncio.run(run_level(server.url, "/v1/completions", prompts, clients, requests, args.tokens,
                                        args.cap_seconds, extra))
            rss.append(rss_mb(server))
            row["rss_mb"] = rss[-1]
            print(f"  {server.name:20s} clients={clients:3d}  {row['requests_per_s']:7.2f} req/s  "
                  f"{row['tokens_per_s']:8.1f} tok/s  p50 {row['p50_s']}s  p99 {row['p99_s']}s  "
                  f"errors {row['errors']}", flush=True)
            out[str(clients)] = row
    out["max_rss_mb"] = max(rss)
    return out


def load_prompts(model: str, n: int = 256) -> list[str]:
    from sqltune.data.loading import read_rows
    from sqltune.prompts import load_template

    template = load_template(model)
    if SHARED.is_file():
        rows = [r for _, r in zip(range(n), read_rows(str(SHARED)), strict=False)]
    else:
        from sqltune.data import synthetic

        rows = list(synthetic.generate(n, seed=11))
    return [template.build_prompt(r["question"], r["context"]) for r in rows]


def tiny_model() -> str:
    out = Path(tempfile.mkdtemp(prefix="serve-load-model-")) / "model"
    subprocess.run([sys.executable, "-m", "sqltune", "finetune", "--model", "tiny", "--method", "full",
                    "--dataset", "synthetic:1500", "--learning-rate", "0.003", "--max-steps", "60",
                    "--train-batch-size", "16", "--save-steps", "1000", "--tiny-layers", "2",
                    "--eval-generate-limit", "0", "--output", str(out)], check=True, cwd=ROOT)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    ps = sub.add_parser("plain-server")
    ps.add_argument("--model", required=True)
    ps.add_argument("--port", type=int, required=True)
    pl = sub.add_parser("llamacpp-server")
    pl.add_argument("--model", required=True)
    pl.add_argument("--port", type=int, required=True)
    pl.add_argument("--slots", type=int, required=True)
    pl.add_argument("--threads", type=int, required=True)
    p.add_argument("--model", help="a finished sqltune model folder (default: train a tiny one)")
    p.add_argument("--levels", default="1,4,16,64")
    p.add_argument("--tokens", type=int, default=48, help="tokens generated per request")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--cap-seconds", type=float, default=180, help="stop a level after this long")
    p.add_argument("--batch", type=int, default=32, help="max batch size of the batching servers")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--only-vllm", action="store_true", help="just sqltune+vLLM against vLLM's own server")
    p.add_argument("--only-transformers", action="store_true", help="just sqltune against the plain server")
    p.add_argument("--only-llamacpp", action="store_true",
                   help="sqltune --engine transformers and --engine llamacpp against llama.cpp's own server")
    p.add_argument("--only-dtypes", action="store_true", help="sqltune's transformers engine, fp32 against bf16")
    p.add_argument("--gguf-quant", default="q8_0", help="the GGUF both llama.cpp servers load")
    args = p.parse_args(argv)
    if args.mode == "plain-server":
        plain_server(args.model, args.port)
        return 0
    if args.mode == "llamacpp-server":
        run_llamacpp_server(args.model, args.port, args.slots, args.threads)
        return 0

    model = args.model or tiny_model()
    levels = [int(x) for x in args.levels.split(",")]
    prompts = load_prompts(model)
    results: dict[str, Any] = {}
    print(f"model {model}; {args.tokens} tokens per request; levels {levels}", flush=True)
    if args.only_llamacpp:
        results.update(measure_llamacpp(model, prompts, levels, args))
    elif args.only_dtypes:
        for dtype in ("fp32", "bf16"):
            results[f"sqltune-transformers-{dtype}"] = measure(sqltune_server(
                f"sqltune-transformers-{dtype}", model, "transformers", sys.executable, args.batch, dtype),
                prompts, levels, args)
    elif not args.only_vllm:
        results["sqltune-transformers"] = measure(sqltune_server("sqltune-transformers", model, "transformers",
                                                                 sys.executable, args.batch), prompts, levels, args)
    if not args.skip_plain and not args.only_vllm and not args.only_llamacpp and not args.only_dtypes:
        results["plain-transformers"] = measure(plain(model), prompts, levels, args)
    if not args.skip_vllm and not args.only_transformers and VLLM_PYTHON.exists():
        results["sqltune-vllm"] = measure(sqltune_server("sqltune-vllm", model, "vllm", str(VLLM_PYTHON),
                                                         args.batch), prompts, levels, args)
        results["vllm-openai"] = measure(vllm_own_server(model, args.batch), prompts, levels, args)

    # the llama.cpp and dtype comparisons keep a file of their own, so the other servers' figures stay
    results_path = RESULTS.with_name("serve_load_llamacpp.json") if args.only_llamacpp or args.only_dtypes else RESULTS
    command = "nice -n 10 python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    commands = {**previous.get("commands", {}), **{name: command for name in results}}
    if previous.get("tokens_per_request") == args.tokens and previous.get("levels") == levels:
        results = {**previous.get("results", {}), **results}  # a partial run updates its servers only
    ratios: dict[str, Any] = {}
    if "plain-transformers" in results and "sqltune-transformers" in results:
        ratios["batching_vs_plain_tokens_per_s"] = {
            c: round(results["sqltune-transformers"][c]["tokens_per_s"] / results["plain-transformers"][c]["tokens_per_s"], 2)
            for c in results["plain-transformers"] if c != "max_rss_mb"}
    if "vllm-openai" in results:
        ratios["sqltune_vllm_vs_vllm_openai_tokens_per_s"] = {
            c: round(results["sqltune-vllm"][c]["tokens_per_s"] / results["vllm-openai"][c]["tokens_per_s"], 3)
            for c in results["vllm-openai"] if c != "max_rss_mb"}
    for mine, theirs, key in (("sqltune-llamacpp", "llamacpp-server", "sqltune_llamacpp_vs_llamacpp_server"),
                              ("sqltune-transformers", "llamacpp-server", "sqltune_transformers_vs_llamacpp_server"),
                              ("sqltune-transformers-bf16", "sqltune-transformers-fp32", "transformers_bf16_vs_fp32")):
        if mine in results and theirs in results:
            ratios[key + "_tokens_per_s"] = {
                c: round(results[mine][c]["tokens_per_s"] / results[theirs][c]["tokens_per_s"], 3)
                for c in results[theirs] if c in results[mine] and c != "max_rss_mb" and results[theirs][c]["tokens_per_s"]}
    report = {
        "benchmark": "serve_load", "model": model, "tokens_per_request": args.tokens, "levels": levels,
        "batch": args.batch, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")},
        "targets": {"batching_vs_plain_at_16": 4.0, "sqltune_vllm_vs_vllm_openai": 0.95,
                    "sqltune_llamacpp_vs_llamacpp_server": 0.95},
        "results": results, "ratios": ratios, "commands": commands,
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))
    print(f"wrote {results_path}")
    return 0


if __name__ == "__main__":  # vLLM spawns processes: the guard keeps them from re-running the benchmark
    sys.exit(main())
