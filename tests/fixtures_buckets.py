"""Real object stores on 127.0.0.1 for bucket tests: moto's S3 server and gcp-storage-emulator.

    pytest tests/test_buckets.py          # test modules declare pytest_plugins = ["fixtures_buckets"]

Both servers start once per session; each test gets a fresh bucket, its own model cache and the
environment a user would set (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST), so sqltune's code path is
the one that runs against real clouds. Tests skip when the packages are not installed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The default gcsfs class first asks GCS's gRPC control API for the bucket type; set before any import.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Bucket:
    """A fresh bucket on a local server: `url` is its root, `env` what a subprocess needs to reach it."""

    url: str
    env: dict[str, str]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[str]:
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    pytest.importorskip("gcsfs")
    import logging

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    server = emulator.create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    host, port = server._api._httpd.server_address[:2]
    yield f"http://{host}:{port}"
    server.stop()


def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, env: dict[str, str]) -> None:
    from sqltune.artifacts import storage

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SQLTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SQLTUNE_NO_PROGRESS", "1")
    monkeypatch.setattr(storage, "_overrides", {})
    storage.forget_filesystems()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Bucket:
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server}
    _isolate(monkeypatch, tmp_path, env)
    from sqltune.artifacts import storage

    name = f"b-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.filesystem(f"s3://{name}")
    fs.mkdir(name)
    return Bucket(f"s3://{name}", env)


@pytest.fixture
def gcs_bucket(gcs_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Bucket:
    env = {"STORAGE_EMULATOR_HOST": gcs_server, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    _isolate(monkeypatch, tmp_path, env)
    from sqltune.artifacts import storage

    name = f"b-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.filesystem(f"gs://{name}")
    fs.mkdir(name)
    return Bucket(f"gs://{name}", env)


@pytest.fixture(params=["s3", "gcs"])
def bucket(request: pytest.FixtureRequest) -> Bucket:
    """Each test that takes `bucket` runs against both stores."""
    return request.getfixturevalue(f"{request.param}_bucket")
