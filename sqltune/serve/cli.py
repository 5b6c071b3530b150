"""`sqltune serve`: serve a finished model over HTTP.

    sqltune serve --model ./models/sqltune-sql --port 8000
    sqltune serve --model gs://bucket/models/gemma-2b-sql --engine vllm --api-key "$KEY"
    .venv-vllm/bin/sqltune serve --model ./models/sqltune-sql --engine vllm    # CPU build of vLLM
    sqltune serve --model ./models/sqltune-sql --engine llamacpp --gguf-quant q8_0   # llama.cpp, GGUF exported once
    sqltune serve --model ./sql.Q8_0.gguf --engine llamacpp                          # a file `sqltune export` wrote
    sqltune serve --model ./models/sqltune-sql --database ./shop.sqlite              # the playground asks this database

SIGTERM (Cloud Run, Kubernetes) stops accepting connections, lets in-flight requests finish
within --shutdown-grace seconds, then exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from sqltune import config, logs
from sqltune.engines import factory

log = logs.get("serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="Serve a finished model: OpenAI-compatible API, /v1/sql, /generate, /predict.")
    config.add_arguments(p, groups=["serve", "buckets", "db"], fields={
        "model_name": "The model to serve: a folder written by `sqltune finetune`, or its gs:// / s3:// URL. "
                      "Default: the finetune output (models/<new_model>).",
        "dtype": "",
        "database": "A real database the playground and POST /v1/ask answer on, read-only as `sqltune ask` reads "
                    "it: postgresql://user@host/db (password from the URL or PGPASSWORD, never shown) or a SQLite "
                    "file. Without it the playground runs SQL on databases synthesised from a pasted schema."})
    factory.engine_choices(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sqltune.artifacts import storage

    cfg, sources = config.from_namespace(args)
    logs.setup(cfg.log_level)
    logs.capture_library_output()  # every stderr line of the server is JSON
    storage.configure(cfg)  # bucket_endpoint, transfer_workers and model_cache apply to the model fetch
    url = cfg.model_name if "model_name" in sources else cfg.output_dir
    model_dir, template, meta = resolve(url)
    # --database: the schema budget the model was trained with, so it is asked on contexts like its own
    cfg = config.as_trained(cfg, sources, meta.get("config") or {})
    if "default_max_tokens" not in sources and meta.get("max_new_tokens"):
        # the longest answer the model was trained on, unless the operator set a default
        cfg = dataclasses.replace(cfg, default_max_tokens=min(int(meta["max_new_tokens"]), cfg.max_tokens_limit))
    from sqltune.engines.factory import create_engine
    from sqltune.serve.app import create_app

    if model_dir.is_file() and cfg.serve_engine != "llamacpp":
        from sqltune.errors import ConfigError

        raise ConfigError(f"--model {model_dir} is a GGUF file, which only llama.cpp serves",
                          "add --engine llamacpp, or serve the fine-tuned model folder")

    engine = create_engine(cfg, model_dir, template, meta)
    app = create_app(cfg, engine)
    if not cfg.api_key and not _is_loopback(cfg.serve_host):
        logs.event(log, "no API key: every client that reaches this address can use the model; "
                        "set --api-key or SQLTUNE_API_KEY", level=30, host=cfg.serve_host)
    return serve(app, cfg)


def resolve(url: str) -> tuple[Path, Any, dict[str, Any]]:
    """A verified local folder with its prompt template and metadata, or a clear refusal."""
    from sqltune import prompts
    from sqltune.artifacts import manifests, registry

    if not manifests.is_remote(url):
        local = manifests.local_path(url)
        if local.is_file() and local.suffix.lower() == ".gguf":  # --engine llamacpp on a file sqltune exported
            from sqltune.models.gguf import exported_metadata

            return (local, *exported_metadata(local))
        if not local.is_dir():
            from sqltune.errors import ArtifactError

            raise ArtifactError(f"model folder {local} does not exist",
                                "pass --model with a folder written by `sqltune finetune`, or a gs:// / s3:// URL")
        prompts.load_template(local)  # refuse a folder without its template before checking anything else
    model_dir = registry.resolve_model(url)
    return model_dir, prompts.load_template(model_dir), manifests.read_meta(model_dir)


def serve(app: Any, cfg: config.Config) -> int:
    import uvicorn

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.JsonFormatter())
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own lines in the same JSON format
        uv = logging.getLogger(name)
        uv.handlers, uv.propagate = [handler], False
        uv.setLevel(cfg.log_level.upper())

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not app.state.draining:
                app.state.draining = True
                logs.event(log, "draining: no new connections; in-flight requests may finish",
                           signal=int(sig), in_flight=app.state.service.admission.in_flight,
                           grace_seconds=cfg.shutdown_grace)
                _exit_after(cfg.shutdown_grace + EXIT_MARGIN_S)
            if sig == signal.SIGTERM:
                self.should_exit = True  # a drained shutdown is a clean exit (0), not death by signal
            else:
                super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=cfg.serve_host, port=cfg.serve_port, log_config=None,
                                   access_log=False, timeout_graceful_shutdown=cfg.shutdown_grace,
                                   timeout_keep_alive=5, lifespan="on"))

    def fatal() -> None:
        server.should_exit = True

    app.state.on_fatal = fatal
    logs.event(log, "listening", host=cfg.serve_host, port=cfg.serve_port, engine=app.state.engine.name,
               model=app.state.engine.model_id, auth=bool(cfg.api_key),
               database=app.state.database.db.display if app.state.database else None)
    server.run()
    if app.state.load_error:
        logs.event(log, "exiting: the model could not be loaded", level=40, error=app.state.load_error)
        return 1
    return 0


EXIT_MARGIN_S = 3.0  # after the grace: uvicorn's cut requests get their JSON 503, the engine closes


def _exit_after(seconds: float) -> None:
    """A shutdown that ends: once the grace is over and the cut requests were answered, whatever is
    still running (a worker thread in a C++ grammar compile or a long generation step, which Python
    cannot interrupt and would otherwise join at exit) must not keep the process alive."""

    def force() -> None:
        logs.event(log, "exiting: work was still running after the shutdown grace", level=30,
                   grace_seconds=round(seconds - EXIT_MARGIN_S, 3))
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
