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
import re
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from sqltune.engines.base import Completion
from sqltune.serve.deps import check_model, in_thread, require_ready
from sqltune.serve.lint import lint
from sqltune.serve.protocol import SqlRequest
from sqltune.serve.routes import finish_sql, prepare_sql
from sqltune.serve.service import Service
from sqltune.serve.sse import answer_stream

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

    async def answer(completions: list[Completion]) -> dict[str, Any]:
        done = await finish_sql(service, completions, schema, constraint, body.question, jobs[0].params.max_tokens)
        hints = await in_thread(lint, done.sql, schema, body.question) if done.valid else []
        return {**done.model_dump(), "lint": hints}

    return await answer_stream(service, jobs, answer)
