"""sqltune's own routes: /v1/sql (the one a product calls), vLLM's demo /generate, Vertex AI's
/predict, and /health, /ready, /metrics.

Reading a schema and checking the generated SQL are CPU work of up to a few hundred milliseconds
on a large request, so they run on a worker thread: on the event loop they would stall every
other route (a 90 kB schema once blocked the whole server for 21 s)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from sqltune.constrain import Constraint
from sqltune.engines.base import Completion
from sqltune.errors import DataError
from sqltune.prompts import extract_sql
from sqltune.serve.constrained import constrain_for
from sqltune.serve.deps import ClosingStream, cancel_on_disconnect, check_model, open_stream, require_ready
from sqltune.serve.protocol import GenerateRequest, PredictRequest, Sampling, SqlRequest, SqlResponse, Usage
from sqltune.serve.service import ApiError, Job, Service
from sqltune.sql.check import check_sql
from sqltune.sql.joins import complete_joins
from sqltune.sql.schema import Schema, parse_schema
from sqltune.sql.vote import Candidate, choose, on_synthesised

router = APIRouter()
VOTE_QUERY_BUDGET_S = 0.25  # per candidate and database: the synthesised tables hold a few rows each

# The model learned to end an answer with EOS; these catch one that runs on into a new example.


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up (it may still be loading the model: see /ready)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and a warm-up generation has run; 503 before and while draining."""
    state = request.app.state
    engine = state.engine
    if state.ready and not state.draining:
        return JSONResponse({"status": "ready", "model": engine.model_id, "engine": engine.name,
                             "max_model_len": engine.max_model_len})
    status = "draining" if state.draining else ("failed" if state.load_error else "loading")
    body: dict[str, Any] = {"status": status, "model": engine.model_id, "engine": engine.name}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, 503, headers={"Retry-After": "5"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request, service: Service = Depends(require_ready)) -> Any:
    """vLLM's demo API: `{"text": [prompt + output, ...]}`; streamed as one such JSON object per
    line, each with the text so far."""
    jobs = service.fan_out([service.job(body.prompt, body)], body.n)
    if not body.stream:
        results = await cancel_on_disconnect(request, service.complete(jobs))
        return {"text": [body.prompt + c.text for c in results]}
    deltas, close = await open_stream(service, jobs)

    async def lines() -> AsyncIterator[str]:
        texts = [""] * len(jobs)
        try:
            async for i, delta in deltas:
                if delta.finish_reason == "error":
                    yield json.dumps({"error": delta.error}) + "\n"
                    return
                if not delta.text:
                    continue
                texts[i] += delta.text
                yield json.dumps({"text": [body.prompt + t for t in texts]}) + "\n"
        except ApiError as e:
            yield json.dumps({"error": e.message}) + "\n"
        finally:
            await close()

    return ClosingStream(lines(), close, media_type="application/x-ndjson")


@router.post("/v1/sql", response_model=SqlResponse)
async def sql(body: SqlRequest, request: Request, service: Service = Depends(require_ready)) -> SqlResponse:
    """A question and its schema -> one SQL statement, checked against that schema."""
    check_model(request, body.model)
    return await cancel_on_disconnect(request, answer_sql(service, body))


async def answer_sql(service: Service, body: SqlRequest) -> SqlResponse:
    jobs, schema, constraint = await prepare_sql(service, body)
    results = await service.complete(jobs, fail_on_error=len(jobs) == 1)
    return await finish_sql(service, results, schema, constraint, body.question, jobs[0].params.max_tokens)


async def prepare_sql(service: Service, body: SqlRequest, where: str = "") -> tuple[list[Job], Schema, Constraint]:
    """The schema read (400 when it is not one) and the generation jobs for a /v1/sql request: one, or
    the greedy one and its sampled candidates."""
    ddl = body.ddl()
    try:
        schema = await asyncio.to_thread(parse_schema, ddl)
    except DataError as e:
        param = "schema" if body.schema_ else "context"
        hint = f"; {e.hint}" if e.hint else ""
        raise ApiError(400, f"{where}{param}: {e.message}{hint}", code="invalid_schema",
                       param=where + param) from None
    prompt = service.engine.template.build_prompt(body.question, ddl)
    sampling = Sampling(max_tokens=body.max_tokens, stop=list(service.engine.template.stops))
    job = service.job(prompt, sampling, param=where + "question")  # the prompt's limits before any grammar
    constraint = await constrain_for(service, body.constrain or service.cfg.constrain, body.question, ddl)
    job = service.with_grammar(job, constraint.grammar)
    return service.candidate_jobs(job, body.candidates or service.cfg.candidates), schema, constraint


