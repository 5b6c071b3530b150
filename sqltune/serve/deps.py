"""What every route shares, read from `request.app.state`: readiness, the model check, client
disconnects and streaming responses that always release their slots. Routers import this, never the
app module that includes them.

    from sqltune.serve.deps import require_ready# in a router: service = require_ready(request)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from sqltune import logs
from sqltune.engines.base import Delta
from sqltune.serve.service import ApiError, Job, Service

log = logs.get("serve")
T = TypeVar("T")


def require_ready(request: Request) -> Service:
    """The service, once the model is loaded and warm; 503 with Retry-After before that and while draining."""
    state = request.app.state
    if state.draining:
        raise ApiError(503, "server is shutting down", "service_unavailable", "draining")
    if not state.ready:
        msg = f"model failed to load: {state.load_error}" if state.load_error else "model is still loading"
        raise ApiError(503, msg, "service_unavailable", "not_ready", headers={"Retry-After": "5"})
    return state.service


def check_model(request: Request, model: str | None) -> None:
    served = request.app.state.engine.model_id
    if model and model != served:
        raise ApiError(404, f"model `{model}` does not exist; this server serves `{served}` (see /v1/models)",
                       code="model_not_found", param="model")


async def cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work` unless the client goes away first, in which case it is cancelled (and with it the
    generation it started). Streaming responses get the same from Starlette itself."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        logs.event(log, "client disconnected; generation cancelled", path=request.url.path)
        raise ApiError(499, "client closed the request", code="client_closed")
    finally:
        watcher.cancel()
        # cancelled from outside (the shutdown grace ended): the work must stop too, not run on unowned
        task.cancel()


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a daemon thread. asyncio.to_thread's pool threads are joined when the
    interpreter exits, so a schema or grammar still being built there kept a SIGTERMed server
    alive at 100% CPU; a daemon thread is dropped at exit, and an awaiter that is cancelled (client
    gone, deadline, shutdown) stops waiting at once while the bounded work ends by itself."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def work() -> None:
        try:
            value, error = context.run(fn, *args), None
        except BaseException as e:  # handed to the awaiter, which re-raises it
            value, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop is already closed: nobody is waiting
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=work, name=f"sqltune-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await future


async def open_stream(service: Service, jobs: list[Job]) -> tuple[AsyncIterator[tuple[int, Delta]],
                                                                 Callable[[], Awaitable[None]]]:
    """Admit jobs for a streaming response (429 now, before any byte is sent); the returned
    `close` releases them and is safe to call twice."""
    stream = service.stream(jobs)
    deltas = await stream.__aenter__()
    closed = False

    async def close() -> None:
        nonlocal closed
        if not closed:
            closed = True
            await stream.__aexit__(None, None, None)

    return deltas, close


class ClosingStream(StreamingResponse):
    """A StreamingResponse that always runs `close`, even when its body was never iterated
    (a client gone before the first byte)."""

    def __init__(self, content: AsyncIterator[Any], close: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.close()
