"""`sqltune finetune` under torchrun: two CPU processes (gloo), a hard kill, and a restart.

    pytest -m slow tests/test_distributed.py

The command is the real one (`torchrun --nproc-per-node 2 -m sqltune finetune ...`). An observer
(tests/distprobe/sitecustomize.py, loaded through PYTHONPATH) records each rank's batches, so the test
can see that the ranks train on different rows and where each one resumed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sqltune.artifacts import manifests

pytestmark = pytest.mark.slow
pytest_plugins = ["fixtures_buckets"]

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
MAX_STEPS, SAVE_STEPS = 12, 4


def _launch(tmp: Path, run: str, output: str = "", cache: Path | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SQLTUNE_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "distprobe"), str(ROOT)]),
               SQLTUNE_PROBE_DIR=str(tmp / "probe"), SQLTUNE_PROBE_RUN=run, SQLTUNE_NO_PROGRESS="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", SQLTUNE_CACHE=str(cache or tmp / "cache"))
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--standalone", "--log-dir", str(tmp / f"logs-{run}"),
           "--redirects", "3", "-m", "sqltune", "finetune", "--model", "tiny", "--dataset", "synthetic:300",
           "--max-steps", str(MAX_STEPS), "--save-steps", str(SAVE_STEPS), "--train-batch-size", "4",
           "--tiny-layers", "1", "--tiny-vocab-size", "400", "--eval-generate-limit", "0", "--logging-steps", "1",
           "--output", output or str(tmp / "model")]
    with (tmp / f"console-{run}.log").open("w") as console:  # a file, not a pipe nobody reads while it runs
        return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=console, stderr=subprocess.STDOUT, text=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs([p for p in map(_process, tree) if p], timeout=30)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _rank_log(tmp: Path, run: str, rank: int) -> str:
    found = sorted((tmp / f"logs-{run}").glob(f"**/attempt_*/{rank}/stderr.log"))
    assert found, f"torchrun wrote no log for rank {rank}"
    return found[-1].read_text()


def _probe(tmp: Path, rank: int, run: str) -> list[dict]:
    path = tmp / "probe" / f"rank{rank}.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["run"] == run] if path.exists() else []


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Train, SIGKILL every process once a checkpoint is complete, then rerun the same command."""
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed beside this Python")
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "probe").mkdir(exist_ok=True)
    first = _launch(tmp, "first")
    ckpts = tmp / "model" / manifests.CHECKPOINTS
    deadline = time.time() + 150
    while time.time() < deadline and first.poll() is None:
        if (ckpts / f"checkpoint-{SAVE_STEPS}" / "manifest.json").exists():
            break
        time.sleep(0.2)
    else:
        first.kill()
        pytest.fail(f"no complete checkpoint before the kill:\n{(tmp / 'console-first.log').read_text()[-3000:]}")
    # A preempted machine: no SIGTERM, no chance to save. torchrun starts each worker in its own
    # session, so the whole process tree is killed, not only torchrun's group.
    _kill_tree(first)
    complete = [int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*") if manifests.is_complete(p)]
    resumed_at = max(complete)
    assert resumed_at < MAX_STEPS, "the first run finished before it was killed; lower SAVE_STEPS"

    second = _launch(tmp, "second")
    second.wait(timeout=300)
    assert second.returncode == 0, (tmp / "console-second.log").read_text()[-4000:]
    return tmp, resumed_at


def test_both_ranks_resume_from_the_same_checkpoint(killed_and_resumed: tuple[Path, int]) -> None:
    tmp, resumed_at = killed_and_resumed
    for rank in (0, 1):
        steps = [e["step"] for e in _probe(tmp, rank, "second")]
        assert steps, f"rank {rank} did not train after the restart"
        assert steps[0] == resumed_at, f"rank {rank} restarted at step {steps[0]}, not at checkpoint {resumed_at}"
        assert steps[-1] == MAX_STEPS - 1
        # the same place in the data, too: the resumed step trains on the rows it had before the kill
        before = {e["step"]: e["rows"] for e in _probe(tmp, rank, "first")}
        after = {e["step"]: e["rows"] for e in _probe(tmp, rank, "second")}
        if resumed_at in before:
            assert after[resumed_at] == before[resumed_at], f"rank {rank} resumed on different rows"
    assert '"message": "resuming"' in _rank_log(tmp, "second", 0)


def test_ranks_share_one_tokenizer_and_train_on_different_rows(killed_and_resumed: tuple[Path, int]) -> None:
    tmp, _ = killed_and_resumed
    vocabs = {e["vocab"] for rank in (0, 1) for run in ("first", "second") for e in _probe(tmp, rank, run)}
    assert len(vocabs) == 1, "the ranks (or the restart) built different tokenizers: token ids differ"
    by_rank = [{e["step"]: e["rows"] for e in _probe(tmp, rank, "first") + _probe(tmp, rank, "second")}
               for rank in (0, 1)]
    shared_steps = sorted(set(by_rank[0]) & set(by_rank[1]))
    assert len(shared_steps) >= MAX_STEPS - SAVE_STEPS
    overlap = total = 0
    for step in shared_steps:
        a, b = by_rank[0][step], by_rank[1][step]
        overlap += len(set(a) & set(b))
        total += len(a)
    # a shard per rank: the same rows on both ranks would overlap 100%; identical rows in the data a little
    assert overlap <= 0.1 * total, f"{overlap} of {total} rows were trained on by both ranks"


def test_only_rank_zero_logs_and_publishes_one_model(killed_and_resumed: tuple[Path, int]) -> None:
    tmp, _ = killed_and_resumed
    rank0, rank1 = _rank_log(tmp, "second", 0), _rank_log(tmp, "second", 1)
    assert '"message": "train step"' in rank0 and '"world_size": 2' in rank0
    assert '"message": "finetune finished"' in rank0
    info = [line for line in rank1.splitlines() if line.startswith("{") and '"severity": "INFO"' in line]
    assert info == [], f"rank 1 logged: {info[:3]}"
    model = tmp / "model"
    manifests.verify(model)
    meta = manifests.read_meta(model)
    assert meta["metrics"]["steps"] == MAX_STEPS


def test_restart_on_a_fresh_machine_resumes_every_rank_from_the_bucket(s3_bucket, tmp_path: Path) -> None:
    """The retried Cloud Run task or Kubernetes pod: a new machine whose only state is the bucket."""
    if not TORCHRUN.exists():
        pytest.skip("torchrun is not installed beside this Python")
    (tmp_path / "probe").mkdir()
    output = f"{s3_bucket.url}/model"
    first = _launch(tmp_path, "first", output, tmp_path / "cache-first")
    uploaded = f'"checkpoint": "checkpoint-{SAVE_STEPS}"'
    deadline = time.time() + 150
    while time.time() < deadline and first.poll() is None:
        logs = list((tmp_path / "logs-first").glob("**/attempt_*/0/stderr.log"))
        if logs and uploaded in logs[0].read_text():
            break
        time.sleep(0.2)
    else:
        first.kill()
        pytest.fail(f"checkpoint-{SAVE_STEPS} never reached the bucket:\n"
                    f"{(tmp_path / 'console-first.log').read_text()[-3000:]}")
    _kill_tree(first)

    second = _launch(tmp_path, "second", output, tmp_path / "cache-second")  # an empty local disk
    try:
        # generous: on a loaded 2-core machine the fresh start (tiny model, download, rendezvous) can take minutes
        deadline = time.time() + 300
        while time.time() < deadline and second.poll() is None:
            if all(_probe(tmp_path, rank, "second") for rank in (0, 1)):
                break  # each rank's first step is known: no need to wait for the end (or the hang)
            time.sleep(0.2)
        starts = [(_probe(tmp_path, rank, "second") or [{"step": None}])[0]["step"] for rank in (0, 1)]
        exited = second.poll()
    finally:
        if second.poll() is None:
            _kill_tree(second)
    assert starts == [SAVE_STEPS, SAVE_STEPS], (
        f"after the restart the ranks started at steps {starts} (torchrun exit code {exited}):\n"
        + _tails(tmp_path, "second"))


def _tails(tmp: Path, run: str) -> str:
    """The end of a launch's console and of each rank's log, for a failure message."""
    parts = [f"--- console-{run}.log\n" + (tmp / f"console-{run}.log").read_text()[-2000:]]
    for log in sorted((tmp / f"logs-{run}").glob("**/attempt_*/*/stderr.log")):
        parts.append(f"--- {log.relative_to(tmp)}\n" + log.read_text()[-1500:])
    return "\n".join(parts)
