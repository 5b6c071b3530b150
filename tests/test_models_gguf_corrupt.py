"""A corrupt or truncated .gguf given as --model is refused in one error, exit 2, naming the file, the
cause (not a GGUF / truncated at byte N / corrupt header) and the fix: never a traceback from numpy's
reshape, an IndexError in the header, mmap of an empty file, or a count of 2^63.

    pytest tests/test_models_gguf_corrupt.py

The files are real GGUFs written by the gguf package, then cut or damaged the way a failed download
or a bad disk leaves them.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import run_sqltune, write_gguf

from sqltune.errors import ModelError
from sqltune.models import gguf_file

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small but complete GGUF: metadata, a vocabulary and two tensors of different types."""
    return write_gguf(tmp_path_factory.mktemp("gguf") / "whole.gguf", "whole",
                      {"token_embd.weight": np.ones((8, 64), dtype=np.float32),
                       "output.weight": np.ones((4, 64), dtype=np.float16)},
                      tokens=[f"tok{i}" for i in range(300)])


def damaged(whole: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error must say)."""
    data = whole.read_bytes()
    header_end = data.index(b"tok299") + 6
    cases = {
        "empty": (b"", "is empty (0 bytes)"),
        "text": (b"CREATE TABLE t (a INT)\n", "is not a GGUF file"),
        "cut_in_header": (data[:header_end - 100], f"is truncated at byte {header_end - 100}"),
        "cut_in_data": (data[:-100], f"is truncated at byte {len(data) - 100}: the data of tensor output.weight"),
        "count_2_63": (data[:8] + struct.pack("<Q", 2**63) + data[16:], "corrupt header"),
        "cut_after_magic": (data[:6], "is truncated at byte 6"),
    }
    out = {}
    for name, (raw, says) in cases.items():
        path = folder / f"{name}.gguf"
        path.write_bytes(raw)
        out[name] = (path, says)
    return out


def test_the_check_passes_a_whole_file_and_names_each_kind_of_damage(whole: Path, tmp_path: Path) -> None:
    gguf_file.check(whole)
    assert len(gguf.GGUFReader(str(whole)).tensors) == 2  # the reference file is one the reader takes
    for name, (path, says) in damaged(whole, tmp_path).items():
        with pytest.raises(ModelError) as caught:
            gguf_file.check(path)
        assert str(path) in caught.value.message and says in caught.value.message, (name, caught.value.message)
        assert caught.value.hint


def test_serve_with_a_damaged_gguf_prints_one_error_and_exits_2(whole: Path, tmp_path: Path) -> None:
    for name, (path, says) in damaged(whole, tmp_path).items():
        done = run_sqltune("serve", "--model", str(path), "--engine", "llamacpp", check=False, timeout=120)
        assert done.returncode == 2, (name, done.stderr[-3000:])
        assert "Traceback" not in done.stderr, (name, done.stderr[-3000:])
        error = [line for line in done.stderr.splitlines() if line.startswith("sqltune: error:")]
        assert len(error) == 1 and str(path) in error[0] and says in error[0], (name, done.stderr[-2000:])
        assert "fix:" in done.stderr


def test_finetune_from_a_truncated_gguf_says_where_it_was_cut(whole: Path, tmp_path: Path) -> None:
    path, says = damaged(whole, tmp_path)["cut_in_data"]
    done = run_sqltune("finetune", "--model", str(path), "--dataset", "synthetic:20", "--max-steps", "1",
                       "--output", str(tmp_path / "out"), check=False, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"sqltune: error: {path} {says}" in done.stderr, done.stderr[-3000:]