async def finish_sql(service: Service, results: Sequence[Completion], schema: Schema,
                     constraint: Constraint | None = None, question: str = "", max_tokens: int = 0) -> SqlResponse:
    """The checked answer; with several candidates, the one whose result most of them share when run on
    databases synthesised from the schema and the question (sqltune.sql.vote)."""
    own = texts = [extract_sql(r.text, service.engine.eos_token, service.engine.template) for r in results]
    if service.cfg.complete_joins:  # sqltune.sql.joins, on the schema the request gave
        texts = await asyncio.to_thread(lambda: [complete_joins(t, schema) or t if t else t for t in own])
    chosen, picked = 0, None
    if len(results) > 1:
        candidates = [Candidate(t, r.logprob, r.error if r.finish_reason == "error" else "")
                      for t, r in zip(texts, results, strict=True)]
        picked = await asyncio.to_thread(choose, candidates, schema,
                                         on_synthesised(schema, question, time_budget_s=VOTE_QUERY_BUDGET_S))
        chosen = picked.chosen
    result = results[chosen]
    if result.finish_reason == "error":
        raise ApiError(500, f"generation failed: {result.error}", "server_error", "engine_error")
    check = await asyncio.to_thread(check_sql, texts[chosen], schema)
    usage = Usage()  # the prompt once (its candidates share it, as OpenAI's n does), every candidate's tokens
    usage.add(results[0].prompt_tokens, sum(r.completion_tokens for r in results))
    constraint = constraint or Constraint("off")
    return SqlResponse(sql=texts[chosen], valid=check.valid, tables=check.tables, columns=check.columns,
                       error=check.error, model=service.engine.model_id, finish_reason=result.finish_reason,
                       usage=usage, constrain=constraint.mode, constrained=constraint.constrained,
                       reason=constraint.reason or None, candidates=len(results),
                       candidates_ran=picked.ran if picked else None,
                       candidates_agreed=picked.agreed if picked else None,
                       extra_tokens=max(0, result.completion_tokens - max_tokens) if max_tokens else 0,
                       model_sql=own[chosen] if own[chosen] != texts[chosen] else None)


@router.post("/predict")
async def predict(body: PredictRequest, request: Request, service: Service = Depends(require_ready)) -> Any:
    """Vertex AI: {"instances": [...], "parameters": {...}} -> {"predictions": [...]}, one per
    instance: generated text for a prompt, the /v1/sql answer for a question."""
    return await cancel_on_disconnect(request, _predict(service, body))


async def _predict(service: Service, body: PredictRequest) -> dict[str, Any]:
    """Every instance is read and checked first, then all are admitted at once: a request is a 400
    or a 429 as a whole, before any generation, never half run."""
    limit = service.admission.limit
    if len(body.instances) > limit:
        raise ApiError(400, f"{len(body.instances)} instances; this server takes at most {limit} at once "
                       "(max_batch_size + max_queue): split them over several requests",
                       code="too_many_sequences", param="instances")
    jobs: list[Job] = []
    spans: list[tuple[int, int, Schema | None, Constraint | None, str]] = []  # each instance's jobs, and what checks them
    for i, instance in enumerate(body.instances):
        fields = {"prompt": instance} if isinstance(instance, str) else instance
        merged = {**body.parameters, **fields}
        try:
            if "question" in merged:
                sql_body = SqlRequest.model_validate(merged)
                mine, schema, constraint = await prepare_sql(service, sql_body, f"instances[{i}].")
                spans.append((len(jobs), len(jobs) + len(mine), schema, constraint, sql_body.question))
                jobs += mine
                continue
            if "prompt" not in merged:
                raise ApiError(400, f"instances[{i}] needs `prompt` or `question`", param=f"instances[{i}]")
            req = GenerateRequest.model_validate(merged)
        except ValidationError as e:
            err = e.errors()[0]
            where = "".join(f".{p}" for p in err["loc"])
            raise ApiError(400, f"instances[{i}]{where}: {err['msg']}", param=f"instances[{i}]") from None
        spans.append((len(jobs), len(jobs) + 1, None, None, ""))
        jobs.append(service.job(req.prompt, req, param=f"instances[{i}].prompt"))
    if len(jobs) > limit:
        raise ApiError(400, f"{len(jobs)} sequences ({len(body.instances)} instances and their candidates); this "
                       f"server takes at most {limit} at once (max_batch_size + max_queue): split them over several "
                       "requests, or ask for fewer candidates", code="too_many_sequences", param="instances")
    results = await service.complete(jobs, fail_on_error=False)
    predictions: list[Any] = []
    for start, end, schema, constraint, question in spans:
        if schema is None:
            if results[start].finish_reason == "error":
                raise ApiError(500, f"generation failed: {results[start].error}", "server_error", "engine_error")
            predictions.append(results[start].text)
        else:
            answer = await finish_sql(service, results[start:end], schema, constraint, question,
                                      jobs[start].params.max_tokens)
            predictions.append(answer.model_dump(exclude={"usage", "model"}))
    return {"predictions": predictions}
