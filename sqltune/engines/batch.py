"""Synchronous batch generation over the server's engines: submit every request at once, collect the
completions in input order (vLLM's offline `LLM` over the same engine its server drives).

    with batch.open_model("./models/sql", engine="transformers", batch_size=16) as llm:
        ids = [llm.encode(llm.template.build_prompt(q, c)) for q, c in pairs]
        done = llm.generate([batch.Request(i, SamplingParams(max_tokens=128)) for i in ids], progress=bar.update)

Eval, ask, the job's held-out check and the benchmarks go through here, so there is one generation
loop per backend. A request is (prompt ids, SamplingParams): several candidates for one question are
several requests with the same ids and their own temperature / seed (greedy first, then samples),
ranked afterwards by `Completion.logprob`. A failed row comes back with finish_reason "error" and
its `error`; it never fails the others.

Requests are submitted shortest prompt first (stable), so the transformers engine's batches hold
prompts of similar length and little padding; finished rows leave a batch at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.config import Config
from sqltune.engines.base import Completion, Engine, SamplingParams, complete
from sqltune.prompts import PromptTemplate, extract_sql

log = logs.get("engines.batch")


@dataclass(frozen=True)
class Request:
    prompt_ids: Sequence[int]
    params: SamplingParams


class OfflineEngine:
    """An engine started on an event loop of its own, driven from plain synchronous code."""

    def __init__(self, engine: Engine, path: Path | None = None, meta: dict | None = None) -> None:
        self.engine = engine
        self.path = path
        self.meta = meta or {}
        self._loop = asyncio.new_event_loop()
        self._started = False

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> OfflineEngine:
        if not self._started:
            self._run(self.engine.start())
            self._started = True
        return self

    def close(self) -> None:
        try:
            if self._started:
                self._run(self.engine.close())
                self._started = False
        finally:
            if not self._loop.is_closed():
                self._loop.close()

    def __enter__(self) -> OfflineEngine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, coro: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._loop.run_until_complete(coro)
        coro.close()
        raise RuntimeError("OfflineEngine is for synchronous code; inside an event loop, await the engine's "
                           "stream() (sqltune.engines.base.complete) instead")

    # --- what callers read ---------------------------------------------------------------------

    @property
    def template(self) -> PromptTemplate:
        return self.engine.template

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def eos_token(self) -> str | None:
        return self.engine.eos_token

    @property
    def device(self) -> str:
        loaded = getattr(self.engine, "loaded", None)
        return str(loaded.device) if loaded is not None else self.engine.name

    def encode(self, prompt: str) -> list[int]:
        return self.engine.encode(prompt)

    def grammar_stats(self) -> dict[str, Any]:
        """The grammar compiler's cache figures where the engine compiles grammars itself."""
        loaded = getattr(self.engine, "loaded", None)
        return loaded.compiler.stats() if loaded is not None and loaded._compiler is not None else {}

    # --- generation ----------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request], progress: Callable[[int], None] | None = None) -> list[Completion]:
        """One Completion per request, in the requests' order; `progress(1)` as each one finishes."""
        if not requests:
            return []
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
        return self._run(self._gather(requests, order, progress))

    def _too_long(self, request: Request) -> Completion | None:
        n, limit = len(request.prompt_ids), self.max_model_len
        if n < limit:
            return None
        return Completion("", n, 0, "error", f"the prompt is {n} tokens and the model's context is {limit}: "
                          "shorten the schema context (or raise --max-model-len where the model allows it)",
                          logprob=float("nan"))

    async def _gather(self, requests: Sequence[Request], order: list[int],
                      progress: Callable[[int], None] | None) -> list[Completion]:
        out: list[Completion | None] = [None] * len(requests)

        async def one(i: int) -> None:
            out[i] = self._too_long(requests[i]) or await complete(self.engine, requests[i].prompt_ids,
                                                                    requests[i].params)
            if progress is not None:
                progress(1)

        # tasks start in creation order, so the engine's queue holds the requests shortest first
        await asyncio.gather(*(one(i) for i in order))
        return [c for c in out if c is not None]

    def generate_text(self, prompts_: Sequence[str], params: SamplingParams | Sequence[SamplingParams],
                      progress: Callable[[int], None] | None = None) -> list[Completion]:
        """Prompts as text (encoded as trained), one params for all or one per prompt."""
        each = [params] * len(prompts_) if isinstance(params, SamplingParams) else list(params)
        return self.generate([Request(self.encode(p), s) for p, s in zip(prompts_, each, strict=True)], progress)

    def generate_sql(self, pairs: Sequence[tuple[str, str]], max_new_tokens: int = 128,
                     progress: Callable[[int], None] | None = None) -> list[str]:
        """Greedy SQL for each (question, context), with the artifact's template, cut at the first statement."""
        done = self.generate_text([self.template.build_prompt(q, c) for q, c in pairs],
                                  SamplingParams(max_tokens=max_new_tokens), progress)
        return [extract_sql(c.text, self.eos_token, self.template) for c in done]


