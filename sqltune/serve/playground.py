"""The playground page at `/` and the stream it reads, POST /v1/sql/stream.

    sqltune serve --model models/sqltune-sql      # then open http://127.0.0.1:8000/

The page is one static file (static/playground.html: inline CSS and JS, no build step, nothing
fetched from elsewhere) served without the API key, since it holds no data; everything it asks
for goes through the keyed routes. Its Content-Security-Policy allows only its own inline script
and style (by hash) and requests to this server, so a page that tried to load a CDN would break
in the browser test, not only on a machine without internet.

/v1/sql/stream is /v1/sql as server-sent events: `{"text": ...}` per token as it comes, then the
checked answer (the /v1/sql response body) with `"done": true`, then `[DONE]`. With `candidates`, the
greedy one streams while the samples generate beside it, and the answer is the one they voted for. A bad schema or a
full queue is a plain 4xx before the stream starts; a failure after it is an `error` event.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from sqltune.engines.base import Completion, Delta
from sqltune.serve.deps import ClosingStream, check_model, in_thread, open_stream, require_ready
from sqltune.serve.lint import lint
from sqltune.serve.protocol import SqlRequest, error_body
from sqltune.serve.routes import finish_sql, prepare_sql
from sqltune.serve.service import ApiError, Service

router = APIRouter()

PAGE = "static/playground.html"


@lru_cache(maxsize=1)
def page() -> tuple[str, str]:
    """The page's HTML and the Content-Security-Policy that lets exactly its inline parts run."""
    html = resources.files("sqltune.serve").joinpath(PAGE).read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
                        for b in bodies) or "'none'"

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, csp


@router.get("/", include_in_schema=False)
async def playground() -> HTMLResponse:
    html, csp = page()
    return HTMLResponse(html, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache",
                                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


@router.post("/v1/sql/stream", responses={200: {"content": {"text/event-stream": {}},
                                                "description": "Server-sent events: tokens, then the answer."}})
async def sql_stream(body: SqlRequest, request: Request, service: Service = Depends(require_ready)) -> Any:
    """/v1/sql with its tokens streamed as they come (server-sent events), then the checked answer."""
    check_model(request, body.model)
    jobs, schema, constraint = await prepare_sql(service, body)
    deltas, close = await open_stream(service, jobs)

    async def events() -> AsyncIterator[str]:
        streamed = Streamed(len(jobs))
        try:
            async for text in streamed.texts(deltas):
                yield event({"text": text})
            if not streamed.complete:
                return
            await close()  # the slots are free before the check runs
            answer = await finish_sql(service, streamed.completions, schema, constraint, body.question,
                                      jobs[0].params.max_tokens)
            hints = await in_thread(lint, answer.sql, schema, body.question) if answer.valid else []
            yield event({**answer.model_dump(), "lint": hints, "done": True})
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield event(error_body(e.message, e.kind, e.code))
        finally:
            await close()

    return ClosingStream(events(), close, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Streamed:
    """The first (greedy) candidate's text as it comes; the others generate beside it. `completions` holds
    every candidate once `complete`; a failed generation of a lone candidate is an ApiError."""

    def __init__(self, n: int) -> None:
        self.parts: list[list[str]] = [[] for _ in range(n)]
        self.finals: list[Completion | None] = [None] * n

    async def texts(self, deltas: AsyncIterator[tuple[int, Delta]]) -> AsyncIterator[str]:
        async for i, delta in deltas:
            if delta.finish_reason == "error" and len(self.finals) == 1:
                raise ApiError(500, f"generation failed: {delta.error}", "server_error", "engine_error")
            self.parts[i].append(delta.text)
            if delta.text and i == 0:
                yield delta.text
            if delta.finish_reason:
                self.finals[i] = Completion("".join(self.parts[i]), delta.prompt_tokens, delta.completion_tokens,
                                            delta.finish_reason, delta.error, self.parts[i])
                if self.complete:
                    return

    @property
    def complete(self) -> bool:
        return all(f is not None for f in self.finals)

    @property
    def completions(self) -> list[Completion]:
        return [f for f in self.finals if f is not None]


def event(data: dict[str, Any]) -> str:
    """One server-sent event; values JSON cannot carry (a date from PostgreSQL) as their text."""
    return f"data: {json.dumps(data, default=str)}\n\n"
