"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, with SSE streaming.

Chat messages are mapped onto the template the model was trained with, not onto a chat template:
the last user message is the question and the system messages are the schema (CREATE TABLE
statements), because a text-to-SQL fine-tune has only ever seen that layout.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from sqltune.engines.base import Completion, Delta
from sqltune.serve.constrained import constrain_for, response_fields
from sqltune.serve.deps import ClosingStream, cancel_on_disconnect, check_model, open_stream, require_ready
from sqltune.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    StreamOptions,
    Usage,
    error_body,
    new_id,
)
from sqltune.serve.service import ApiError, Job, Service

router = APIRouter()


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    engine = request.app.state.engine
    return ModelList(data=[ModelCard(id=engine.model_id, max_model_len=engine.max_model_len,
                                     prompt_template=engine.template.to_dict())])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, service: Service = Depends(require_ready)) -> Any:
    check_model(request, body.model)
    if body.logprobs:
        raise ApiError(400, "logprobs is not supported by this server", code="unsupported", param="logprobs")
    prompts = body.prompts()
    if not prompts:
        raise ApiError(400, "prompt is an empty list", param="prompt")
    if body.constrain and body.constrain != "off" and not (body.context or "").strip():
        raise ApiError(400, "constrain needs `context`: the CREATE TABLE statements the SQL is about",
                       param="context")
    service.check_question(body.question)
    jobs = [service.job(p, body) for p in prompts]  # the prompts' limits before any grammar is built
    constraint = await constrain_for(service, body.constrain or "off", body.question or "", body.context or "")
    jobs = service.fan_out([service.with_grammar(j, constraint.grammar) for j in jobs], body.n)
    echo = [prompts[i // body.n] if body.echo else "" for i in range(len(jobs))]
    rid, created, model = new_id("cmpl"), int(time.time()), service.engine.model_id
    if body.stream:
        def chunk(i: int, delta: Delta) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": i, "text": delta.text, "logprobs": None,
                                 "finish_reason": delta.finish_reason}]}
        return await _sse(service, jobs, body.n, chunk, body.stream_options, rid, created, model, "text_completion",
                          echo=echo)
    results: list[Completion] = await cancel_on_disconnect(request, service.complete(jobs))
    choices = [{"index": i, "text": echo[i] + c.text, "logprobs": None, "finish_reason": c.finish_reason}
               for i, c in enumerate(results)]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": _usage(results, body.n).model_dump(),
            **response_fields(constraint, [c.completion_tokens for c in results], jobs[0].params.max_tokens)}


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request, service: Service = Depends(require_ready)) -> Any:
    check_model(request, body.model)
    if body.logprobs:
        raise ApiError(400, "logprobs is not supported by this server", code="unsupported", param="logprobs")
    prompt = chat_prompt(service, body)
    question, context = chat_parts(body)
    service.check_question(body.question)
    job = service.job(prompt, body, param="messages")  # the prompt's limits before any grammar is built
    constraint = await constrain_for(service, body.constrain or "off", body.question or question,
                                     body.context or context)
    jobs = service.fan_out([service.with_grammar(job, constraint.grammar)], body.n)
    rid, created, model = new_id("chatcmpl"), int(time.time()), service.engine.model_id
    if body.stream:
        def chunk(i: int, delta: Delta) -> dict[str, Any]:
            content = {"content": delta.text} if delta.text or not delta.finish_reason else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": i, "delta": content, "logprobs": None,
                                 "finish_reason": delta.finish_reason}]}
        first = [{"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                  "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}]} for i in range(len(jobs))]
        return await _sse(service, jobs, body.n, chunk, body.stream_options, rid, created, model,
                          "chat.completion.chunk", first=first)
    results: list[Completion] = await cancel_on_disconnect(request, service.complete(jobs))
    choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                "finish_reason": c.finish_reason} for i, c in enumerate(results)]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": _usage(results, body.n).model_dump(),
            **response_fields(constraint, [c.completion_tokens for c in results], jobs[0].params.max_tokens)}


def chat_parts(body: ChatCompletionRequest) -> tuple[str, str]:
    """(question, context): the last user message and the system messages."""
    users = [m for m in body.messages if m.role == "user"]
    if not users or not users[-1].text().strip():
        raise ApiError(400, "messages need a user message with the question", param="messages")
    return users[-1].text(), "\n".join(m.text() for m in body.messages if m.role in ("system", "developer"))


def chat_prompt(service: Service, body: ChatCompletionRequest) -> str:
    question, context = chat_parts(body)
    return service.engine.template.build_prompt(question, context)


def _usage(results: list[Completion], n: int) -> Usage:
    usage = Usage()
    for i, c in enumerate(results):
        usage.add(c.prompt_tokens if i % n == 0 else 0, c.completion_tokens)  # each prompt counts once
    return usage


async def _sse(service: Service, jobs: list[Job], n: int, chunk: Callable[[int, Delta], dict[str, Any]],
               options: StreamOptions | None, rid: str, created: int, model: str, obj: str,
               first: list[dict[str, Any]] | None = None, echo: list[str] | None = None) -> StreamingResponse:
    """Server-sent events, ending with `data: [DONE]`. Admission happens before the response
    starts, so a full queue is a plain 429; an error after the stream started is an `error` event."""
    deltas, close = await open_stream(service, jobs)

    async def events() -> AsyncIterator[str]:
        usage = Usage()
        try:
            for item in first or []:
                yield _event(item)
            for i, text in enumerate(echo or []):
                if text:
                    yield _event(chunk(i, Delta(text, 0, 0)))
            try:
                async for i, delta in deltas:
                    if delta.finish_reason == "error":
                        yield _event(error_body(f"generation failed: {delta.error}", "server_error", "engine_error"))
                        break
                    if delta.finish_reason:
                        usage.add(delta.prompt_tokens if i % n == 0 else 0, delta.completion_tokens)
                    if delta.text or delta.finish_reason:
                        yield _event(chunk(i, delta))
            except ApiError as e:
                yield _event(error_body(e.message, e.kind, e.code))
            if options and options.include_usage:
                yield _event({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                              "usage": usage.model_dump()})
            yield "data: [DONE]\n\n"
        finally:
            await close()

    return ClosingStream(events(), close, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
