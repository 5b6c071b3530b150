"""Between routes and engine: admission (bounded queue, 429), limits (context length, max_tokens),
deadlines (504), and n-way fan-out. Every route generates through `Service`, so every route gets
the same limits and the same metrics."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqltune.config import Config
from sqltune.engines.base import Completion, Delta, Engine, SamplingParams
from sqltune.serve.metrics import Metrics
from sqltune.serve.protocol import Sampling

# When the request began (set by the app's gate): its deadline covers everything it waits on (a
# grammar build, then generation), not only the generation
request_started: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_started", default=None)


def time_left(timeout: float) -> float:
    """Seconds the current request has left of `timeout` (all of it outside a request)."""
    started = request_started.get()
    return timeout if started is None else max(0.0, started + timeout - time.perf_counter())


class ApiError(Exception):
    """An HTTP error with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    params: SamplingParams


class Admission:
    """Counts sequences in flight; beyond capacity + max_queue, new requests get 429 at once."""

    def __init__(self, capacity: int, max_queue: int, metrics: Metrics) -> None:
        self.capacity, self.limit, self.metrics = capacity, capacity + max_queue, metrics
        self.in_flight = 0
        self._seconds = 1.0  # moving average of one sequence's time in flight

    def acquire(self, n: int) -> None:
        if n > self.limit:
            raise ApiError(400, f"this request needs {n} sequences; the server takes at most {self.limit} at once "
                           "(max_batch_size + max_queue)", code="too_many_sequences", param="n")
        if self.in_flight + n > self.limit:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"server is at capacity ({self.in_flight} sequences in flight, limit {self.limit}); "
                           "retry after the time in Retry-After", "rate_limit_error", "queue_full",
                           headers={"Retry-After": str(self.retry_after())})
        self.in_flight += n
        self._publish()

    def release(self, n: int, seconds: float | None = None) -> None:
        self.in_flight -= n
        if seconds is not None:
            self._seconds = 0.8 * self._seconds + 0.2 * seconds
        self._publish()

    def retry_after(self) -> int:
        waves = max(1.0, (self.in_flight - self.capacity + 1) / max(1, self.capacity))
        return max(1, math.ceil(self._seconds * waves))

    def _publish(self) -> None:
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.queue_depth.set(max(0, self.in_flight - self.capacity))


BUILDS_AT_ONCE = 2  # xgrammar compiles on 2 threads each: more at once only queue for the cores


