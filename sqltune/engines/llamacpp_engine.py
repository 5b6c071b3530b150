"""The llama.cpp engine: llama.cpp's own server loop, in-process through `xllamacpp`, on a GGUF file.

    sqltune serve --model ./models/smollm2-135m-sql --engine llamacpp               # exports q8_0 once
    sqltune serve --model ./models/smollm2-135m-sql --engine llamacpp --gguf-quant f16
    sqltune serve --model ./sql.Q8_0.gguf --engine llamacpp                         # a file `sqltune export` wrote

llama.cpp runs `--max-batch-size` slots with continuous batching on its own thread pool (threads = the
CPUs this process may use). Each request is one call into llama.cpp's completion handler on a worker
thread; tokens come back through a callback, which returns True to stop: that is how a client that went
away cancels its slot. Every request carries its own parameters, so one bad request is answered with
its own error and never touches the others. llama.cpp does not preempt a slot, so a request takes a slot
only within its share (sqltune.engines.fair.SlotShares: at most half the slots, and capacity / the requests
holding or waiting): a request's n choices or candidates leave room for the next client.

The prompt goes in as token ids (`prompts.encode_prompt` of the folder's tokenizer, BOS included), so
llama.cpp decodes exactly what training saw; the round-trip tests check llama.cpp's own tokenizer gives
the same ids. A model folder is exported to GGUF once into the model cache (`<cache>/gguf-export/`,
keyed by the folder's manifest digest and the quant) in a child process, so the export's fp32 copy of
the weights never stays in the server's memory. `--constrain` grammars (xgrammar EBNF) are translated
to llama.cpp's GBNF (`to_gbnf`). Each token's log-probability comes back (n_probs = 1), so
Delta.logprob / Completion.logprob hold the completion's cumulative log-prob when the contract has them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.config import Config
from sqltune.engines import fair
from sqltune.engines.base import Delta, EngineBase, SamplingParams
from sqltune.errors import ModelError
from sqltune.prompts import PromptTemplate, encode_prompt

log = logs.get("serve.llamacpp")
PIP = "pip install 'sqltune[llamacpp]'  (or: pip install xllamacpp)"


def xllamacpp() -> Any:
    try:
        import xllamacpp as xl
    except ImportError:
        raise ModelError("--engine llamacpp needs the `xllamacpp` package (llama.cpp for Python)", PIP) from None
    return xl


def cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def open_server(path: Path, *, slots: int = 1, threads: int | None = None, n_ctx_per_slot: int = 1024) -> Any:
    """llama.cpp's server on `path`, loaded and ready (its HTTP side listens on a free loopback port)."""
    xl = xllamacpp()
    params = xl.CommonParams()
    params.model.path = str(path)
    params.n_parallel = int(slots)
    params.n_ctx = int(slots) * int(n_ctx_per_slot)
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = int(threads or cpu_threads())
    params.port = 0  # a free port on loopback (its default host)
    params.endpoint_metrics = True  # its own /metrics on the loopback port, beside sqltune's
    params.warmup = False
    params.verbosity = 0
    try:
        return xl.Server(params)
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"llama.cpp cannot load {path}: {e}",
                         "re-export the model with `sqltune export gguf`; llama.cpp's log above says why") from None


