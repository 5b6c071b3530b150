"""Structured logs: one JSON object per line on stderr with `severity`, `message` and fields,
which Cloud Logging and kubectl log viewers parse and filter. Progress bars (tqdm) appear only
on a terminal; the JSON lines are always there."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_SEVERITY = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARNING", "ERROR": "ERROR", "CRITICAL": "CRITICAL"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelname, "DEFAULT"),
            "message": record.getMessage(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# bitsandbytes' CPU backend tries, at import (peft imports it), to fetch a faster 4-bit kernel from the
# Hugging Face hub through the optional `kernels` package and warns when it cannot; it then uses its
# own kernel. On a machine without `kernels` (every CPU install) that line is noise before anything
# sqltune says, and the hub is often unreachable anyway; a real bitsandbytes failure is an error.
# transformers (5.25+) installs `kernels`, whose hub lookups then warn in offline mode (HF_HUB_OFFLINE) for
# the same optional kernel: its logger is kept at ERROR as well.
_QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")


# Deprecations raised inside a library by another library, which no change of ours can avoid: peft
# reads transformers' old `is_gradient_checkpointing` name when it wraps the model.
_LIBRARY_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",)


def quiet_libraries() -> None:
    """Before any library is imported: keep the noise in _QUIET_LOGGERS below what is printed, and the
    library-internal deprecations in _LIBRARY_DEPRECATIONS out (sqltune's own calls use current names)."""
    import warnings

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in _LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def setup(level: str = "info") -> None:
    """Route sqltune's loggers to JSON on stderr. Only rank 0 logs below WARNING under torchrun."""
    quiet_libraries()
    root = logging.getLogger("sqltune")
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        root.propagate = False
    rank = int(os.environ.get("RANK", "0"))
    root.setLevel(level.upper() if rank == 0 else "WARNING")


def capture_library_output() -> None:
    """Make every stderr line of a long-running server JSON: Python warnings (`warnings.warn` from
    torch, transformers, pydantic) and other libraries' loggers (sqlglot's "unsupported syntax")
    went to stderr as plain text, which log pipelines that parse each line as JSON drop or misfile."""
    logging.captureWarnings(True)  # warnings become records of the `py.warnings` logger
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    try:  # transformers prints through a handler of its own unless told to propagate
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def get(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("sqltune") else f"sqltune.{name}")


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `message` with extra structured fields (step=..., loss=...)."""
    logger.log(level, message, extra={"fields": fields})


def is_rank0() -> bool:
    """True in a single process and on rank 0 of torchrun: the one process that logs results and publishes."""
    return os.environ.get("RANK", "0") in ("", "0")


def show_progress() -> bool:
    return sys.stderr.isatty() and os.environ.get("SQLTUNE_NO_PROGRESS", "") in ("", "0")
