"""Shared fixtures: a tiny trained model built once per run, the shared data when present.

The suite runs on every core with pytest-xdist (`make test`: `-n auto --dist loadfile`, then the files in
SERIAL_FILES alone). A session fixture that builds a model is built once for all workers (`built_once`:
a file lock and a folder in the run's shared temporary root), so a second worker waits for it rather
than training it again. Tests that measure wall time against a bound, or drive several processes of
their own, carry the `serial` marker (given here by file) and run after the parallel pass, on a quiet machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


# wall-clock bounds (budgets, latencies while loaded) or several processes of their own (torchrun)
SERIAL_FILES = ("test_train_attempts.py", "test_serve_hardening.py", "test_distributed.py", "test_serve_limits.py",
                "test_serve_lifecycle.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SERIAL_FILES:
            item.add_marker(pytest.mark.serial)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder `build` fills once per test run, shared by every xdist worker: the first one builds it
    under a file lock (released if its process dies), the others wait and reuse it."""
    from filelock import FileLock

    if os.environ.get("SQLTUNE_TEST_BUILDS"):  # `make test`: one folder for its parallel and its serial pass
        root = Path(os.environ["SQLTUNE_TEST_BUILDS"])
    else:
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            root = root.parent  # the run's root, above each worker's own basetemp
    target = root / f"built-{name}"
    with FileLock(str(target) + ".lock"):
        done = root / f"built-{name}.ok"
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            build(target)
            done.touch()
    return target


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


def write_gguf(path: Path, name: str, tensors: dict[str, Any], tokens: list[str] | None = None) -> Path:
    """A small but whole GGUF file written by the gguf package: `general.name`, a vocabulary if `tokens`
    are given, and `tensors` (name -> numpy array)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.name", name)
    if tokens is not None:
        writer.add_token_list(tokens)
    for tensor, data in tensors.items():
        writer.add_tensor(tensor, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_file():
        pytest.skip("../shared/data/sql-create-context/train.jsonl is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny model artifact (full fine-tune from scratch on synthetic data, ~1 minute)."""

    def build(folder: Path) -> None:
        run_sqltune("finetune", "--model", "tiny", "--method", "full", "--dataset", "synthetic:1500",
                    "--learning-rate", "0.003", "--max-steps", "120", "--train-batch-size", "16",
                    "--save-steps", "1000", "--logging-steps", "40", "--max-seq-length", "256",
                    "--eval-generate-limit", "20", "--tiny-layers", "2", "--output", str(folder / "model"),
                    env={"HF_TOKEN": HF_TOKEN_SENTINEL})

    return built_once(tmp_path_factory, "tiny-model", build) / "model"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the run, so each embedded GGUF is converted once for all tests and workers."""
    return built_once(tmp_path_factory, "model-cache", lambda folder: None)


@pytest.fixture(scope="session")
def embedded(model_cache: Path):
    """The converted folder of an embedded model (skipped when its package is not installed)."""
    from sqltune.errors import ModelError
    from sqltune.models import gguf

    def convert(name: str) -> Path:
        from filelock import FileLock

        try:
            with FileLock(str(model_cache / f"{name}.convert.lock")):  # one worker converts, the others wait
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
    embedded("smollm2-135m")  # converted once into the run's cache; skips without the package

    def build(folder: Path) -> None:
        finetune_real(folder / "model", "smollm2-135m", "--method", "lora", "--max-steps", "3",
                      "--prompt-style", "auto", cache=model_cache, data=shared_data)

    return built_once(tmp_path_factory, "smollm2", build) / "model"
