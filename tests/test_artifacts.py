"""Manifests, verification and publishing to local folders (including a gcsfuse-style mount).

    pytest tests/test_artifacts.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sqltune import config
from sqltune.artifacts import manifests, registry, storage
from sqltune.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[1]


def make_model(folder: Path, tag: str = "a") -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(50_000))
    (folder / "config.json").write_text(json.dumps({"tag": tag}))
    (folder / "sqltune.json").write_text(json.dumps({"metrics": {"train_loss": 0.5}, "tag": tag}))
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    (folder / ".tiny-base").mkdir()
    (folder / ".tiny-base" / "w.bin").write_bytes(b"y")
    manifests.write_manifest(folder)
    return folder


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SQLTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(storage, "_overrides", {})
    return tmp_path / "cache"


def test_manifest_lists_model_files_only(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    files = manifests.read_manifest(model)["files"]
    assert set(files) == {"model.safetensors", "config.json", "sqltune.json"}  # no checkpoints, no dot-folders
    assert files["model.safetensors"]["size"] == 50_000
    assert manifests.verify(model)["digest"] == manifests.manifest_digest(files)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "has 49999 bytes"),
    (lambda p: p.write_bytes(bytes([p.read_bytes()[0] ^ 1]) + p.read_bytes()[1:]), "does not match its sha256"),
    (lambda p: p.unlink(), "missing"),
])
def test_damaged_file_is_refused_by_name(tmp_path: Path, damage, message: str) -> None:
    model = make_model(tmp_path / "m")
    damage(model / "model.safetensors")
    with pytest.raises(ArtifactError, match=message) as err:
        registry.resolve_model(str(model))
    assert "model.safetensors" in str(err.value)


def test_folder_without_manifest_is_not_a_model(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    (model / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        registry.resolve_model(str(model))
    assert not manifests.is_complete(model)


def test_edited_manifest_is_refused(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["files"]["config.json"]["size"] += 1
    storage.write_bytes(str(model / "elsewhere" / "manifest.json"), json.dumps(manifest).encode())
    with pytest.raises(ArtifactError, match="digest does not match"):
        registry.locate(str(model / "elsewhere"))


def test_publish_into_own_folder_is_a_no_op(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    assert registry.publish(model, str(model)) == str(model)
    assert not (model / "latest").exists()


def test_publish_to_a_mounted_folder_uses_versions_and_latest(tmp_path: Path) -> None:
    """A gcsfuse mount is a folder: the same versions/ + latest layout, read like a local folder."""
    mount = tmp_path / "mnt" / "models" / "sql"
    first = registry.publish(make_model(tmp_path / "a", "a"), str(mount))
    assert Path(first).parent == mount / "versions"
    got = registry.fetch(f"file://{mount}")
    assert got.path == Path(first) and got.bytes_downloaded == 0
    assert manifests.read_meta(registry.resolve_model(str(mount)))["tag"] == "a"

    def fail_at_pointer(url: str) -> None:
        if url.endswith("/latest"):
            raise OSError("disk full")

    with pytest.raises(OSError):
        registry.publish(make_model(tmp_path / "b", "b"), str(mount), before=fail_at_pointer)
    assert manifests.read_meta(registry.resolve_model(str(mount)))["tag"] == "a"  # previous version still served
    registry.publish(tmp_path / "b", str(mount))
    assert manifests.read_meta(registry.resolve_model(str(mount)))["tag"] == "b"
    assert json.loads((mount / "latest").read_text())["digest"] == manifests.read_manifest(tmp_path / "b")["digest"]


def test_only_rank_zero_publishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    dest = tmp_path / "dest"
    registry.publish(make_model(tmp_path / "m"), str(dest))
    assert not dest.exists()


def test_remote_work_dir_is_a_stable_staging_folder(cache: Path) -> None:
    a = registry.work_dir("s3://bucket/models/sql")
    assert a == registry.work_dir("s3://bucket/models/sql/") and a.is_dir() and cache in a.parents
    assert a != registry.work_dir("gs://bucket/models/sql")


def test_bucket_fields_resolve_and_configure_storage(tmp_path: Path) -> None:
    cfg, sources = config.load(["--transfer-workers", "4"],
                               {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "SQLTUNE_CACHE": str(tmp_path)})
    assert cfg.bucket_endpoint == "http://127.0.0.1:9000" and sources["bucket_endpoint"] == "env AWS_ENDPOINT_URL"
    storage.configure(cfg)
    s = storage.settings()
    assert (s.endpoint, s.workers, storage.cache_root()) == ("http://127.0.0.1:9000", 4, tmp_path)
    with pytest.raises(config.ConfigError, match="--transfer-workers"):
        config.load(["--transfer-workers", "0"], {})


def test_bucket_env_names_apply_without_configure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFER_WORKERS", "7")  # a bare generic name from somebody else's tool: ignored
    monkeypatch.setenv("SQLTUNE_TRANSFER_WORKERS", "3")
    monkeypatch.setenv("SQLTUNE_BUCKET_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("SQLTUNE_CACHE", str(tmp_path / "c"))
    s = storage.settings()
    assert (s.workers, s.endpoint, storage.cache_root()) == (3, "http://127.0.0.1:9", tmp_path / "c")


def test_unknown_protocol_is_named() -> None:
    with pytest.raises(ArtifactError, match="nosuch://"):
        storage.filesystem("nosuch://container/model")


def test_models_commands_help_and_local_list(tmp_path: Path) -> None:
    mount = tmp_path / "models"
    registry.publish(make_model(tmp_path / "a"), str(mount))
    for args in (["models", "--help"], ["models", "list", "--help"], ["models", "fetch", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "sqltune", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and "usage" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "sqltune", "models", "list", str(mount), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    versions = json.loads(proc.stdout)
    assert len(versions) == 1 and versions[0]["latest"] and versions[0]["metrics"] == {"train_loss": 0.5}
    proc = subprocess.run([sys.executable, "-m", "sqltune", "models", "list", str(tmp_path / "empty")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "no versions" in proc.stdout
