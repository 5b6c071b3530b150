"""The transformers engine: dynamic batching on one worker thread, token by token.

Requests that arrive within `batch_wait_ms` of each other (up to `max_batch_size`) are left-padded
into one batch and decoded together with a shared KV cache; each row keeps its own max_tokens,
stop strings, temperature and seed, and leaves the batch (its cache rows dropped) when it
finishes, so short answers do not pay for long ones. A failure that belongs to one row (its seed,
its sampling) ends that row with an error and the others decode on: one request's parameters never
fail its neighbours. Torch runs on a thread of its own so the
event loop keeps serving /health, /metrics and new requests while a batch decodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.config import Config
from sqltune.constrain import closing
from sqltune.engines import fair
from sqltune.engines.base import Delta, EngineBase, SamplingParams
from sqltune.engines.text import TextStream
from sqltune.prompts import PromptTemplate, encode_prompt

log = logs.get("serve.engine")
SLICE_STEPS = 8  # decode steps between two looks at the queue for a request that waits for its share


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    out: asyncio.Queue[Delta]
    loop: asyncio.AbstractEventLoop
    deltas: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    text: TextStream | None = None
    generator: Any = None
    held: list[str] = field(default_factory=list)
    failed: str = ""  # why this row cannot go on; the batch drops it at the next step
    matcher: Any = None  # the row's grammar state (sqltune.constrain) when it decodes constrained
    logprob: float = 0.0  # cumulative log-probability of the tokens generated so far
    group: str = ""  # the request this row belongs to (sqltune.engines.fair)

    def gone(self) -> bool:
        return self.cancelled.is_set()

    def context_ids(self) -> list[int]:
        """What the model reads when this row (re)enters a batch: its prompt, and what it generated
        before it was preempted."""
        return self.prompt_ids + (self.text.ids if self.text is not None else [])

    def send(self, delta: Delta) -> None:
        if not self.deltas and not delta.finish_reason:  # non-streaming: one message at the end
            self.held.append(delta.text)
            return
        if self.held:
            delta = dataclasses.replace(delta, text="".join(self.held) + delta.text)
            self.held.clear()
        self.loop.call_soon_threadsafe(self.out.put_nowait, delta)


class TransformersEngine(EngineBase):
    name = "transformers"

    def __init__(self, cfg: Config, model_dir: Path, template: PromptTemplate, meta: dict,
                 loaded: Any = None) -> None:
        """`loaded` (a sqltune.generation.Loaded) serves a model already in memory, e.g. one read back
        from a GGUF; otherwise `start()` loads `model_dir`."""
        super().__init__(cfg, model_dir, template, meta)
        self._pending: queue.Queue[_Request | None] = queue.Queue()
        self._waiting = fair.FairQueue()  # the worker's own: rows admitted round-robin across requests
        self._stop = False
        self._thread: threading.Thread | None = None
        self._on_batch: Callable[[int], None] | None = None
        self._preloaded = loaded
        self.loaded: Any = None
        if loaded is not None:
            self._own_len = loaded.max_length

    @property
    def eos_token(self) -> str | None:
        return self.loaded.tokenizer.eos_token if self.loaded else None

    async def start(self, on_batch: Callable[[int], None] | None = None) -> None:
        self._on_batch = on_batch
        self.loaded = await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._worker, name="sqltune-generate", daemon=True)
        self._thread.start()

    def _load(self) -> Any:
        from sqltune import generation
        from sqltune.generation import choose_precision

        started = time.perf_counter()
        loaded = self._preloaded
        if loaded is None:
            if not logs.show_progress():
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            if self.cfg.safetensors_load_strategy == "eager":
                _read_whole(self.model_dir)
            loaded = generation.from_folder(self.model_dir, choose_precision(self.cfg.dtype), self.cfg.serve_device)
        eos = loaded.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos if eos is not None else loaded.tokenizer.eos_token_id]
        self._eos = {int(e) for e in eos if e is not None}
        params = inspect.signature(loaded.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        if self._preloaded is None:
            logs.event(log, "model loaded", engine=self.name, model=str(self.model_dir), device=str(loaded.device),
                       seconds=round(time.perf_counter() - started, 2), max_model_len=self.max_model_len)
        return loaded

    async def close(self) -> None:
        if self._thread is not None:
            self._pending.put(None)
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    def prepare_grammar(self, grammar: str) -> None:
        self.loaded.compiler.compile(grammar)  # cached by hash: the worker's compile is then a lookup

    def encode(self, prompt: str) -> list[int]:
        # as in training and sqltune.generation: the template carries the text, no special tokens added
        return encode_prompt(self.loaded.tokenizer, prompt)  # the ids the model was trained on

    async def stream(self, prompt_ids: Sequence[int], params: SamplingParams,
                     deltas: bool = True) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        req = _Request(list(prompt_ids), params, asyncio.Queue(), loop, deltas, group=fair.group_key())
        self._pending.put(req)
        try:
            while True:
                delta = await req.out.get()
                yield delta
                if delta.finish_reason:
                    return
        finally:
            req.cancelled.set()  # the worker drops the row at its next step

    # --- worker thread -------------------------------------------------------------------------

    def _worker(self) -> None:
        import torch

        with torch.inference_mode():
            self._serve_batches()

    def _serve_batches(self) -> None:
        self._stop = False
        while not self._stop:
            if not len(self._waiting):
                first = self._pending.get()
                if first is None:
                    return
                self._waiting.add(first)
                deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
                while len(self._waiting) < self.capacity and not self._stop:
                    try:
                        nxt = self._pending.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    self._arrived(nxt)
            self._drain_pending()
            batch = self._waiting.take(self.capacity)
            if batch:
                try:
                    self._waiting.requeue(self._run(batch))
                except Exception as e:  # a failed batch fails its requests, not the server
                    log.exception("generation failed")
                    for r in batch:
                        r.send(Delta("", len(r.prompt_ids), 0, "error", f"{type(e).__name__}: {e}"))

    def _arrived(self, item: _Request | None) -> None:
        if item is None:
            self._stop = True
        else:
            self._waiting.add(item)

    def _drain_pending(self) -> None:
        while True:
            try:
                self._arrived(self._pending.get_nowait())
            except queue.Empty:
                return

    def _preempt(self, rows: list[_Request]) -> bool:
        """Every SLICE_STEPS steps: whether a waiting request has less than its share of the batch."""
        self._drain_pending()
        return self._stop or self._waiting.starved(rows, self.capacity)

    def _run(self, batch: list[_Request]) -> list[_Request]:
        """Decode `batch` until its rows finish, or until waiting requests deserve rows (fair.py): then
        the unfinished rows are returned, to wait for their next turn with what they generated."""
        import torch
        from transformers import DynamicCache

        model, tok = self.loaded.model, self.loaded.tokenizer
        device = self.loaded.device
        if self._on_batch:
            self._on_batch(len(batch))
        # rows with the same prompt (a question's candidates, the n choices of one request) share one prefill:
        # each distinct prompt runs once, and its cache rows are copied to the rows that asked it
        distinct: dict[tuple[int, ...], int] = {}
        owner = [distinct.setdefault(tuple(r.context_ids()), len(distinct)) for r in batch]
        width = max(len(p) for p in distinct)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in distinct], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in distinct], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        for r in batch:
            if r.text is not None:
                continue  # preempted before: its text, generator and grammar state go on where they were
            r.text = TextStream(tok, r.params.stop, r.params.min_tokens)
            if r.params.temperature > 0:
                try:
                    r.generator = torch.Generator(device=device)
                    r.generator.manual_seed(r.params.seed if r.params.seed is not None else time.time_ns() % 2**63)
                except Exception as e:  # e.g. a seed torch cannot take: this row fails, not the batch
                    r.failed = f"{type(e).__name__}: {e}"
            if r.params.grammar:
                try:
                    r.matcher = self.loaded.compiler.matcher(r.params.grammar)
                except Exception as e:  # the route compiled it first, so this is rare: the row fails alone
                    r.failed = f"grammar: {e}"
        cache = DynamicCache()
        # transformers renamed `past_key_values` to `cache`; older releases (vLLM's pin) know only the first
        kv = {self._cache_kwarg: cache, "use_cache": True, "logits_to_keep": 1}
        rows = list(batch)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **kv).logits[:, -1, :]
        if len(distinct) < len(batch):
            index = torch.tensor(owner, device=device)
            cache.batch_select_indices(index)
            logits, mask, positions = logits[index], mask[index], positions[index]
        steps = 0
        while rows:
            steps += 1
            if steps % SLICE_STEPS == 0 and self._preempt(rows):
                return [r for r in rows if not r.cancelled.is_set()]
            # the chosen tokens' log-softmax under the raw logits (vLLM's raw_logprobs), taken before
            # _sample masks or scales them
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            tokens = self._sample(logits, rows)
            chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
            keep = [i for i, (r, t, lp) in enumerate(zip(rows, tokens.tolist(), chosen, strict=True))
                    if self._advance(r, t, lp)]
            if not keep:
                return []
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                rows, tokens, mask, positions = [rows[i] for i in keep], tokens[index], mask[index], positions[index]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            positions = positions[:, -1:] + 1
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                           **kv).logits[:, -1, :]

    def _sample(self, logits: Any, rows: list[_Request]) -> Any:
        import torch

        early = [i for i, r in enumerate(rows) if len(r.text.ids) < r.params.min_tokens]  # type: ignore[union-attr]
        if early:
            logits = logits.clone()
            logits[torch.tensor(early, device=logits.device)[:, None], torch.tensor(sorted(self._eos),
                   device=logits.device)[None, :]] = float("-inf")
        if any(r.matcher is not None for r in rows):
            from sqltune.constrain import mask_logits, wind_down_after

            left = [r.params.max_tokens - len(r.text.ids) - wind_down_after(r.params.max_tokens)  # type: ignore[union-attr]
                    for r in rows]
            logits = mask_logits(logits.contiguous(), [r.matcher for r in rows], self.loaded.compiler, left)
        greedy = logits.argmax(dim=-1)
        if all(r.params.temperature <= 0 for r in rows):
            return greedy
        out = greedy.clone()
        for i, r in enumerate(rows):
            if r.params.temperature <= 0 or r.failed:
                continue
            try:
                out[i] = self._sample_row(logits[i], r)
            except Exception as e:  # inf/nan probabilities and the like end this row alone
                r.failed = f"sampling failed: {type(e).__name__}: {e}"
        return out

    @staticmethod
    def _sample_row(logits: Any, r: _Request) -> Any:
        import torch

        probs = torch.softmax(logits.float() / r.params.temperature, dim=-1)
        if not bool(torch.isfinite(probs).all()):  # on CUDA, multinomial would assert and kill the context
            raise ValueError(f"temperature {r.params.temperature:g} gives probabilities that are not finite")
        if r.params.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cut = sorted_p.cumsum(0) - sorted_p > r.params.top_p  # keep the smallest set reaching top_p
            sorted_p[cut] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return torch.multinomial(probs, 1, generator=r.generator)[0]

    def _advance(self, r: _Request, token: int, logprob: float = 0.0) -> bool:
        """Feed one sampled token to its request; False when the request is finished."""
        assert r.text is not None
        n_prompt = len(r.prompt_ids)
        if r.cancelled.is_set():
            return False
        if r.failed:
            log.warning("request failed in the batch; the other rows go on", extra={"fields": {"error": r.failed}})
            r.send(Delta(r.text.flush(), n_prompt, len(r.text.ids), "error", r.failed, r.logprob))
            return False
        r.logprob += logprob
        if r.matcher is not None and not r.matcher.is_terminated() and not r.matcher.accept_token(token):
            r.matcher = None  # the mask allowed it, so this cannot happen; decode on rather than fail the row
        if token in self._eos:
            r.send(Delta(r.text.flush(), n_prompt, len(r.text.ids) + 1, "stop", logprob=r.logprob))
            return False
        piece = r.text.push(token)
        generated = len(r.text.ids)
        if r.text.stopped:
            r.send(Delta(piece, n_prompt, generated, "stop", logprob=r.logprob))
            return False
        if (generated >= r.params.max_tokens and not closing(r.matcher, generated, r.params.max_tokens)
                or n_prompt + generated >= self.max_model_len):
            r.send(Delta(piece + r.text.flush(), n_prompt, generated, "length", logprob=r.logprob))
            return False
        if piece:
            r.send(Delta(piece, n_prompt, generated, logprob=r.logprob))
        return True


def _read_whole(model_dir: Path, chunk: int = 16 << 20) -> None:
    """Read every weight file front to back once: on gcsfuse and other network mounts a sequential
    read is much faster than the random access of memory-mapping, and it leaves the pages cached."""
    started, total = time.perf_counter(), 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb", buffering=0) as fh:
            while block := fh.read(chunk):
                total += len(block)
    logs.event(log, "weights read eagerly", bytes=total, seconds=round(time.perf_counter() - started, 2))
