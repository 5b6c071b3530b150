"""`sqltune models`: what is published at a model URL, and fetching it ahead of serving.

    sqltune models list gs://my-bucket/models/gemma-2b-sql
    sqltune models fetch s3://my-bucket/models/gemma-2b-sql    # prints the verified local folder
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from sqltune import config, logs


@dataclass
class Version:
    version: str
    url: str
    complete: bool
    latest: bool = False
    created: str = ""
    files: int = 0
    bytes: int = 0
    digest: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


def _metrics(meta: dict[str, Any]) -> dict[str, Any]:
    m = meta.get("metrics", {})
    out = {k: m[k] for k in ("steps", "train_loss", "eval_loss") if isinstance(m.get(k), (int, float))}
    held = m.get("heldout") or {}
    if isinstance(held.get("exact_match"), (int, float)):
        out["heldout_exact_match"] = held["exact_match"]
    for key, value in m.items():  # evaluation results written back into the artifact
        if key.startswith("execution") and isinstance(value, (int, float)):
            out[key] = value
    return out


def list_versions(url: str) -> list[Version]:
    """Every version prefix under `url`, oldest first, with completeness and metrics."""
    from sqltune.artifacts import manifests, storage

    pointer = storage.read_bytes(storage.join(url, manifests.LATEST))
    latest = json.loads(pointer).get("version") if pointer else None

    def one(name: str) -> Version:
        vurl = storage.join(url, manifests.VERSIONS, name)
        raw = storage.read_bytes(storage.join(vurl, manifests.MANIFEST))
        if raw is None:
            return Version(name, vurl, complete=False, latest=name == latest)
        manifest = json.loads(raw)
        files = manifest.get("files", {})
        v = Version(name, vurl, True, name == latest, files=len(files), digest=manifest.get("digest", ""),
                    bytes=sum(f["size"] for f in files.values()))
        meta_raw = storage.read_bytes(storage.join(vurl, manifests.SQLTUNE_META))
        if meta_raw:
            meta = json.loads(meta_raw)
            v.created, v.metrics = meta.get("created", ""), _metrics(meta)
        return v

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, storage.list_dirs(storage.join(url, manifests.VERSIONS))))


def render(versions: list[Version]) -> str:
    if not versions:
        return "no versions published here"
    rows = [("", "VERSION", "STATE", "SIZE", "DIGEST", "METRICS")]
    for v in versions:
        metrics = " ".join(f"{k}={val:.4g}" if isinstance(val, float) else f"{k}={val}" for k, val in v.metrics.items())
        rows.append(("*" if v.latest else "", v.version, "complete" if v.complete else "INCOMPLETE",
                     f"{v.bytes / 1e6:.1f} MB" if v.complete else "-", v.digest[:12], metrics))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n(* = latest; INCOMPLETE = a publish that was cut short, never served)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="List published model versions; fetch one into the local cache.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ls = msub.add_parser("list", help="Versions under a model URL with state, size and metrics.")
    ls.add_argument("url", help="Model URL: gs://, s3://, file:// or a folder.")
    ls.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    config.add_arguments(ls, groups=["buckets"])
    ls.set_defaults(func=run_list)
    fetch = msub.add_parser("fetch", help="Download and verify a model (latest version) into the cache.")
    fetch.add_argument("url", help="Model URL: gs://, s3://, file:// or a folder.")
    config.add_arguments(fetch, groups=["buckets"])
    fetch.set_defaults(func=run_fetch)


def _setup(args: argparse.Namespace) -> None:
    from sqltune.artifacts import storage

    cfg, _ = config.from_namespace(args)
    logs.setup(cfg.log_level)
    storage.configure(cfg)


def run_list(args: argparse.Namespace) -> int:
    _setup(args)
    versions = list_versions(args.url)
    print(json.dumps([asdict(v) for v in versions], indent=2) if args.json else render(versions))
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    from sqltune.artifacts import registry

    _setup(args)
    got = registry.fetch(args.url)
    print(got.path)
    return 0