def tokenize(server: Any, text: str, add_special: bool = True) -> list[int]:
    """llama.cpp's own tokenization of `text` (its /tokenize route). Special-token text (a chat template's
    `<|im_start|>`) becomes the special token, as transformers' tokenizers (and so encode_prompt) read it."""
    body = json.dumps({"content": text, "add_special": add_special, "parse_special": True}).encode()
    request = urllib.request.Request(server.listening_address + "/tokenize", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return list(json.loads(response.read())["tokens"])


def completion_body(prompt_ids: Sequence[int], params: SamplingParams, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": [int(i) for i in prompt_ids], "max_tokens": int(params.max_tokens), "stream": stream,
        "temperature": float(params.temperature), "top_p": float(params.top_p), "stop": list(params.stop),
        "n_probs": 1, "cache_prompt": True,
    }
    if params.temperature <= 0:
        body.update(temperature=0.0, top_k=1)
    if params.seed is not None:
        body["seed"] = int(params.seed)
    if params.grammar:
        body["grammar"] = to_gbnf(params.grammar)
    return body


def request_phases(prompt_ids: Sequence[int], params: SamplingParams) -> list[dict[str, Any]]:
    """The llama.cpp requests one sqltune request becomes. llama.cpp has no min_tokens: with it, the
    first `min_tokens` are generated with EOS and stop strings ignored, then the rest goes on from there
    (one request when min_tokens covers max_tokens: a fixed-length answer, as the load benchmark asks)."""
    body = completion_body(prompt_ids, params, stream=True)
    if params.min_tokens <= 0 or params.grammar:  # a grammar's state cannot carry over to a second request
        return [body]
    first = {**body, "ignore_eos": True, "stop": [], "max_tokens": min(params.min_tokens, params.max_tokens)}
    if params.min_tokens >= params.max_tokens:
        return [first]
    return [first, body]


def complete_ids(server: Any, prompt_ids: Sequence[int], max_tokens: int, stop: Sequence[str] = ()) -> str:
    """One greedy completion, blocking: the text llama.cpp generates after `prompt_ids`."""
    out = server.handle_completions(completion_body(prompt_ids, SamplingParams(max_tokens, stop=tuple(stop)), False))
    if "error" in out:
        raise ModelError(f"llama.cpp refused the request: {out['error'].get('message')}", "see the request above")
    return out["choices"][0]["text"]


# --- grammars ------------------------------------------------------------------------------------------

_LEXEME = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|[A-Za-z_][A-Za-z0-9_]*|\s+|.', re.S)


def to_gbnf(ebnf: str) -> str:
    """xgrammar EBNF -> llama.cpp GBNF. The dialects share `::=`, `|`, groups, `* + ? {m,n}`, strings
    and character classes; llama.cpp's rule names are letters, digits and `-` only, so `_` in names
    becomes `-` (never inside a string or a class). Lookaheads `(= ...)` exist only in xgrammar and
    are refused by name."""
    out = []
    for lexeme in _LEXEME.findall(ebnf):
        if lexeme[0] in '"[':
            out.append(lexeme)
        elif lexeme[0].isalpha() or lexeme[0] == "_":
            out.append(lexeme.replace("_", "-"))
        else:
            out.append(lexeme)
    text = "".join(out)
    if "(=" in re.sub(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]', "", text):
        raise ValueError("the grammar uses an xgrammar lookahead, which llama.cpp's GBNF does not have")
    return text


# --- the engine ------------------------------------------------------------------------------------------


def export_once(model_dir: Path, quant: str, cache_root: Path) -> Path:
    """The folder's GGUF at `quant` in the model cache, written by `sqltune export gguf` in a child
    process the first time (under a lock, so two servers export once) and reused after."""
    from sqltune.artifacts import manifests

    manifest = json.loads((model_dir / manifests.MANIFEST).read_text()) if (model_dir / manifests.MANIFEST).is_file() else {}
    key = str(manifest.get("digest") or manifests.sha256_file(model_dir / "config.json"))[:16]
    target = Path(cache_root) / "gguf-export" / key / f"model.{quant}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with manifests.locked(target.parent / ".lock"):
        if not target.is_file():
            logs.event(log, "exporting the model to GGUF once", model=str(model_dir), quant=quant, out=str(target))
            cmd = [sys.executable, "-m", "sqltune", "export", "gguf", "--model", str(model_dir), "--out", str(target),
                   "--quant", quant, "--modelfile", "none"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not target.is_file():
                why, fix = export_failure(done.returncode, done.stderr)
                raise ModelError(f"exporting {model_dir} to GGUF in the model cache ({target.parent}) failed: {why}",
                                 fix or f"run `sqltune export gguf --model {model_dir} --out model.gguf` to see the "
                                        "whole error")
    return target


def export_failure(returncode: int, stderr: str) -> tuple[str, str]:
    """(why, fix) of a failed export child: its own one-line error and fix when it printed one (a full
    disk, a model it cannot export), the signal that killed it, or its last line of output."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        oom = " (the kernel's out-of-memory killer sends SIGKILL: the export holds the whole model in memory)"
        return f"the export process was killed by {name}{oom if name == 'SIGKILL' else ''}", ""
    lines = [line for line in stderr.splitlines() if line.strip()]
    at = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("sqltune: error: ")), -1)
    if at >= 0:
        fix = next((line.strip().removeprefix("fix:").strip() for line in lines[at + 1:at + 2]
                    if line.strip().startswith("fix:")), "")
        return lines[at].removeprefix("sqltune: error: "), fix
    if not lines:
        return f"the export process exited {returncode} without a word", ""
    return f"the export process exited {returncode}: {lines[-1].strip()[-300:]}", ""


class LlamaCppEngine(EngineBase):
    name = "llamacpp"

    def __init__(self, cfg: Config, model_dir: Path, template: PromptTemplate, meta: dict) -> None:
        super().__init__(cfg, model_dir, template, meta)
        xllamacpp()  # a missing package fails at start-up, not after the app is up
        self.quant = getattr(cfg, "gguf_quant", "q8_0")
        self.threads = cpu_threads()
        self.gguf_path: Path | None = None
        self.server: Any = None
        self.tokenizer: Any = None
        self._eos: str | None = meta.get("eos_token")
        self._pool = ThreadPoolExecutor(max_workers=self.capacity + 2, thread_name_prefix="sqltune-llamacpp")
        self._on_batch: Callable[[int], None] | None = None
        self._active = 0
        self._lock = threading.Lock()
        self._shares = fair.SlotShares(self.capacity)

    @property
    def eos_token(self) -> str | None:
        return self._eos

    async def start(self, on_batch: Callable[[int], None] | None = None) -> None:
        self._on_batch = on_batch
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from sqltune.artifacts import storage

        if self.model_dir.is_file() and self.model_dir.suffix == ".gguf":
            self.gguf_path = self.model_dir
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self.gguf_path = export_once(self.model_dir, self.quant, storage.cache_root())
        per_slot = min(self.max_model_len, 4096)
        self.server = open_server(self.gguf_path, slots=self.capacity, threads=self.threads, n_ctx_per_slot=per_slot)
        logs.event(log, "llama.cpp loaded", gguf=str(self.gguf_path), slots=self.capacity, threads=self.threads,
                   ctx_per_slot=per_slot)

    async def close(self) -> None:
        server, self.server = self.server, None
        self._pool.shutdown(wait=False, cancel_futures=True)
        holder = [server] if server is not None else []
        del server
        await asyncio.to_thread(holder.clear)  # the last reference goes off the loop: llama.cpp joins its thread

    def prepare_grammar(self, grammar: str) -> None:
        from sqltune.constrain import GrammarError

        try:
            to_gbnf(grammar)
        except ValueError as e:
            raise GrammarError(str(e)) from None

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is not None:
            return encode_prompt(self.tokenizer, prompt)
        return tokenize(self.server, prompt, add_special=True)  # a bare .gguf: llama.cpp's tokenizer (same ids)

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams,
                     deltas: bool = True) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        cancelled = threading.Event()
        n_prompt = len(prompt_ids)
        try:
            phases = request_phases(prompt_ids, params)
        except ValueError as e:
            yield Delta("", n_prompt, 0, "error", str(e))
            return
        group = fair.group_key()
        await self._shares.acquire(group)  # a fair share of the slots per request (sqltune.engines.fair)
        future = loop.run_in_executor(self._pool, self._run, phases, n_prompt, queue, loop, cancelled, deltas)
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason:
                    return
        finally:
            cancelled.set()  # client gone or done: the callback answers True and llama.cpp frees the slot
            if not future.done():
                future.add_done_callback(lambda f: f.exception())
            await self._shares.release(group)

    def _run(self, phases: list[dict], n_prompt: int, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop,
             cancelled: threading.Event, deltas: bool) -> None:
        state: dict[str, Any] = {"n": 0, "held": [], "logprob": 0.0, "done": False, "ids": []}

        def send(delta: Delta) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, delta)

        def on_chunk(chunk: Any, last_phase: bool) -> bool:
            if cancelled.is_set():
                return True
            data = json.loads(chunk) if isinstance(chunk, str) else chunk
            if "error" in data:
                state["done"] = True
                send(Delta("".join(state["held"]), n_prompt, state["n"], "error", str(data["error"].get("message"))))
                return True
            choice = (data.get("choices") or [{}])[0]
            text = choice.get("text") or ""
            for item in ((choice.get("logprobs") or {}).get("content") or []):
                state["n"] += 1
                state["ids"].append(int(item["id"]))
                state["logprob"] += float(item.get("logprob") or 0.0)
            finish = choice.get("finish_reason") if last_phase else None
            if not deltas and not finish:
                state["held"].append(text)
                return False
            if finish:
                text = "".join(state["held"]) + text
                state["done"] = True
            if text or finish:
                send(_delta(text, n_prompt, state["n"], finish, logprob=state["logprob"]))
            return bool(finish)

        self._busy(+1)
        try:
            for i, body in enumerate(phases):
                last = i == len(phases) - 1
                if i:  # the second phase goes on from what the first generated
                    body = {**body, "prompt": body["prompt"] + state["ids"],
                            "max_tokens": body["max_tokens"] - state["n"]}
                self.server.handle_completions(body, lambda chunk, last=last: on_chunk(chunk, last))
                if state["done"] or cancelled.is_set():
                    break
        except Exception as e:  # noqa: BLE001 - this request's failure, reported on its own stream only
            if not state["done"]:
                state["done"] = True
                send(Delta("".join(state["held"]), n_prompt, state["n"], "error", f"llama.cpp: {e}"))
        finally:
            self._busy(-1)
        if not state["done"] and not cancelled.is_set():
            send(_delta("".join(state["held"]), n_prompt, state["n"], "stop", logprob=state["logprob"]))

    def _busy(self, change: int) -> None:
        with self._lock:
            self._active += change
            active = self._active
        if change > 0 and self._on_batch is not None:
            self._on_batch(active)


def _delta(text: str, n_prompt: int, n: int, finish: str | None, *, logprob: float) -> Delta:
    """A Delta, with the cumulative log-prob where the contract has the field."""
    fields = getattr(Delta, "__dataclass_fields__", {})
    if finish is not None and finish not in ("stop", "length"):
        finish = "stop"
    extra = {"logprob": logprob} if "logprob" in fields else {}
    return Delta(text, n_prompt, n, finish, **extra)
