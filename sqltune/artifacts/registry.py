"""Where models live: a local folder, file://, gs:// or s3://, with one manifest format.

    sqltune finetune --output s3://bucket/models/sql && sqltune serve --model s3://bucket/models/sql

A finished model folder holds the merged weights, tokenizer, generation config, sqltune.json and,
written last, manifest.json (every file with size and sha256). A folder without a manifest is
not a finished model, and a file whose checksum differs is refused with its name.

In a bucket, each publish uploads into a new prefix `versions/<id>/`, its manifest last, and then
replaces the small `latest` pointer (one PUT, atomic in GCS and S3). Readers follow `latest`, so a
publish killed at any point leaves the previous version served, never a mix. Fetched versions
are cached by manifest digest: a restart on the same version downloads nothing. Checkpoints go to
`checkpoints/checkpoint-<step>/` the same way, so a retried task on a fresh machine resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.artifacts import storage
from sqltune.artifacts.manifests import (
    LATEST,
    MANIFEST,
    VERSIONS,
    is_remote,
    local_path,
    locked,
    manifest_digest,
    sha256_file,
    verify,
)
from sqltune.errors import ArtifactError

log = logs.get("artifacts")
# --- reading: resolve `latest`, verify, cache ------------------------------------------------------

@dataclass
class Fetched:
    """A model made local: where it is, which version, and what this fetch cost."""

    path: Path
    source: str
    version: str
    digest: str
    files: int
    bytes_downloaded: int
    cached: bool


def _parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ArtifactError(f"{where} is not a sqltune manifest", "republish the model") from None
    if manifest.get("digest") != manifest_digest(files):
        raise ArtifactError(f"{where}: its digest does not match its file list (the manifest was edited)",
                            "republish the model")
    return manifest


def locate(url: str) -> tuple[str, dict[str, Any], str]:
    """(version URL, manifest, version id) for a model URL: `latest` when there is one (it is the
    authority for a published layout), else a folder with its own manifest (a version, a checkpoint)."""
    pointer = storage.read_bytes(storage.join(url, LATEST))
    if pointer is None:
        raw = storage.read_bytes(storage.join(url, MANIFEST))
        if raw is None:
            raise ArtifactError(f"{url} has no {MANIFEST} and no `{LATEST}` pointer: no finished model was "
                                "published there (a job killed before publishing leaves none)",
                                f"check the URL with `sqltune models list {url}`, or publish with "
                                f"`sqltune finetune --output {url}`")
        return url, _parse_manifest(raw, storage.join(url, MANIFEST)), url.rstrip("/").rsplit("/", 1)[-1]
    try:
        version = json.loads(pointer)["version"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ArtifactError(f"{storage.join(url, LATEST)} is not a sqltune version pointer",
                            "republish the model") from None
    vurl = storage.join(url, VERSIONS, version)
    raw = storage.read_bytes(storage.join(vurl, MANIFEST))
    if raw is None:
        raise ArtifactError(f"{url}: `{LATEST}` points at version {version}, which has no {MANIFEST}",
                            f"republish, or pick a complete version from `sqltune models list {url}`")
    return vurl, _parse_manifest(raw, storage.join(vurl, MANIFEST)), version


def fetch(url: str, *, cache: Path | None = None) -> Fetched:
    """Verified local copy of the model at `url`: the folder itself when local, else the cache
    (`cache`, default $SQLTUNE_CACHE or ~/.cache/sqltune)."""
    if not is_remote(url):
        path = local_path(url)
        if (path / LATEST).is_file():  # a published layout, e.g. a gcsfuse mount of a bucket
            vurl, _, _ = locate(str(path))
            path = Path(vurl)
        manifest = verify(path)
        return Fetched(path, str(path), path.name, manifest["digest"], len(manifest["files"]), 0, True)
    vurl, manifest, version = locate(url)
    digest = manifest["digest"]
    models = (cache or storage.cache_root()) / "models"
    models.mkdir(parents=True, exist_ok=True)
    final = models / digest
    with locked(models / f".{digest}.lock"):
        if (final / MANIFEST).is_file():
            try:
                verify(final, checksums=False)
                logs.event(log, "model cache hit", source=vurl, path=str(final), bytes_downloaded=0)
                return Fetched(final, vurl, version, digest, len(manifest["files"]), 0, True)
            except ArtifactError as e:
                log.warning(f"cached copy is damaged, fetching again: {e.message}")
                shutil.rmtree(final)
        partial = models / f".partial-{digest}"
        n = download_verified(vurl, manifest, partial)
        os.replace(partial, final)
    logs.event(log, "model fetched", source=vurl, version=version, path=str(final), bytes_downloaded=n)
    return Fetched(final, vurl, version, digest, len(manifest["files"]), n, False)


def download_verified(url: str, manifest: dict[str, Any], dest: Path) -> int:
    """Download every manifest file under `url` into `dest`, check sha256s, write the manifest last.

    Files an interrupted earlier attempt already brought down intact are kept. Returns bytes fetched.
    """
    dest.mkdir(parents=True, exist_ok=True)
    (dest / MANIFEST).unlink(missing_ok=True)
    files = manifest["files"]

    def intact(name: str) -> bool:
        p = dest / name
        return p.is_file() and p.stat().st_size == files[name]["size"] and sha256_file(p) == files[name]["sha256"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        have = dict(zip(files, pool.map(intact, files), strict=True))
    todo = [name for name in files if not have[name]]
    stats = storage.download([(storage.join(url, n), dest / n, files[n]["size"]) for n in todo],
                             desc=f"fetch {url.rsplit('/', 1)[-1]}")
    with ThreadPoolExecutor(max_workers=4) as pool:
        sums = dict(zip(todo, pool.map(lambda n: sha256_file(dest / n), todo), strict=True))
    for name in todo:
        if sums[name] != files[name]["sha256"]:
            (dest / name).unlink()
            raise ArtifactError(f"{name} from {storage.join(url, name)} does not match its sha256 in the manifest "
                                f"(expected {files[name]['sha256'][:16]}..., got {sums[name][:16]}...): the stored "
                                "file is corrupt or was changed after publishing",
                                "republish the model, or serve an older complete version (`sqltune models list`)")
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return stats.bytes


def resolve_model(url: str) -> Path:
    """A verified local folder for a model URL (local path, gcsfuse mount, file://, gs://, s3://)."""
    return fetch(url).path


# --- writing: versions, manifest last, then `latest` -----------------------------------------------

def new_version_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def upload_folder(root: Path, manifest: dict[str, Any], url: str, *,
                  before: Callable[[str], None] | None = None, desc: str = "upload") -> storage.Transfer:
    """Upload the manifest's files under `url`, then the manifest itself: readers trust only a manifest,
    so until its PUT lands the prefix is invisible to them."""
    stats = storage.upload([(root / n, storage.join(url, n)) for n in manifest["files"]], before=before, desc=desc)
    storage.upload([(root / MANIFEST, storage.join(url, MANIFEST))], before=before, desc=desc)
    return stats


def publish(local_dir: str | Path, dest: str, *, before: Callable[[str], None] | None = None) -> str:
    """Make a finished local model folder available at `dest`; returns where it is.

    A local `dest` that is the folder itself is already published. Anywhere else (a bucket, another
    folder such as a gcsfuse mount) gets a new `versions/<id>/` prefix and then the `latest` pointer.
    """
    root = Path(local_dir)
    manifest = verify(root, checksums=False)
    if not is_remote(dest) and local_path(dest).resolve() == root.resolve():
        return str(root)
    if not logs.is_rank0():
        return dest
    url = dest if is_remote(dest) else str(local_path(dest).resolve())
    version = new_version_id()
    vurl = storage.join(url, VERSIONS, version)
    stats = upload_folder(root, manifest, vurl, before=before, desc=f"publish {version}")
    pointer = {"version": version, "digest": manifest["digest"], "files": len(manifest["files"]),
               "bytes": stats.bytes, "published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if before is not None:
        before(storage.join(url, LATEST))
    storage.write_bytes(storage.join(url, LATEST), json.dumps(pointer, indent=2).encode())
    logs.event(log, "model published", url=url, version=version, files=stats.files, bytes=stats.bytes,
               seconds=round(stats.seconds, 2), mb_per_s=round(stats.mb_per_s, 1))
    return vurl


# --- hooks the fine-tuning job calls ---------------------------------------------------------------

def work_dir(output: str) -> Path:
    """The local folder the job trains and exports into: the output itself when local, else a staging
    folder under the cache named after the output (the same URL reuses it on the same machine)."""
    if not is_remote(output):
        return local_path(output)
    key = hashlib.sha256(output.rstrip("/").encode()).hexdigest()[:16]
    run = storage.cache_root() / "runs" / key
    run.mkdir(parents=True, exist_ok=True)
    return run
