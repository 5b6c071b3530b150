"""Attempts that resume until done: a CPU run of the tiny model with an attempt budget of tens of
seconds, rerun by a loop (as Cloud Run reruns a task) while it exits 75, ends with the weights of an
uninterrupted run and publishes once; the same into a real S3 server with an empty disk per attempt.

    pytest tests/test_train_attempts.py
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, sqltune_cmd
from conftest import log_events as _events

from sqltune.errors import AttemptEnded
from sqltune.finetune.budget import must_stop, project, reserve_s

pytest_plugins = ["fixtures_buckets"]

MORE_TO_DO = AttemptEnded.exit_code
RETRIES = 9  # Cloud Run's most: a loaded machine may need more attempts than an idle one
# 120 linear-schedule steps of the 2-layer tiny model: about 15 s of training on one core, so an attempt
# budget of the setup plus ~8 s needs two or three attempts
ARGS = ["--model", "tiny", "--tiny-layers", "2", "--dataset", "synthetic:400", "--train-batch-size", "8",
        "--max-seq-length", "256", "--eval-generate-limit", "0", "--logging-steps", "1", "--learning-rate", "0.003",
        "--max-steps", "120", "--save-steps", "1000", "--save-total-limit", "3", "--lr-scheduler-type", "linear"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(sqltune_cmd("finetune", *args), cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, float]:
    """The uninterrupted run, and the setup and training times it logged (to size the attempts' budget on
    this machine: an idle one trains the 120 steps in a few seconds, a loaded one in tens)."""
    out = tmp_path_factory.mktemp("straight") / "model"
    proc = _run([*ARGS, "--output", str(out)], {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    [start] = _events(proc.stderr, "attempt 1 starting")
    [finished] = _events(proc.stderr, "finetune finished")
    return out, float(start["setup_s"]), float(finished["train_runtime_s"])


def attempt_loop(args: list[str], budget: int, env_for: object) -> tuple[list[subprocess.CompletedProcess[str]], float]:
    """Rerun the same command, CLOUD_RUN_TASK_ATTEMPT incremented, while it exits 75 (Cloud Run's retries)."""
    runs = []
    started = time.monotonic()
    for attempt in range(RETRIES + 1):
        env = {"CLOUD_RUN_TASK_ATTEMPT": str(attempt), "SQLTUNE_ATTEMPT_TIMEOUT": str(budget),
               "SQLTUNE_JOB_MAX_RETRIES": str(RETRIES), **env_for(attempt)}  # type: ignore[operator]
        runs.append(_run(args, env))
        if runs[-1].returncode != MORE_TO_DO:
            break
    return runs, time.monotonic() - started


def _budget(setup_s: float, training_s: float = 8) -> int:
    # this machine's setup, then some seconds for steps, checkpoints and the reserve
    return math.ceil(setup_s * 1.25 + training_s)


def _cutting_budget(setup_s: float, train_s: float) -> int:
    """A budget whose training share is under half the straight run's training: two attempts at least."""
    return _budget(setup_s, training_s=min(8.0, max(2.0, 0.45 * train_s)))


def _check_attempts(runs: list[subprocess.CompletedProcess[str]], budget: int) -> list[dict]:
    codes = [r.returncode for r in runs]
    assert codes[-1] == 0, runs[-1].stderr[-3000:]
    assert codes[:-1] == [MORE_TO_DO] * (len(runs) - 1) and len(runs) >= 2, codes  # the budget did cut it
    starts = [_events(r.stderr, f"attempt {i + 1} of {RETRIES + 1} starting") for i, r in enumerate(runs)]
    assert all(len(s) == 1 for s in starts), [r.stderr[-1500:] for r in runs]
    previous_end = 0
    for i, (run, [start]) in enumerate(zip(runs, starts, strict=True)):
        assert start["resumed_step"] == previous_end and start["planned_steps"] == 120
        assert start["attempt_budget_s"] == budget and start["attempts_available"] == RETRIES + 1
        if run.returncode == MORE_TO_DO:
            [ended] = _events(run.stderr, "attempt budget spent") or _events(run.stderr, "planned steps done")
            assert ended["attempt"] == i + 1 and ended["exit_code"] == MORE_TO_DO
            assert ended["steps_this_attempt"] + ended["remaining"] + start["resumed_step"] == 120
            assert "sqltune: more to do:" in run.stderr and "Traceback" not in run.stderr
            previous_end = ended["step"]
            assert ended["elapsed_s"] <= budget, f"attempt {i + 1} outlasted its budget"
    finished = [e for r in runs for e in _events(r.stderr, "finetune finished")]
    assert len(finished) == 1 and finished[0]["steps"] == 120  # published once, by the last attempt
    return starts


@pytest.mark.slow
def test_attempts_resume_until_done_with_the_weights_of_one_run(straight, tmp_path: Path) -> None:
    reference, setup_s, train_s = straight
    budget = _cutting_budget(setup_s, train_s)
    out = tmp_path / "attempts"
    runs, wall = attempt_loop([*ARGS, "--output", str(out)], budget, lambda attempt: {})
    _check_attempts(runs, budget)
    projections = [e for r in runs for e in _events(r.stderr, "attempt projection")]
    assert projections and all(p["attempts_available"] == RETRIES + 1 and p["fits"] for p in projections)
    want, got = _weights(reference), _weights(out)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    ends = [0] + [e["step"] for r in runs for e in _events(r.stderr, "attempt budget spent")] + [120]
    print(f"\nattempts: {len(runs)}, budget {budget} s each, steps per attempt "
          f"{[b - a for a, b in zip(ends, ends[1:], strict=False)]}, wall {wall:.0f} s")


@pytest.mark.slow
def test_attempts_resume_from_the_bucket_on_empty_disks(straight, s3_bucket, tmp_path: Path) -> None:
    from sqltune.artifacts import registry
    from sqltune.artifacts.cli import list_versions

    reference, setup_s, train_s = straight
    budget = _cutting_budget(setup_s, train_s) + 2  # restoring from the bucket adds to each attempt's setup
    output = f"{s3_bucket.url}/models/sql"
    runs, _ = attempt_loop([*ARGS, "--output", output], budget,
                           lambda attempt: {**s3_bucket.env, "SQLTUNE_CACHE": str(tmp_path / f"machine-{attempt}")})
    _check_attempts(runs, budget)
    for run in runs[1:]:
        assert _events(run.stderr, "checkpoint restored"), run.stderr[-2000:]  # nothing local: from the bucket
    assert len(list_versions(output)) == 1
    got = registry.fetch(output, cache=tmp_path / "reader")
    want = _weights(reference)
    for name, tensor in want.items():
        torch.testing.assert_close(_weights(got.path)[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_plan_that_cannot_fit_is_said_early(straight, tmp_path: Path) -> None:
    """No retries and a budget far below the run: the first attempt's projection says so, with the fix,
    long before its time is up; it still saves its progress and exits 75."""
    _, setup_s, _ = straight
    budget = _budget(setup_s, training_s=3)
    proc = _run([*ARGS, "--max-steps", "2000", "--output", str(tmp_path / "m")],
                {"SQLTUNE_ATTEMPT_TIMEOUT": str(budget), "SQLTUNE_JOB_MAX_RETRIES": "0"})
    assert proc.returncode == MORE_TO_DO, proc.stderr[-3000:]
    [warning] = _events(proc.stderr, "the plan cannot fit")
    assert warning["severity"] == "WARNING" and warning["attempts_available"] == 1
    assert warning["attempts_needed"] > 1 and "job_max_retries" in warning["message"]
    [start] = _events(proc.stderr, "attempt 1 of 1 starting")
    assert warning["step"] <= 10  # said within the first steps, not at the end
    assert start["planned_steps"] == 2000
    assert list((tmp_path / "m" / "checkpoints").glob("checkpoint-*/manifest.json"))
    assert not (tmp_path / "m" / "manifest.json").exists()  # nothing published


# --- the arithmetic (no training) ---------------------------------------------------------------

def test_an_attempt_stops_when_one_more_step_and_its_checkpoint_would_not_fit() -> None:
    budget = 3600.0
    room = budget - reserve_s(budget)
    assert not must_stop(room - 31, step_s=0.5, save_s=30, budget_s=budget)
    assert must_stop(room - 30, step_s=0.5, save_s=30, budget_s=budget)
    assert reserve_s(20) == 2.0 and reserve_s(3600) == 72.0


def test_projection_counts_the_attempts_a_run_needs() -> None:
    common = {"now_s": 300.0, "step": 0, "step_s": 0.5, "save_s": 30.0, "setup_s": 300.0, "export_s": 600.0,
              "budget_s": 3600.0, "save_steps": 200, "attempt": 0, "attempts": 2}
    short = project(max_steps=1000, **common)
    assert (short.steps_this_attempt, short.remaining_after, short.attempts_needed) == (1000, 0, 1) and short.fits
    long = project(max_steps=12000, **common)
    assert long.attempts_needed == 3 and not long.fits  # 4,920 steps per attempt after setup and saves
    # every step fits this attempt, but merge and publish do not: a fresh attempt publishes
    edge = project(max_steps=4500, **common)
    assert edge.remaining_after == 0 and edge.attempts_needed == 2


def test_an_attempt_budget_that_could_never_resume_is_refused() -> None:
    from sqltune.config import Config
    from sqltune.errors import ConfigError
    from sqltune.finetune import attempts

    with pytest.raises(ConfigError, match="--resume never") as e:
        attempts.from_config(Config(attempt_timeout=3600, resume="never"), environ={})
    assert "--resume auto" in (e.value.hint or "")
    budget = attempts.from_config(Config(attempt_timeout=3600, job_max_retries=3), environ={"CLOUD_RUN_TASK_ATTEMPT": "2"})
    assert (budget.attempt, budget.attempts, budget.budget_s) == (2, 4, 3600.0)


def test_the_more_to_do_exit_code_is_distinct_from_failures() -> None:
    from sqltune.errors import ConfigError, SqltuneError, TrainingInterrupted

    codes = {SqltuneError.exit_code, ConfigError.exit_code, TrainingInterrupted.exit_code, 1, 130}
    assert MORE_TO_DO == 75 and MORE_TO_DO not in codes
    for doc in ("README.md", "docs/deploy.md"):
        assert "exits 75" in (ROOT / doc).read_text(), f"{doc} does not document the exit code"
