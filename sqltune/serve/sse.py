"""Answers streamed as server-sent events, shared by POST /v1/sql/stream and POST /v1/ask with `stream`:
`{"text": ...}` per token of the greedy candidate as it comes, then the answer with `"done": true`, then
`[DONE]`. The candidates' slots are released before the answer is worked out; a failure after the first
byte is an `error` event, since the status line has gone.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sqltune.engines.base import Completion, Delta
from sqltune.serve.deps import ClosingStream, open_stream
from sqltune.serve.protocol import error_body
from sqltune.serve.service import ApiError, Job, Service


async def answer_stream(service: Service, jobs: list[Job],
                        answer: Callable[[list[Completion]], Awaitable[dict[str, Any]]]) -> ClosingStream:
    """Admit `jobs` (a 429 now, before any byte is sent) and stream them; `answer` turns every candidate's
    completion into the final event's body."""
    deltas, close = await open_stream(service, jobs)

    async def events() -> AsyncIterator[str]:
        streamed = Streamed(len(jobs))
        try:
            async for text in streamed.texts(deltas):
                yield event({"text": text})
            if not streamed.complete:
                return
            await close()  # the slots are free while the answer is checked or run on the database
            body = await answer(streamed.completions)
            yield event({**body, "done": True})
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
