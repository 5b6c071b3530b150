"""The app factory: `create_app(config, engine)` -> a FastAPI app whose state lives in app.state.

    app = create_app(cfg, TransformersEngine(cfg, model_dir, template, meta))   # then uvicorn.run(app)

The engine loads in the background after start-up, so /health answers at once and /ready turns
200 only once the weights are loaded and a warm-up generation has run. One ASGI gate in front of
every route does auth, the body-size limit, JSON access logs and request metrics; it is plain ASGI
(not BaseHTTPMiddleware) so streaming responses and client disconnects pass through untouched.

The gate is also the last word on errors: an exception no handler took becomes a JSON 500 and a
request cut by the end of the shutdown grace a JSON 503, both on a connection that stays usable.
Starlette's own catch-all re-raises into uvicorn, which then closes the connection, so a client's
next keep-alive request failed too, and uvicorn's fallback answer is plain text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sqltune import __version__, logs
from sqltune.config import Config
from sqltune.engines.base import Engine, SamplingParams, complete
from sqltune.engines.fair import client_request
from sqltune.serve.metrics import Metrics
from sqltune.serve.protocol import error_body
from sqltune.serve.service import ApiError, Service, request_started

log = logs.get("serve")
access_log = logs.get("serve.access")

OPEN_PATHS = frozenset({"/health", "/ready", "/"})  # `/` is the playground page, which holds no data
ROUTES = frozenset({"/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/sql", "/predict",
                    "/health", "/ready", "/metrics", "/openapi.json", "/docs", "/", "/v1/sql/stream", "/v1/sql/run",
                    "/v1/ask", "/v1/database"})


def create_app(config: Config, engine: Engine) -> FastAPI:
    from sqltune.serve import ask_routes, openai_routes, playground, routes, sql_run

    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(app))
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(BaseException):
                await loader
            await engine.close()
            if app.state.database is not None:
                app.state.database.close()
            logs.event(log, "stopped")

    app = FastAPI(title="sqltune", version=__version__, lifespan=lifespan, default_response_class=SafeJSONResponse,
                  description="Text-to-SQL model server: OpenAI-compatible, vLLM /generate, Vertex AI /predict.")
    app.state.config = config
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.service = Service(config, engine, metrics)
    app.state.ready = False
    app.state.draining = False
    app.state.load_error = None
    app.state.on_fatal = None  # the CLI sets this to stop the server when the model cannot load
    # --database: connected and its schema read now, so a bad URL stops the server before the model loads
    app.state.database = ask_routes.open_database(config) if config.database else None
    app.include_router(openai_routes.router)
    app.include_router(routes.router)
    app.include_router(playground.router)
    app.include_router(sql_run.router)
    app.include_router(ask_routes.router)
    _install_error_handlers(app)
    app.add_middleware(Gate, config=config, metrics=metrics)
    logging.getLogger("uvicorn.error").addFilter(_PLANNED_CANCEL)  # once: the same filter object is not added twice
    # Vertex AI sends predictions and health checks to the routes it names in AIP_PREDICT_ROUTE / AIP_HEALTH_ROUTE
    if config.predict_route not in ("", "/predict"):
        app.add_api_route(config.predict_route, routes.predict, methods=["POST"], include_in_schema=False)
    if config.health_route not in ("", "/ready", "/health"):
        app.add_api_route(config.health_route, routes.ready, methods=["GET"], include_in_schema=False)
    return app


async def _load(app: FastAPI) -> None:
    engine: Engine = app.state.engine
    metrics: Metrics = app.state.metrics
    started = time.perf_counter()
    try:
        await engine.start(on_batch=metrics.batch_size.observe)
        warm = await complete(engine, engine.encode(engine.template.build_prompt("warm up", "CREATE TABLE t (a INT)")),
                              SamplingParams(max_tokens=2))
        if warm.finish_reason == "error":
            raise RuntimeError(f"warm-up generation failed: {warm.error}")
    except Exception as e:
        app.state.load_error = f"{type(e).__name__}: {e}"
        log.exception("model failed to load")
        if app.state.on_fatal:
            app.state.on_fatal()
        return
    app.state.ready = True
    metrics.ready.set(1)
    logs.event(log, "ready", engine=engine.name, model=engine.model_id, max_model_len=engine.max_model_len,
               seconds=round(time.perf_counter() - started, 2))



class SafeJSONResponse(JSONResponse):
    """JSON that always renders: text that cannot be UTF-8 (a lone surrogate echoed back) is escaped
    instead of turning a reply into a 500."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return SafeJSONResponse(error_body(e.message, e.kind, e.code, e.param), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            msg = f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return SafeJSONResponse(error_body(msg, "invalid_request_error", "invalid_json"), 400)
        where = ".".join(loc) or "body"
        msg = f"{where}: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        code = "unsupported" if first.get("type") == "unsupported" else "invalid_value"  # protocol.UNSUPPORTED_*
        return SafeJSONResponse(error_body(msg, "invalid_request_error", code, where), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        if isinstance(e.__cause__, _BodyTooLarge):  # FastAPI wraps errors raised while it reads the body
            body, headers = Gate.too_large(request.app.state.config.max_body_bytes)
            return SafeJSONResponse(body, 413, headers=headers)
        if isinstance(e.__cause__, _BodyTimeout):
            return SafeJSONResponse(Gate.body_timeout(request.app.state.config.body_timeout), 408,
                                    headers={"Connection": "close"})
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return SafeJSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", kind), e.status_code,
                                headers=getattr(e, "headers", None))


