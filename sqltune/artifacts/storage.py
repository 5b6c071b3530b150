"""One storage layer for local folders, file://, gs:// and s3:// (and S3-compatible endpoints).

    AWS_ENDPOINT_URL=http://127.0.0.1:9000 sqltune models list s3://bucket/models/sql

fsspec does the talking; gcsfs and s3fs are the `buckets` extra. Credentials come from each
cloud's own chain (environment, credentials file, metadata server) and never pass through here,
so none can be logged or written into an artifact. What this module adds is transfer shape:
many files and many byte ranges in flight at once, with a progress bar and MB/s in the log.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.errors import DISK_FULL_FIX, ArtifactError

log = logs.get("storage")


def ensure_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing `needed` bytes into local `folder` when its disk has less free: a model or a
    checkpoint cut off by a full disk is lost, and the disk is left full for every other process on it."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ArtifactError(f"{what} needs about {_size(needed)} in {folder}, and {_size(free)} is free on that disk",
                            DISK_FULL_FIX)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"

# Ranged GETs and multipart PUTs of this size keep many requests in flight for one large shard
# while bounding memory to about workers * CHUNK.
CHUNK = 16 << 20
# GCS composes at most 32 source objects into one.
GCS_MAX_COMPOSE = 32
PART_MARK = ".sqltune-part-"


@dataclasses.dataclass
class Settings:
    endpoint: str = ""
    workers: int = 16
    cache: str = ""


# Config field behind each setting: the same env names (BUCKET_ENDPOINT, AWS_ENDPOINT_URL, SQLTUNE_CACHE, ...)
# apply whether or not a command passed its resolved Config to configure().
_FIELDS = {"endpoint": "bucket_endpoint", "workers": "transfer_workers", "cache": "model_cache"}
_overrides: dict[str, Any] = {}


def configure(cfg: Any = None, **overrides: Any) -> Settings:
    """Use a resolved Config's bucket fields (flags and YAML included) for every later transfer."""
    if cfg is not None:
        _overrides.update({key: getattr(cfg, name) for key, name in _FIELDS.items()})
    _overrides.update(overrides)
    _fs_cache.clear()
    return settings()


def settings() -> Settings:
    from sqltune import config

    values: dict[str, Any] = {}
    for key, name in _FIELDS.items():
        if _overrides.get(key) not in (None, ""):
            values[key] = _overrides[key]
            continue
        for env in config.env_names(name):
            if os.environ.get(env):
                values[key] = config.parse_value(name, os.environ[env], f"env {env}")
                break
    return Settings(**values)


def cache_root() -> Path:
    root = settings().cache
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sqltune"


_fs_cache: dict[tuple[str, ...], Any] = {}


def forget_filesystems() -> None:
    """Drop the cached filesystem clients, so the next call builds them from the current settings and
    environment (a new endpoint, emulator or credentials)."""
    _fs_cache.clear()
_fs_lock = threading.Lock()


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for `url` and the path inside it."""
    proto = protocol(url)
    path = url.split("://", 1)[1] if "://" in url else url
    if proto == "file":
        path = os.path.abspath(path)
    key = (proto, settings().endpoint, os.environ.get("AWS_ENDPOINT_URL", ""),
           os.environ.get("STORAGE_EMULATOR_HOST", ""))
    with _fs_lock:
        if key not in _fs_cache:
            _fs_cache[key] = _make_fs(proto)
    return _fs_cache[key], path.rstrip("/")


def _make_fs(proto: str) -> Any:
    import fsspec

    # Listings are never cached: readers poll `latest` and checkpoint folders that other
    # processes change, and a stale listing would hide a new version.
    opts: dict[str, Any] = {"use_listings_cache": False, "skip_instance_cache": True}
    try:
        if proto == "s3":
            endpoint = settings().endpoint
            if endpoint:
                opts["endpoint_url"] = endpoint
            return fsspec.filesystem("s3", max_concurrency=settings().workers, **opts)
        if proto in ("gs", "gcs"):
            if os.environ.get("STORAGE_EMULATOR_HOST"):
                # Emulators speak the JSON API only; the default class first asks the gRPC
                # storage-control API for the bucket type, which an emulator never answers.
                from gcsfs.core import GCSFileSystem

                return GCSFileSystem(token="anon", **opts)
            return fsspec.filesystem("gs", **opts)
        return fsspec.filesystem(proto, **({} if proto == "file" else opts))
    except ImportError as e:
        raise ArtifactError(f"{proto}:// needs a package that is not installed ({e.name or e})",
                            "pip install 'sqltune[buckets]' (gs:// and s3://), or the fsspec backend for "
                            f"{proto}://") from None
    except ValueError:
        raise ArtifactError(f"{proto}:// is not a storage protocol sqltune knows",
                            "use a local folder, file://, gs:// or s3://") from None


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def read_bytes(url: str) -> bytes | None:
    """An object's bytes, or None when it does not exist."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def write_bytes(url: str, data: bytes) -> None:
    """One PUT: object stores replace an object atomically, so readers see old or new bytes."""
    fs, path = filesystem(url)
    if protocol(url) == "file":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return
    fs.pipe_file(path, data)


