"""`sqltune serve --model s3://... | gs://...`: the server fetches the published version, verifies it
and answers with it; a second server start downloads nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sqltune.artifacts import registry
from sqltune.serve.process import ServerProcess

pytest_plugins = ["fixtures_buckets"]

pytestmark = pytest.mark.slow


def test_serves_a_published_model_from_a_bucket(bucket, tiny_model_dir: Path, tmp_path: Path) -> None:
    url = f"{bucket.url}/models/tiny-sql"
    registry.publish(tiny_model_dir, url)
    env = {**bucket.env, "SQLTUNE_CACHE": str(tmp_path / "cache")}
    body = {"question": "How many employees are older than 30?",
            "context": "CREATE TABLE employees (name VARCHAR, age INTEGER)", "max_tokens": 48}
    with ServerProcess(["--model", url, "--default-max-tokens", "48"], env=env) as server:
        first = httpx.post(server.url + "/v1/sql", json=body, timeout=60)
    assert first.status_code == 200, first.text
    assert first.json()["sql"].upper().startswith("SELECT")
    cached = list((tmp_path / "cache").rglob("model.safetensors"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    with ServerProcess(["--model", url, "--default-max-tokens", "48"], env=env) as server:
        second = httpx.post(server.url + "/v1/sql", json=body, timeout=60)
    assert second.json()["sql"] == first.json()["sql"]  # greedy, same verified version
    assert cached[0].stat().st_mtime_ns == mtime  # served from the cache, not downloaded again


def test_eval_of_a_bucket_model_keeps_its_defaults_and_the_yaml_storage_settings(bucket, tiny_model_dir: Path,
                                                                                  tmp_path: Path, monkeypatch) -> None:
    """`sqltune eval --model s3://...` evaluates on the data the model was trained on (its own dataset and
    eval fraction), and the storage settings of a YAML config (model_cache here) apply to the fetch."""
    import json

    from conftest import run_sqltune

    url = f"{bucket.url}/models/tiny-eval"
    registry.publish(tiny_model_dir, url)
    cache = tmp_path / "yaml-cache"
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model_cache: {cache}\n")
    monkeypatch.delenv("SQLTUNE_CACHE", raising=False)  # the environment would win over the YAML
    run_sqltune("eval", "--config", str(cfg), "--model", url, "--eval-limit", "4", "--eval-max-new-tokens", "24",
                "--eval-databases", "1", "--eval-output", str(tmp_path / "report"), env=bucket.env)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    trained = json.loads((tiny_model_dir / "sqltune.json").read_text())["config"]
    assert report["dataset"]["source"] == trained["dataset"] == "synthetic:1500"
    assert report["dataset"]["eval_fraction"] == trained["eval_fraction"]
    assert list(cache.rglob("model.safetensors")), "the YAML's model_cache was not used"
