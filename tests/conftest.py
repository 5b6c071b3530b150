"""Shared fixtures: a tiny trained model built once per session, the shared data when present."""

from __future__ import annotations

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
