"""Models in buckets against real servers on 127.0.0.1 (moto's S3 server, gcp-storage-emulator).

    pytest tests/test_buckets.py
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import log_events

from sqltune.artifacts import checkpoints, manifests, registry, storage
from sqltune.errors import ArtifactError

pytest_plugins = ["fixtures_buckets"]

ROOT = Path(__file__).resolve().parents[1]


def blob(seed: int, size: int) -> bytes:
    # gcp-storage-emulator drops a trailing CR/LF from multipart uploads; real GCS keeps every byte.
    return random.Random(seed).randbytes(size - 1) + b"\0"


def make_model(folder: Path, seed: int, shards: int = 3, shard_bytes: int = 300_000) -> Path:
    """A model-shaped folder: shards, config, sqltune.json with metrics, a subfolder, manifest last."""
    folder.mkdir(parents=True)
    for i in range(shards):
        (folder / f"model-{i:05d}-of-{shards:05d}.safetensors").write_bytes(blob(seed * 1000 + i, shard_bytes))
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    (folder / "sqltune.json").write_text(json.dumps({"created": "2026-01-01T00:00:00Z",
                                                     "metrics": {"train_loss": 1.0 + seed, "steps": 10 * seed}}))
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text(f"vocab {seed}")
    (folder / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-1" / "junk.bin").write_bytes(b"not published")
    manifests.write_manifest(folder)
    return folder


def same_files(a: Path, b: Path) -> bool:
    names = manifests.read_manifest(a)["files"]
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def fresh_fetch(url: str, tmp: Path) -> registry.Fetched:
    """Fetch as a new machine would: an empty cache."""
    return registry.fetch(url, cache=tmp / f"cache-{time.monotonic_ns()}")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 256 KiB ranges and parts: small test files still take the ranged / multipart / compose paths.
    monkeypatch.setattr(storage, "CHUNK", 256 << 10)


def test_publish_then_fetch_round_trip(bucket, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = make_model(tmp_path / "m", seed=1)
    url = f"{bucket.url}/models/sql"
    with caplog.at_level("INFO", logger="sqltune"):
        where = registry.publish(model, url)
    assert where.startswith(f"{url}/versions/")
    published = [r.fields for r in caplog.records if r.getMessage() == "model published"]
    assert published and published[0]["mb_per_s"] > 0 and published[0]["bytes"] > 900_000
    got = registry.fetch(url)
    assert not got.cached and got.bytes_downloaded == sum(f["size"] for f in manifests.read_manifest(model)["files"].values())
    assert same_files(model, got.path)
    assert not (got.path / "checkpoints").exists()  # checkpoints never ship with the model
    assert manifests.verify(got.path)["digest"] == manifests.read_manifest(model)["digest"]
    assert registry.resolve_model(url) == got.path


def test_second_fetch_downloads_nothing(bucket, tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", seed=2)
    url = f"{bucket.url}/m"
    version_url = registry.publish(model, url)
    first = registry.fetch(url)
    assert first.bytes_downloaded > 0
    # Delete the shards from the bucket: a fetch that tried to download anything would now fail.
    fs, path = storage.filesystem(version_url)
    for name in manifests.read_manifest(model)["files"]:
        if name.endswith(".safetensors"):
            fs.rm_file(f"{path}/{name}")
    second = registry.fetch(url)
    assert second.cached and second.bytes_downloaded == 0 and second.path == first.path


def test_corrupted_byte_is_detected_and_named(bucket, tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", seed=3)
    url = f"{bucket.url}/m"
    version_url = registry.publish(model, url)
    victim = "model-00001-of-00003.safetensors"
    fs, path = storage.filesystem(f"{version_url}/{victim}")
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(path, bytes(data))
    with pytest.raises(ArtifactError, match=victim) as err:
        registry.fetch(url)
    assert "sha256" in str(err.value)
    models = storage.cache_root() / "models"
    assert not (models / manifests.read_manifest(model)["digest"]).exists()  # nothing half-good is cached


def test_missing_manifest_or_nothing_published_is_refused(s3_bucket, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no manifest.json and no `latest`"):
        registry.fetch(f"{s3_bucket.url}/nothing-here")
    # files uploaded without their manifest (a killed copy) are not a model
    model = make_model(tmp_path / "m", seed=4)
    storage.upload([(model / "config.json", f"{s3_bucket.url}/half/config.json")])
    with pytest.raises(ArtifactError, match="no manifest.json"):
        registry.fetch(f"{s3_bucket.url}/half")


def test_publish_fault_at_each_file_leaves_previous_version(s3_bucket, tmp_path: Path) -> None:
    """A real exception raised as each chosen file starts uploading (shard, manifest, pointer)."""
    old, new = make_model(tmp_path / "old", seed=5), make_model(tmp_path / "new", seed=6)
    url = f"{s3_bucket.url}/m"
    registry.publish(old, url)
    names = [*manifests.read_manifest(new)["files"], "manifest.json", "latest"]

    class Boom(RuntimeError):
        pass

    for name in names:
        def before(target: str, name: str = name) -> None:
            if target.endswith("/" + name):
                raise Boom(name)

        with pytest.raises(Boom):
            registry.publish(new, url, before=before)
        got = fresh_fetch(url, tmp_path)
        assert same_files(old, got.path), f"fault at {name} changed what readers get"
    registry.publish(new, url)
    assert same_files(new, fresh_fetch(url, tmp_path).path)


PUBLISH = ("import sys; from sqltune.artifacts import registry, storage; storage.CHUNK = 256 << 10; "
           "print('start', flush=True); registry.publish(sys.argv[1], sys.argv[2]); print('done', flush=True)")


def _spawn_publish(model: Path, url: str, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", PUBLISH, str(model), url], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "start"
    return proc


def _new_version_state(url: str, known: set[str]) -> tuple[int, bool]:
    """(files uploaded, manifest present) of the version prefix a running publish is writing."""
    fresh = [v for v in storage.list_dirs(f"{url}/versions") if v not in known]
    if not fresh:
        return 0, False
    fs, path = storage.filesystem(f"{url}/versions/{fresh[0]}")
    names = fs.find(path)
    return len(names), any(n.endswith("/manifest.json") for n in names)


def test_publish_killed_at_random_points_never_serves_a_mix(s3_bucket, tmp_path: Path) -> None:
    """SIGKILL a publishing process N times: right after start, after its first shard, halfway, once
    its manifest is up, and at random times. Every reader gets the old complete version or the new
    complete one; a kill before the manifest landed always leaves the old one served."""
    old = make_model(tmp_path / "old", seed=7)
    new = make_model(tmp_path / "new", seed=8, shards=12, shard_bytes=400_000)
    url = f"{s3_bucket.url}/m"
    registry.publish(old, url)
    env = {**s3_bucket.env, "SQLTUNE_TRANSFER_WORKERS": "2"}  # a few files at a time: every stage lasts long enough to hit
    stages = {"start": lambda n, m: True, "first file": lambda n, m: n >= 1, "half": lambda n, m: n >= 7,
              "manifest": lambda n, m: m}
    rng = random.Random(0)
    plan = [*stages, "random", "first file", "half", "random"]
    seen = []
    for stage in plan:
        known = set(storage.list_dirs(f"{url}/versions"))
        proc = _spawn_publish(new, url, env)
        if stage == "random":
            time.sleep(rng.uniform(0, 1.5))
        else:
            while proc.poll() is None and not stages[stage](*_new_version_state(url, known)):
                time.sleep(0.01)
        proc.kill()
        proc.wait()
        files, has_manifest = _new_version_state(url, known)
        got = fresh_fetch(url, tmp_path)
        if same_files(old, got.path):
            outcome = "old"
        else:
            assert same_files(new, got.path), f"kill at {stage}: reader got neither the old nor the new version"
            outcome = "new"
            registry.publish(old, url)  # race the next kill against a pointer to the old version again
        if not has_manifest:
            assert outcome == "old", f"kill at {stage}: a version without its manifest was served"
        seen.append((stage, files, has_manifest, outcome))
    assert any(0 < files and not m for _, files, m, _ in seen), f"no kill landed mid-upload: {seen}"
    assert any(m for _, _, m, _ in seen), f"no kill landed after the manifest: {seen}"


def test_reader_during_publish_gets_a_complete_version(s3_bucket, tmp_path: Path) -> None:
    old = make_model(tmp_path / "old", seed=9)
    new = make_model(tmp_path / "new", seed=10, shards=8, shard_bytes=400_000)
    url = f"{s3_bucket.url}/m"
    registry.publish(old, url)
    digests = {manifests.read_manifest(old)["digest"], manifests.read_manifest(new)["digest"]}
    seen: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                got = fresh_fetch(url, tmp_path)
                assert got.digest in digests and manifests.verify(got.path)
                seen.append(got.digest)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    reader = threading.Thread(target=read)
    reader.start()
    proc = _spawn_publish(new, url, s3_bucket.env)
    assert proc.wait(timeout=120) == 0
    time.sleep(0.5)
    done.set()
    reader.join()
    assert not errors, errors
    assert seen and seen[-1] == manifests.read_manifest(new)["digest"]


def _checkpoint(root: Path, step: int) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(blob(step, 200_000))
    (folder / "optimizer.pt").write_bytes(blob(-step, 100_000))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    manifests.write_manifest(folder, exclude=(), step=step)
    return folder


def test_checkpoints_resume_on_a_fresh_machine(bucket, tmp_path: Path) -> None:
    """Machine A saves checkpoints through the Trainer callback; machine B (empty disk) restores the newest."""
    output = f"{bucket.url}/models/sql"
    run_a = registry.work_dir(output)
    assert run_a.is_dir() and str(run_a).startswith(str(storage.cache_root()))
    ckpts_a = run_a / "checkpoints"
    callback = checkpoints.callback(output, ckpts_a, save_total_limit=2)
    for step in (5, 10, 15):
        _checkpoint(ckpts_a, step)
        callback.on_save(None, SimpleNamespace(is_world_process_zero=True, global_step=step), None)
    # a save killed mid-upload: files without the manifest
    half = _checkpoint(tmp_path / "half", 20)
    storage.upload([(half / "model.safetensors", f"{output}/checkpoints/checkpoint-20/model.safetensors")])

    assert [(s, ok) for s, _, ok in checkpoints.remote(output)] == [(10, True), (15, True), (20, False)]

    ckpts_b = tmp_path / "machine-b" / "checkpoints"
    assert checkpoints.restore(output, ckpts_b) == 1
    restored = ckpts_b / "checkpoint-15"
    assert manifests.verify(restored)["step"] == 15
    assert same_files(ckpts_a / "checkpoint-15", restored)
    assert json.loads((restored / "trainer_state.json").read_text())["global_step"] == 15
    assert [p.name for p in ckpts_b.iterdir()] == ["checkpoint-15"]
    assert checkpoints.restore(output, ckpts_b) == 0  # already current: nothing downloaded


def test_local_output_needs_no_bucket_hooks(tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert registry.work_dir(str(out)) == out
    assert checkpoints.callback(str(out), out / "checkpoints", 2) is None
    assert checkpoints.restore(str(out), out / "checkpoints") == 0


def test_models_list_shows_versions_latest_and_incomplete(s3_bucket, tmp_path: Path) -> None:
    from sqltune import cli

    url = f"{s3_bucket.url}/m"
    first = registry.publish(make_model(tmp_path / "a", seed=1), url)
    second = registry.publish(make_model(tmp_path / "b", seed=2), url)
    storage.upload([(tmp_path / "a" / "config.json", f"{url}/versions/zz-killed/config.json")])
    from sqltune.artifacts.cli import list_versions

    versions = {v.version: v for v in list_versions(url)}
    assert set(versions) == {first.rsplit("/", 1)[1], second.rsplit("/", 1)[1], "zz-killed"}
    assert versions[second.rsplit("/", 1)[1]].latest and versions[second.rsplit("/", 1)[1]].metrics["train_loss"] == 3.0
    assert not versions["zz-killed"].complete
    proc = subprocess.run([sys.executable, "-m", "sqltune", "models", "list", url], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, **s3_bucket.env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "INCOMPLETE" in proc.stdout and "train_loss=3" in proc.stdout
    assert cli.main(["models", "fetch", url]) == 0


@pytest.mark.slow
def test_finetune_killed_resumes_from_the_bucket_on_a_fresh_machine(s3_bucket, tmp_path: Path) -> None:
    """Train into s3:// with local dir A, SIGKILL after a checkpoint reached the bucket, restart with an
    empty local dir B: training continues from that step, and the published model is fetchable."""
    from sqltune.artifacts import checkpoints

    output = f"{s3_bucket.url}/models/sql"
    args = [sys.executable, "-m", "sqltune", "finetune", "--model", "tiny", "--dataset", "synthetic:300",
            "--max-steps", "20", "--save-steps", "5", "--logging-steps", "1", "--eval-generate-limit", "0",
            "--tiny-layers", "2", "--output", output]
    env_a = {**os.environ, **s3_bucket.env, "SQLTUNE_CACHE": str(tmp_path / "machine-a")}
    log_a = (tmp_path / "a.log").open("w")
    first = subprocess.Popen(args, cwd=ROOT, env=env_a, stdout=log_a, stderr=log_a)
    deadline = time.monotonic() + 300
    saved = []
    while not saved and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        saved = [step for step, _, ok in checkpoints.remote(output) if ok]
    first.kill()
    first.wait()
    assert saved, f"no checkpoint reached the bucket:\n{(tmp_path / 'a.log').read_text()[-3000:]}"
    assert storage.read_bytes(f"{output}/latest") is None  # killed before publishing
    k = max(step for step, _, ok in checkpoints.remote(output) if ok)

    env_b = {**os.environ, **s3_bucket.env, "SQLTUNE_CACHE": str(tmp_path / "machine-b"),
             "CLOUD_RUN_TASK_ATTEMPT": "1"}
    second = subprocess.run(args, cwd=ROOT, env=env_b, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    resumed = log_events(second.stderr, "resuming", prefix=False)
    assert resumed and resumed[0]["checkpoint"].endswith(f"checkpoint-{k}"), second.stderr[-3000:]
    steps = [e["step"] for e in log_events(second.stderr, "train step", prefix=False)]
    assert steps and min(steps) > k and max(steps) == 20, steps
    got = registry.fetch(output)
    assert manifests.read_meta(got.path)["metrics"]["steps"] == 20
    assert [s for s, _, ok in checkpoints.remote(output) if ok][-1] == 20
