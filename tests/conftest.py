"""Shared fixtures: a tiny trained model built once per session, the shared data when present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# 2 threads were erratic on the 2-core CI machines; subprocesses inherit these too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["SQLTUNE_NO_PROGRESS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"
ASSETS = Path(__file__).parent / "assets"
HF_TOKEN_SENTINEL = "hf_sentinel_never_stored"


def sqltune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sqltune", *args]


def log_events(stderr: str, message: str | None = None, *, prefix: bool = True) -> list[dict]:
    """The JSON log lines of a run's stderr whose message starts with (or, prefix=False, is) `message`."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            text = entry.get("message", "")
            if message is None or (text.startswith(message) if prefix else text == message):
                out.append(entry)
    return out


def run_sqltune(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(sqltune_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"sqltune {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_file():
        pytest.skip("../shared/data/sql-create-context/train.jsonl is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny model artifact (full fine-tune from scratch on synthetic data, ~1 minute)."""
    out = tmp_path_factory.mktemp("tiny-model") / "model"
    run_sqltune("finetune", "--model", "tiny", "--method", "full", "--dataset", "synthetic:1500",
                "--learning-rate", "0.003", "--max-steps", "120", "--train-batch-size", "16",
                "--save-steps", "1000", "--logging-steps", "40", "--max-seq-length", "256",
                "--eval-generate-limit", "20", "--tiny-layers", "2", "--output", str(out),
                env={"HF_TOKEN": HF_TOKEN_SENTINEL})
    return out


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the session, so each embedded GGUF is converted once for all tests."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def embedded(model_cache: Path):
    """The converted folder of an embedded model (skipped when its package is not installed)."""
    from sqltune.errors import ModelError
    from sqltune.models import gguf

    def convert(name: str) -> Path:
        try:
            return gguf.resolve(name, model_cache)[0]
        except ModelError as e:
            if "pip install" in (e.hint or ""):
                pytest.skip(f"{name}: {e}")
            raise

    return convert


def finetune_real(out: Path, model: str, *extra: str, cache: Path, data: Path) -> dict:
    """A few LoRA / QLoRA steps of a real model on the shared rows; returns its sqltune.json."""
    run_sqltune("finetune", "--model", model, "--dataset", str(data), "--dataset-limit", "160",
                "--eval-fraction", "0.05", "--target-modules", "all-linear", "--lora-r", "8", "--lora-alpha", "16",
                "--learning-rate", "5e-4", "--train-batch-size", "2", "--max-seq-length", "256",
                "--save-steps", "1000", "--logging-steps", "1", "--eval-generate-limit", "2",
                "--output", str(out), *extra, env={"SQLTUNE_CACHE": str(cache)}, timeout=1200)
    return json.loads((out / "sqltune.json").read_text())


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory, embedded, model_cache, shared_data) -> Path:
    """SmolLM2-135M-Instruct after 3 LoRA steps on real rows: a finished artifact with a real tokenizer,
    trained in its chat template (`--prompt-style auto`), so serving a chat-layout artifact is covered too."""
    embedded("smollm2-135m")  # converted once into the session's cache; skips without the package
    out = tmp_path_factory.mktemp("smollm2") / "model"
    finetune_real(out, "smollm2-135m", "--method", "lora", "--max-steps", "3", "--prompt-style", "auto",
                  cache=model_cache, data=shared_data)
    return out
