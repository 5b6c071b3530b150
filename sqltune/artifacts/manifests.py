"""Model folders and their manifest: every file with its size and sha256, written last.

    python -c "from sqltune.artifacts import manifests; print(manifests.verify('models/tiny-sql')['digest'])"

A finished model folder holds the merged weights, tokenizer, generation config, sqltune.json and,
written last, manifest.json. A folder without a manifest is not a finished model, and a file whose
checksum differs is refused with its name. Checkpoints carry the same manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqltune.errors import ArtifactError

MANIFEST = "manifest.json"
SQLTUNE_META = "sqltune.json"
CHECKPOINTS = "checkpoints"
VERSIONS = "versions"
LATEST = "latest"
MANIFEST_VERSION = 1


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path, exclude: Iterable[str]) -> list[Path]:
    skip = set(exclude) | {MANIFEST}
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and rel.parts[0] not in skip and not rel.parts[0].startswith("."):
            out.append(p)
    return out


def write_manifest(folder: str | Path, exclude: Iterable[str] = (CHECKPOINTS,), **extra: Any) -> dict[str, Any]:
    """Write manifest.json (files, sizes, sha256) atomically; call it after every other file."""
    root = Path(folder)
    files = {str(p.relative_to(root)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _files(root, exclude)}
    manifest = {"version": MANIFEST_VERSION, "files": files, **extra}
    manifest["digest"] = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}: it is not a finished sqltune model "
                            "(the job may have been killed before it finished)",
                            "point at a complete model, or rerun `sqltune finetune` with the same output to resume")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}", "republish the model") from None


def verify(folder: str | Path, *, checksums: bool = True) -> dict[str, Any]:
    """Check that every file in the manifest is present with its size (and sha256)."""
    root = Path(folder)
    manifest = read_manifest(root)
    for name, entry in manifest["files"].items():
        p = root / name
        if not p.is_file():
            raise ArtifactError(f"{p} is listed in the manifest but missing", "republish or re-fetch the model")
        if p.stat().st_size != entry["size"]:
            raise ArtifactError(f"{p} has {p.stat().st_size} bytes, the manifest says {entry['size']}",
                                "the file is truncated or was changed: republish or re-fetch the model")
        if checksums and sha256_file(p) != entry["sha256"]:
            raise ArtifactError(f"{p} does not match its sha256 in the manifest (corrupt file)",
                                "republish or re-fetch the model")
    return manifest


def is_complete(folder: str | Path) -> bool:
    try:
        verify(folder, checksums=False)
    except ArtifactError:
        return False
    return True


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / SQLTUNE_META
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {SQLTUNE_META}",
                            "point at a folder written by `sqltune finetune`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})", "republish the model, or re-export it with "
                            "`sqltune finetune` and the same output") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is not a JSON object", "republish the model")
    return meta


def manifest_digest(files: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


class locked:
    """An exclusive file lock, so two processes filling the cache never write the same folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        import fcntl

        self.fh = self.path.open("a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        self.fh.close()