class Gate:
    """Auth, body-size limit, JSON bodies whatever the Content-Type, access log and request metrics."""

    def __init__(self, app: ASGIApp, config: Config, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.key = config.api_key.encode()
        self.open_paths = OPEN_PATHS | {config.health_route} - {""}
        self.max_body = config.max_body_bytes
        self.body_seconds = config.body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_started.set(started)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        client_request.set(uuid.uuid4().hex)  # the engine's fair share is per request (sqltune.engines.fair)
        status = {"code": 500, "bytes": 0, "started": 0, "sse": 0}
        method = scope["method"]
        if method == "HEAD":  # load balancers probe with HEAD: a GET without its body (RFC 9110 9.3.2)
            scope = dict(scope, method="GET")

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], 1
                status["sse"] = int(any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                        for k, v in message.get("headers", [])))
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            elif message["type"] == "http.response.body":
                if method == "HEAD":
                    message = {**message, "body": b""}
                status["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            refusal = self._refuse(path, headers)
            if refusal is not None:
                await _reply(send_logged, *refusal)
                return
            if scope["method"] == "POST" and "json" not in headers.get("content-type", ""):
                # bodies are JSON whatever the Content-Type says: the tutorial's `curl -d` sends form encoding
                scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                             + [(b"content-type", b"application/json")])
            await self.app(scope, self._limited(receive, send_logged, status), send_logged)
        except _BodyTooLarge:
            if not status["started"]:
                await _reply(send_logged, 413, *self.too_large(self.max_body))
        except _BodyTimeout:
            if not status["started"]:
                await _reply(send_logged, 408, self.body_timeout(self.body_seconds), {"Connection": "close"})
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when --shutdown-grace ends: a planned drain. The client
            # gets a JSON 503 (mid-stream: an error event, then the stream's proper end) and the log one INFO
            # line; re-raised, uvicorn would log an ERROR traceback per request.
            if status["started"] and not status["sse"]:
                raise  # half a JSON body: nothing can end it cleanly
            answered = False
            with contextlib.suppress(Exception):
                if not status["started"]:
                    await _reply(send_logged, 503, error_body(_SHUTDOWN, "service_unavailable", "shutdown"),
                                 {"Retry-After": "1"})
                else:
                    event = json.dumps(error_body(_SHUTDOWN, "service_unavailable", "shutdown"))
                    await send_logged({"type": "http.response.body", "body": f"data: {event}\n\n".encode(),
                                       "more_body": False})  # the event, and the stream's end
                answered = True
            logs.event(log, "request cut by the shutdown (--shutdown-grace)", path=path, request_id=request_id,
                       answered=answered, streaming=bool(status["sse"]),
                       seconds=round(time.perf_counter() - started, 3))
            if not answered:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # handled: the task ends normally
        except Exception:
            log.exception("unhandled error", extra={"fields": {"path": path, "request_id": request_id}})
            if status["started"]:
                return  # half a response was sent: uvicorn closes the connection, nothing else can be said
            await _reply(send_logged, 500, error_body(
                f"internal error (request id {request_id}); the server log has the traceback",
                "server_error", "internal_error"), {})
        finally:
            seconds = time.perf_counter() - started
            route = path if path in ROUTES else "other"
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(seconds)
            client = scope.get("client") or ("", 0)
            logs.event(access_log, f"{method} {path} {status['code']}", method=method, path=path,
                       status=status["code"], ms=round(seconds * 1000, 1), bytes=status["bytes"],
                       client=client[0], request_id=request_id, user_agent=headers.get("user-agent", ""))

    def _refuse(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        if self.key and path not in self.open_paths:
            sent = headers.get("authorization", "").strip()
            scheme, _, given = sent.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key):
                if not sent:
                    what = "missing API key"
                elif scheme.lower() != "bearer":
                    what = "the Authorization header has no `Bearer` scheme"
                else:
                    what = "wrong API key" if given.strip() else "missing API key after `Bearer`"
                return 401, error_body(f"{what}: send `Authorization: Bearer <key>` (the server's --api-key)",
                                       "authentication_error", "invalid_api_key"), {"WWW-Authenticate": "Bearer"}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return 413, *self.too_large(self.max_body)
        return None

    @staticmethod
    def too_large(limit: int) -> tuple[dict[str, Any], dict[str, str]]:
        return error_body(f"request body is larger than {limit} bytes (--max-body-bytes)",
                          "invalid_request_error", "body_too_large"), {}

    @staticmethod
    def body_timeout(seconds: float) -> dict[str, Any]:
        return error_body(f"the request body stopped arriving for {seconds:g}s before its Content-Length was "
                          "reached (--body-timeout)", "invalid_request_error", "body_timeout")

    def _limited(self, receive: Receive, send: Send, status: dict[str, int]) -> Receive:
        seen = 0
        complete = False

        async def wrapped() -> Message:
            nonlocal seen, complete
            if complete:  # the body is in: what is left to receive is the disconnect, which may take long
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_seconds)
            except TimeoutError:
                raise _BodyTimeout from None  # uvicorn would wait for the rest of the body forever
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        return wrapped


_SHUTDOWN = "server shut down before this request finished (--shutdown-grace); retry it"


class _PlannedCancel(logging.Filter):
    """uvicorn logs the cut at the end of --shutdown-grace as an ERROR; it is the planned drain doing
    its job (the gate logs each cut request), so it is logged at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Cancel ") and "timeout graceful shutdown exceeded" in str(record.msg):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_PLANNED_CANCEL = _PlannedCancel()


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


async def _reply(send: Callable[[Message], Awaitable[None]], status: int, body: dict[str, Any],
                 headers: dict[str, str]) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})