class Service:
    def __init__(self, cfg: Config, engine: Engine, metrics: Metrics) -> None:
        self.cfg, self.engine, self.metrics = cfg, engine, metrics
        self.admission = Admission(engine.capacity, cfg.max_queue, metrics)
        self.builds = asyncio.Semaphore(BUILDS_AT_ONCE)  # grammar builds (sqltune.serve.constrained)

    # --- limits ---------------------------------------------------------------------------------

    def job(self, prompt: str, sampling: Sampling, *, default_max_tokens: int | None = None,
            param: str = "prompt", grammar: str = "") -> Job:
        """Tokenize a prompt and bound its max_tokens, or raise a 400 that names the limit."""
        ids = self.engine.encode(prompt)
        limit = self.engine.max_model_len
        if not ids:
            raise ApiError(400, f"{param} is empty", code="empty_prompt", param=param)
        if len(ids) >= limit:
            raise ApiError(400, f"{param} is {len(ids)} tokens; this model's context is {limit} tokens "
                           f"(max_model_len), which leaves no room to generate: shorten the {param}",
                           code="context_length_exceeded", param=param)
        room = limit - len(ids)
        asked = sampling.max_tokens
        if asked is not None and asked > self.cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens {asked} is above this server's limit of {self.cfg.max_tokens_limit} "
                           "(--max-tokens-limit)", code="max_tokens_too_large", param="max_tokens")
        if asked is not None and asked > room:
            raise ApiError(400, f"this model's context is {limit} tokens (max_model_len); the {param} takes "
                           f"{len(ids)}, so max_tokens can be at most {room}, not {asked}",
                           code="context_length_exceeded", param="max_tokens")
        max_tokens = asked or min(max(default_max_tokens or self.cfg.default_max_tokens, sampling.min_tokens), room)
        if sampling.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens {sampling.min_tokens} is above max_tokens {max_tokens}",
                           code="invalid_value", param="min_tokens")
        params = SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                                stop=sampling.stops(), seed=sampling.seed, min_tokens=sampling.min_tokens,
                                grammar=grammar)
        return Job(ids, params)

    @staticmethod
    def with_grammar(job: Job, grammar: str) -> Job:
        return Job(job.prompt_ids, dataclasses.replace(job.params, grammar=grammar)) if grammar else job

    def check_question(self, question: str | None, param: str = "question") -> None:
        """The OpenAI routes' `question` extra (the literals of a schema+values grammar) is held to the
        context length like the prompt, so it cannot smuggle in what the token limit keeps out."""
        limit = self.engine.max_model_len
        if not question or len(question) < limit:  # fewer characters than the limit: fewer tokens too
            return
        # far past the limit it is refused by its length alone, without tokenizing 1 MB on the event loop
        if len(question) > 16 * limit:
            size = f"{len(question)} characters"
        else:
            tokens = len(self.engine.encode(question))
            if tokens < limit:
                return
            size = f"{tokens} tokens"
        raise ApiError(400, f"{param} is {size}; this model's context is {limit} tokens (max_model_len): "
                       f"shorten the {param}", code="context_length_exceeded", param=param)

    @staticmethod
    def fan_out(jobs: Sequence[Job], n: int) -> list[Job]:
        """n samples per job; with a seed, sample j uses seed + j so the n differ yet repeat (modulo
        2**63, the seeds torch takes, so a seed near the top cannot overflow)."""
        out = []
        for job in jobs:
            for j in range(n):
                p = job.params
                seed = None if p.seed is None else (p.seed + j) % 2**63
                out.append(Job(job.prompt_ids, dataclasses.replace(p, seed=seed)))
        return out

    def candidate_jobs(self, job: Job, k: int) -> list[Job]:
        """The job itself (greedy) and k-1 samples of the same prompt at --candidate-temperature and
        --candidate-top-p, seeded 1..k-1 so the same request gets the same candidates; a grammar in the job
        (--constrain) holds for every one of them."""
        sampled = dataclasses.replace(job.params, temperature=self.cfg.candidate_temperature,
                                      top_p=self.cfg.candidate_top_p)
        return [job, *(Job(job.prompt_ids, dataclasses.replace(sampled, seed=j)) for j in range(1, k))]

    # --- generation -----------------------------------------------------------------------------

    async def complete(self, jobs: Sequence[Job], *, fail_on_error: bool = True) -> list[Completion]:
        """All jobs to the end, within the request timeout (504 after it); a job the engine failed is a
        500 unless `fail_on_error` is off (candidates: one failed sample is one dropped candidate)."""
        parts: list[list[str]] = [[] for _ in jobs]
        finals: list[Delta | None] = [None] * len(jobs)
        async with self.stream(jobs, deltas=False) as deltas:
            async for i, delta in deltas:
                parts[i].append(delta.text)
                if delta.finish_reason:
                    finals[i] = delta
        out = []
        for p, d in zip(parts, finals, strict=True):
            assert d is not None
            out.append(Completion("".join(p), d.prompt_tokens, d.completion_tokens, d.finish_reason or "abort",
                                  d.error, p))
        failed = [c.error for c in out if c.finish_reason == "error"]
        if failed and fail_on_error:
            raise ApiError(500, f"generation failed: {failed[0]}", "server_error", "engine_error")
        return out

    @contextlib.asynccontextmanager
    async def stream(self, jobs: Sequence[Job], deltas: bool = True) -> AsyncIterator[AsyncIterator[tuple[int, Delta]]]:
        """Admit the jobs (or 429), then yield (job index, delta) from all of them as they come.
        Leaving the block early (disconnect, error) cancels whatever is still generating."""
        self.admission.acquire(len(jobs))
        started = time.perf_counter()
        merged: asyncio.Queue[tuple[int, Delta] | BaseException] = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, job, merged, deltas)) for i, job in enumerate(jobs)]
        try:
            yield self._merge(merged, len(jobs), started, first_token=deltas)
        finally:
            # synchronous first: under Starlette's (anyio) cancellation every later await raises again
            for t in tasks:
                t.cancel()
            self.admission.release(len(jobs), (time.perf_counter() - started) / max(1, len(jobs)))
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, i: int, job: Job, out: asyncio.Queue[Any], deltas: bool) -> None:
        try:
            async for delta in self.engine.stream(job.prompt_ids, job.params, deltas=deltas):
                out.put_nowait((i, delta))
                if delta.finish_reason:
                    return
        except Exception as e:  # an engine failure ends this job with an error, not the server
            out.put_nowait((i, Delta("", len(job.prompt_ids), 0, "error", f"{type(e).__name__}: {e}")))

    async def _merge(self, merged: asyncio.Queue[Any], pending: int, started: float,
                     first_token: bool) -> AsyncIterator[tuple[int, Delta]]:
        deadline = min(started, request_started.get() or started) + self.cfg.request_timeout
        first = first_token  # time to first token means something only when tokens stream
        counted = [0] * pending  # completion tokens already added to the metric, per job
        while pending:
            remaining = deadline - time.perf_counter()
            try:
                if remaining > 0 and not merged.empty():
                    i, delta = merged.get_nowait()  # no timer per token when tokens are waiting
                else:
                    i, delta = await asyncio.wait_for(merged.get(), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                self.metrics.rejected.labels("timeout").inc()
                raise ApiError(504, f"request took longer than {self.cfg.request_timeout:g}s (--request-timeout); "
                               "generation was stopped", "timeout_error", "timeout") from None
            if first and delta.text:
                self.metrics.first_token.observe(time.perf_counter() - started)
                first = False
            # counted as they stream, so tokens spent on a request that is later cancelled show too
            self.metrics.generation_tokens.inc(max(0, delta.completion_tokens - counted[i]))
            counted[i] = max(counted[i], delta.completion_tokens)
            if delta.finish_reason:
                pending -= 1
                self.metrics.prompt_tokens.inc(delta.prompt_tokens)
            yield i, delta