def engine_config(cfg: Config | None = None, *, engine: str = "", batch_size: int = 0, precision: Any = None) -> Config:
    """The serve-side knobs of `cfg` (defaults when None) set for a batch run: which engine, how many
    sequences at once, and the precision (a sqltune.generation.Precision) when the caller chose one."""
    cfg = cfg or Config()
    changes: dict[str, Any] = {}
    if engine:
        changes["serve_engine"] = engine
    if batch_size:
        changes["max_batch_size"] = batch_size
    if precision is not None:
        changes.update(dtype=precision.name, serve_device=precision.device)
    return replace(cfg, **changes) if changes else cfg


def open_model(model: str | Path, cfg: Config | None = None, *, engine: str = "", batch_size: int = 0,
               precision: Any = None, resolve: bool = True) -> OfflineEngine:
    """A started engine for a finished model (folder or bucket URL, manifest checked when `resolve`);
    `resolve=False` takes a local folder as it is (the job's check, before the manifest exists)."""
    from sqltune import prompts
    from sqltune.artifacts import manifests, registry
    from sqltune.engines.factory import create_engine

    path = registry.resolve_model(str(model)) if resolve else Path(model)
    meta = manifests.read_meta(path)
    run_cfg = engine_config(cfg, engine=engine, batch_size=batch_size, precision=precision)
    offline = OfflineEngine(create_engine(run_cfg, path, prompts.load_template(path), meta), path, meta)
    return offline.start()


def from_loaded(loaded: Any, cfg: Config | None = None, *, batch_size: int = 16) -> OfflineEngine:
    """A started transformers engine over a model already in memory (a sqltune.generation.Loaded)."""
    from sqltune.engines.transformers_engine import TransformersEngine

    run_cfg = engine_config(cfg, engine="transformers", batch_size=batch_size)
    engine = TransformersEngine(run_cfg, loaded.path if Path(loaded.path).is_dir() else Path(loaded.path).parent,
                                loaded.template, loaded.meta or {}, loaded=loaded)
    return OfflineEngine(engine, Path(loaded.path), loaded.meta).start()


def generate(loaded: Any, prompts_: Sequence[str], max_new_tokens: int | Sequence[int] = 128,
             temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (), seed: int | None = None,
             grammars: Sequence[str] | None = None, batch_size: int = 16) -> list[Completion]:
    """Completions for a model in memory, one per prompt, in order (greedy when temperature is 0): a
    one-call form for tests and benchmarks that hold a `Loaded` (e.g. read back from a GGUF)."""
    limits = [max_new_tokens] * len(prompts_) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    grammars = list(grammars) if grammars else [""] * len(prompts_)
    params = [SamplingParams(max_tokens=n, temperature=temperature, top_p=top_p, stop=tuple(stop), seed=seed,
                             grammar=g) for n, g in zip(limits, grammars, strict=True)]
    with from_loaded(loaded, batch_size=batch_size) as llm:
        return llm.generate_text(prompts_, params)
