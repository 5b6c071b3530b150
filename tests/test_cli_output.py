"""What a new user sees: sqltune's own lines and nothing else, at install and in a first training run.

    pytest tests/test_cli_output.py
"""

from __future__ import annotations

import warnings
from pathlib import Path

from tests.conftest import run_sqltune

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_metadata_raises_no_setuptools_deprecation() -> None:
    """`make install` printed setuptools' `project.license` banner: the table form is deprecated for an
    SPDX string (PEP 639), which setuptools reads from 77 on."""
    from setuptools.config.pyprojecttoml import read_configuration

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = read_configuration(ROOT / "pyproject.toml")
    assert meta["project"]["license"] == "Apache-2.0"
    assert not [str(w.message)[:200] for w in caught if "license" in str(w.message).lower()]
    assert any(r.startswith("setuptools>=77") for r in meta["build-system"]["requires"])


def test_a_first_training_run_prints_no_library_noise(tmp_path: Path) -> None:
    """LoRA with activation checkpointing (the demo configs' setting): no bitsandbytes line about the
    `kernels` package (printed at peft's import on CPUs with AVX512-BF16) and no FutureWarning."""
    done = run_sqltune("finetune", "--model", "tiny", "--method", "lora", "--dataset", "synthetic:64",
                       "--max-steps", "2", "--train-batch-size", "8", "--gradient-checkpointing",
                       "--save-steps", "1000", "--logging-steps", "1", "--eval-generate-limit", "1",
                       "--tiny-layers", "1", "--max-seq-length", "128", "--output", str(tmp_path / "m"),
                       env={"PYTHONWARNINGS": "default"}, timeout=600)
    output = done.stdout + done.stderr
    assert "kernels-community" not in output and "No module named 'kernels'" not in output
    assert "FutureWarning" not in output, [line for line in output.splitlines() if "Warning" in line][:5]