def list_dirs(url: str) -> list[str]:
    """Names of the direct sub-folders of `url` (empty when it does not exist)."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")


def remove(url: str, names: Iterable[str] = ()) -> None:
    """Delete the objects `names` under `url` first (in that order), then everything else there."""
    fs, path = filesystem(url)
    for name in names:
        try:
            fs.rm_file(f"{path}/{name}")
        except FileNotFoundError:
            pass
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


@dataclasses.dataclass
class Transfer:
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0


class _Progress:
    """A byte counter shared by worker threads, drawn as a tqdm bar on a terminal."""

    def __init__(self, total: int, desc: str) -> None:
        self.done = 0
        self._lock = threading.Lock()
        self._bar = None
        if logs.show_progress():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _PartCallback:
    """fsspec callback shape: s3fs reports each finished multipart part through relative_update."""

    def __init__(self, progress: _Progress) -> None:
        self.progress, self.value = progress, 0

    def set_size(self, size: int) -> None:
        pass

    def relative_update(self, inc: int = 1) -> None:
        self.value += inc
        self.progress.add(inc)

    def branched(self, *args: Any, **kwargs: Any) -> None:
        return None


def _ranges(size: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, size)) for a in range(0, size, chunk)] or [(0, 0)]


def _run(tasks: Sequence[Callable[[], None]], workers: int) -> None:
    """Run tasks on `workers` threads; the first failure cancels what has not started and is raised."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(t) for t in tasks]
        try:
            for f in futures:
                f.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def download(items: Sequence[tuple[str, Path, int]], *, desc: str = "download", workers: int | None = None,
             chunk: int | None = None) -> Transfer:
    """Fetch (url, local path, size) items; large files come down as parallel ranged reads."""
    workers = workers or settings().workers
    chunk = chunk or CHUNK
    total = sum(size for _, _, size in items)
    progress = _Progress(total, desc)
    start = time.perf_counter()
    tasks: list[Callable[[], None]] = []
    for url, dest, size in items:
        fs, path = filesystem(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("wb") as fh:
            fh.truncate(size)
        for a, b in _ranges(size, chunk):
            tasks.append(lambda fs=fs, path=path, dest=dest, a=a, b=b: _get_range(fs, path, dest, a, b, progress))
    try:
        _run(tasks, workers)
    finally:
        progress.close()
    stats = Transfer(len(items), total, time.perf_counter() - start)
    logs.event(log, f"downloaded {stats.files} files", files=stats.files, bytes=stats.bytes,
               seconds=round(stats.seconds, 3), mb_per_s=round(stats.mb_per_s, 1))
    return stats


def _get_range(fs: Any, path: str, dest: Path, a: int, b: int, progress: _Progress) -> None:
    if b <= a:
        return
    data = fs.cat_file(path, start=a, end=b)
    if len(data) != b - a:
        raise ArtifactError(f"{path}: expected {b - a} bytes at offset {a}, got {len(data)} (object changed "
                            "or was truncated)", "re-run; if it persists, republish the model")
    fd = os.open(dest, os.O_WRONLY)
    try:
        os.pwrite(fd, data, a)
    finally:
        os.close(fd)
    progress.add(len(data))


def upload(items: Sequence[tuple[Path, str]], *, desc: str = "upload", workers: int | None = None,
           chunk: int | None = None, before: Callable[[str], None] | None = None) -> Transfer:
    """Send (local path, url) items in parallel; large files go as parallel parts.

    `before(url)` runs as each file starts: progress hooks and fault-injection tests use it.
    """
    workers = workers or settings().workers
    chunk = chunk or CHUNK
    sizes = [p.stat().st_size for p, _ in items]
    progress = _Progress(sum(sizes), desc)
    start = time.perf_counter()

    # Parts in flight across all files stay near `workers`, so memory stays near workers * chunk.
    per_file = max(1, workers // max(1, min(workers, len(items))))

    def one(src: Path, url: str, size: int) -> None:
        if before is not None:
            before(url)
        fs, path = filesystem(url)
        proto = protocol(url)
        if proto == "s3":
            seen = _PartCallback(progress)
            fs.put_file(str(src), path, chunksize=max(chunk, 5 << 20), max_concurrency=per_file, callback=seen)
            progress.add(size - seen.value)
        elif proto in ("gs", "gcs") and size > 2 * chunk:
            _gcs_composite(fs, src, path, size, chunk, per_file, progress)
        else:
            if proto == "file":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            fs.put_file(str(src), path)
            progress.add(size)

    try:
        _run([lambda s=s, u=u, n=n: one(s, u, n) for (s, u), n in zip(items, sizes, strict=True)], workers)
    finally:
        progress.close()
    stats = Transfer(len(items), sum(sizes), time.perf_counter() - start)
    logs.event(log, f"uploaded {stats.files} files", files=stats.files, bytes=stats.bytes,
               seconds=round(stats.seconds, 3), mb_per_s=round(stats.mb_per_s, 1))
    return stats


def _gcs_composite(fs: Any, src: Path, path: str, size: int, chunk: int, workers: int, progress: _Progress) -> None:
    """GCS has no multipart upload: send parts as objects in parallel, compose, delete the parts."""
    chunk = max(chunk, -(-size // GCS_MAX_COMPOSE))
    ranges = _ranges(size, chunk)
    parts = [f"{path}{PART_MARK}{i:03d}" for i in range(len(ranges))]

    def put(part: str, a: int, b: int) -> None:
        with src.open("rb") as fh:
            fh.seek(a)
            fs.pipe_file(part, fh.read(b - a))
        progress.add(b - a)

    try:
        _run([lambda p=p, r=r: put(p, *r) for p, r in zip(parts, ranges, strict=True)], workers)
        fs.merge(path, parts)
    finally:
        for part in parts:
            try:
                fs.rm_file(part)
            except FileNotFoundError:
                pass
