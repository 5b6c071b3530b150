"""The fine-tuning plan a deployment states before it spends money, and the attempt settings the
rendered Jobs carry (retries on, the attempt budget in the container).

    pytest tests/test_deploy_plan.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sqltune import config
from sqltune.config import Config
from sqltune.deploy import plan, render
from sqltune.errors import DeployError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def _shipped(name: str, **flags: object) -> Config:
    cfg, _ = config.resolve(str(ROOT / "configs" / f"{name}.yaml"), {},
                            {"gcp_project": "demo-project", "gcp_region": "us-central1", **flags})
    return cfg


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_fit_with_their_documented_settings(name: str) -> None:
    p = plan.plan(_shipped(name))
    assert p.steps and p.step_s and p.fits and p.problem() is None, p.lines()
    assert p.attempts == 4 and p.budget_s == 3600  # retries on by default: the tutorial's 3


def test_gemma_plan_states_steps_step_time_and_its_source() -> None:
    p = plan.plan(_shipped("gemma-2b-qlora"))
    text = "\n".join(p.lines())
    # 78,577 rows, 98% for training, 8 x 2 rows per step, one epoch
    assert p.steps == 4813 and "78,577 rows of b-mc2/sql-create-context" in text
    assert p.step_s == pytest.approx(16 * plan.TOKENS_PER_ROW / 2000)
    assert "2,000 tokens/s" in text and "2-3k tokens/s" in text  # the assumption and where it comes from
    assert "4 x 3600 s" in text
    # the training alone is under an hour, but setup and publish push it into a second attempt
    assert 2400 < p.steps * p.step_s < 3600 and p.attempts_needed == 2


def test_a_plan_that_cannot_fit_warns_with_the_fixes() -> None:
    p = plan.plan(_shipped("gemma-2b-qlora", job_max_retries=0))
    assert not p.fits
    what, fix = p.problem()  # type: ignore[misc]
    assert "cannot fit" in what and "available: 1" in what
    for remedy in ("--job-max-retries", "--task-timeout", "--max-steps", "--dataset-limit", "--plan-tokens-per-second"):
        assert remedy in fix
    # the --max-steps it proposes does fit, and a little more would not
    most = p.max_steps_that_fit
    assert most and plan.plan(_shipped("gemma-2b-qlora", job_max_retries=0, max_steps=most)).fits
    assert not plan.plan(_shipped("gemma-2b-qlora", job_max_retries=0, max_steps=most + 50)).fits


def test_a_measured_throughput_replaces_the_assumed_one() -> None:
    slow = plan.plan(_shipped("gemma-2b-qlora", plan_tokens_per_second=300))
    assert slow.step_s == pytest.approx(16 * plan.TOKENS_PER_ROW / 300) and not slow.fits
    assert "plan_tokens_per_second" in "\n".join(slow.lines())


def test_what_the_plan_cannot_know_it_says() -> None:
    unknown = plan.plan(Config(dataset="someone/else", gcp_project="p", gcp_region="us-central1"))
    assert unknown.steps is None and unknown.fits and "set max_steps or dataset_limit" in unknown.lines()[0]
    cpu = plan.plan(Config(gpu_count=0))
    assert cpu.step_s is None and "plan_tokens_per_second" in cpu.lines()[1]
    limited = plan.plan(Config(dataset="b-mc2/sql-create-context", dataset_limit=1000))
    assert limited.steps == 119  # ceil(950 / 8)


def test_cloud_run_retries_are_capped_at_ten() -> None:
    with pytest.raises(DeployError, match="at most 10") as e:
        render.render(Config(job_max_retries=11), "cloudrun")
    assert "--job-max-retries 10" in (e.value.hint or "")
    render.render(Config(job_max_retries=11), "kubernetes")  # backoffLimit has no such cap


def _job_container(doc: dict) -> dict:
    spec = doc["spec"]["template"]["spec"]
    return (spec["template"]["spec"] if "template" in spec else spec)["containers"][0]


@pytest.mark.parametrize("target", ["cloudrun", "kubernetes"])
def test_jobs_retry_and_pass_the_attempt_budget(target: str) -> None:
    cfg = _shipped("gemma-2b-qlora")
    job = yaml.safe_load(render.render(cfg, target)["job.yaml"])
    env = {e["name"]: e.get("value") for e in _job_container(job)["env"]}
    assert env["SQLTUNE_ATTEMPT_TIMEOUT"] == "3600" and env["SQLTUNE_JOB_MAX_RETRIES"] == "3"
    if target == "cloudrun":
        task = job["spec"]["template"]["spec"]["template"]["spec"]
        assert (task["maxRetries"], task["timeoutSeconds"]) == (3, 3600)
    else:
        # per pod, as Cloud Run's timeout is per attempt; no Job-wide deadline cuts across the attempts
        assert job["spec"]["backoffLimit"] == 3 and "activeDeadlineSeconds" not in job["spec"]
        assert job["spec"]["template"]["spec"]["activeDeadlineSeconds"] == 3600
    back, _ = config.resolve(None, {k: v for k, v in env.items() if v is not None}, {})
    assert (back.attempt_timeout, back.job_max_retries) == (3600, 3)  # what the job reads is what was rendered


def test_render_prints_the_plan_and_warns_when_it_cannot_fit(tmp_path: Path) -> None:
    def render_cmd(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sqltune", "deploy", "render", "--target", "cloudrun", "--config",
                               "configs/gemma-2b-qlora.yaml", "--out", str(tmp_path / "out"), *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    ok = render_cmd()
    assert ok.returncode == 0 and "plan: 4,813 steps" in ok.stderr and "fits: 2 of 4 attempts" in ok.stderr
    assert "warning" not in ok.stderr
    tight = render_cmd("--job-max-retries", "0")
    assert tight.returncode == 0 and (tmp_path / "out" / "job.yaml").is_file()  # rendering still works
    assert "warning: the fine-tuning plan cannot fit" in tight.stderr and "fix: raise --job-max-retries" in tight.stderr
    assert "never resumed" in tight.stderr  # no retries: maintenance would lose the run


def test_deploy_cloudrun_refuses_a_plan_that_cannot_fit_before_calling_gcloud(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no gcloud at all: the refusal comes first
    proc = subprocess.run([sys.executable, "-m", "sqltune", "deploy", "cloudrun", "--config", "configs/gemma-2b-qlora.yaml",
                           "--project", "p", "--region", "us-central1", "--job-max-retries", "0",
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 2 and "cannot fit" in proc.stderr and "fix:" in proc.stderr, proc.stderr
    assert "gcloud is not installed" not in proc.stderr
