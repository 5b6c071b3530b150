"""Checkpoints in the bucket, so a retried task on a fresh machine resumes instead of starting over.

    sqltune finetune --output gs://bucket/models/sql --save-steps 100    # retried tasks resume

Each complete local checkpoint (its manifest written by the job) is uploaded to
`<output>/checkpoints/checkpoint-<step>/`, manifest last; a remote checkpoint without its manifest
is a killed upload and is never restored. Pruning deletes a checkpoint's manifest first, so a
prune cut short leaves nothing that looks complete but is not.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.artifacts import manifests, registry, storage

log = logs.get("checkpoints")

# a checkpoint folder as the Trainer names it; the step is group 1
NAME = re.compile(r"^checkpoint-(\d+)$")


def remote(output: str) -> list[tuple[int, str, bool]]:
    """(step, name, complete) of every checkpoint under `output`, oldest first."""
    root = storage.join(output, manifests.CHECKPOINTS)
    fs, _ = storage.filesystem(root)
    found = []
    for name in storage.list_dirs(root):
        if m := NAME.match(name):
            _, mpath = storage.filesystem(storage.join(root, name, manifests.MANIFEST))
            found.append((int(m.group(1)), name, bool(fs.exists(mpath))))
    return sorted(found)


def newest_complete(local: Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest complete checkpoint-<step> in the local folder, or None."""
    found = [(int(m.group(1)), p) for p in local.iterdir() if (m := NAME.match(p.name))] if local.is_dir() else []
    return next(((step, p) for step, p in sorted(found, reverse=True) if manifests.is_complete(p)), None)


def _local_newest(local: Path) -> int:
    newest = newest_complete(local)
    return newest[0] if newest else -1


def upload(output: str, folder: Path) -> bool:
    """Copy one complete local checkpoint to the bucket; False when it is not complete."""
    if not manifests.is_complete(folder):
        log.warning(f"not uploading {folder.name}: it has no complete manifest")
        return False
    manifest = manifests.read_manifest(folder)
    url = storage.join(output, manifests.CHECKPOINTS, folder.name)
    stats = registry.upload_folder(folder, manifest, url, desc=f"upload {folder.name}")
    logs.event(log, "checkpoint uploaded", checkpoint=folder.name, url=url, bytes=stats.bytes,
               seconds=round(stats.seconds, 2), mb_per_s=round(stats.mb_per_s, 1))
    return True


def prune(output: str, keep: int) -> list[str]:
    """Keep the newest `keep` complete remote checkpoints; delete older ones and dead partial uploads."""
    found = remote(output)
    complete = [step for step, _, ok in found if ok]
    kept = set(complete[-keep:]) if keep > 0 else set(complete)
    oldest_kept = min(kept, default=-1)
    gone = []
    for step, name, ok in found:
        if step in kept or (not ok and step > oldest_kept):
            continue  # an incomplete one newer than what we keep may still be uploading
        storage.remove(storage.join(output, manifests.CHECKPOINTS, name), names=[manifests.MANIFEST])
        gone.append(name)
    if gone:
        logs.event(log, "pruned remote checkpoints", removed=gone, kept=sorted(kept))
    return gone


def restore(output: str, local: Path) -> int:
    """Download the newest complete remote checkpoint into `local` unless a local one is as new.

    Returns how many checkpoints were brought down (0 or 1: resuming needs only the newest).
    """
    if not manifests.is_remote(output):
        return 0
    complete = [(step, name) for step, name, ok in remote(output) if ok]
    if not complete:
        return 0
    step, name = complete[-1]
    if _local_newest(local) >= step:
        logs.event(log, "local checkpoint is current", step=step)
        return 0
    url = storage.join(output, manifests.CHECKPOINTS, name)
    vurl, manifest, _ = registry.locate(url)
    local.mkdir(parents=True, exist_ok=True)
    partial = local / f".restore-{name}-{os.getpid()}"
    n = registry.download_verified(vurl, manifest, partial)
    target = local / name
    if target.exists():
        shutil.rmtree(target)  # an incomplete local save of the same step
    os.replace(partial, target)
    logs.event(log, "checkpoint restored", checkpoint=name, source=url, path=str(target), bytes=n)
    return 1


def callback(output: str, local: Path, save_total_limit: int) -> Any:
    """A TrainerCallback that copies each complete checkpoint to `output`, or None when the output is
    local (the Trainer already writes and prunes checkpoints there)."""
    if not manifests.is_remote(output):
        return None
    from transformers import TrainerCallback

    class BucketCheckpoints(TrainerCallback):
        """After each save (and after the job's manifest callback), upload the checkpoint and prune."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not state.is_world_process_zero:
                return
            folder = local / f"checkpoint-{state.global_step}"
            if folder.is_dir() and upload(output, folder):
                prune(output, save_total_limit)

    return BucketCheckpoints()
