"""`sqltune deploy cloudrun` against a stand-in gcloud: a real executable on PATH (tests/fake_gcloud.py)
that keeps a project's resources in a state file, so the command runs its real subprocess calls.

    pytest tests/test_deploy_cloudrun.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT, REGION = "demo-project", "us-central1"
SA = f"sqltune-runner@{PROJECT}.iam.gserviceaccount.com"
IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/sqltune"
APIS = ("run.googleapis.com", "cloudbuild.googleapis.com", "secretmanager.googleapis.com",
        "artifactregistry.googleapis.com", "iam.googleapis.com")


class Cloud:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        gcloud = self.bin / "gcloud"
        gcloud.write_text(f"#!{sys.executable}\n" + (ROOT / "tests" / "fake_gcloud.py").read_text())
        gcloud.chmod(0o755)
        self.state_path, self.log_path = tmp / "state.json", tmp / "calls.jsonl"

    @property
    def state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    @state.setter
    def state(self, value: dict) -> None:
        self.state_path.write_text(json.dumps(value))

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()] if self.log_path.exists() else []

    def sqltune(self, *args: str, hf_token: str | None = "hf_test_token", path: str | None = None,
                stdin: str = "") -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "GOOGLE_CLOUD_PROJECT")}
        env.update(PATH=path if path is not None else f"{self.bin}{os.pathsep}{os.environ['PATH']}",
                   FAKE_GCLOUD_STATE=str(self.state_path), FAKE_GCLOUD_LOG=str(self.log_path))
        if hf_token is not None:
            env["HF_TOKEN"] = hf_token
        return subprocess.run([sys.executable, "-m", "sqltune", "deploy", "cloudrun", *args,
                               "--out", str(self.tmp / "deploy")],
                              cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=120)


@pytest.fixture
def cloud(tmp_path: Path) -> Cloud:
    return Cloud(tmp_path)


def _mutating(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if not any(v in c for v in ("describe", "get-iam-policy", "list"))]


def _commands(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line and not line.startswith("#")]


def test_dry_run_on_a_fresh_project_lists_the_whole_sequence(cloud: Cloud) -> None:
    done = cloud.sqltune("--project", PROJECT, "--region", REGION, "--dry-run")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    cmds = _commands(out)
    deploy = cloud.tmp / "deploy"
    assert cmds == [
        f"gcloud services enable run.googleapis.com cloudbuild.googleapis.com secretmanager.googleapis.com "
        f"artifactregistry.googleapis.com iam.googleapis.com --project {PROJECT}",
        f"gcloud iam service-accounts create sqltune-runner --display-name 'sqltune runner' --description "
        f"'Runs the sqltune fine-tuning job and model service (managed-by=sqltune)' --project {PROJECT}",
        f'printf %s "$HF_TOKEN" | gcloud secrets create HF_TOKEN --data-file=- --replication-policy=automatic '
        f"--labels=managed-by=sqltune --project {PROJECT}",
        f"gcloud secrets add-iam-policy-binding HF_TOKEN --member serviceAccount:{SA} "
        f"--role roles/secretmanager.secretAccessor --project {PROJECT}",
        f"gcloud storage buckets create gs://{PROJECT}-sqltune-models --location {REGION} "
        f"--uniform-bucket-level-access --project {PROJECT}",
        f"gcloud storage buckets update gs://{PROJECT}-sqltune-models --update-labels=managed-by=sqltune "
        f"--project {PROJECT}",
        f"gcloud storage buckets add-iam-policy-binding gs://{PROJECT}-sqltune-models --member serviceAccount:{SA} "
        f"--role roles/storage.objectAdmin --project {PROJECT}",
        f"gcloud artifacts repositories create sqltune --repository-format=docker --location {REGION} "
        f"--labels=managed-by=sqltune --project {PROJECT}",
        f"gcloud builds submit --config {deploy}/cloudbuild-finetune.yaml --project {PROJECT} .",
        f"gcloud builds submit --config {deploy}/cloudbuild-serve.yaml --project {PROJECT} .",
        f"gcloud run jobs replace {deploy}/job.yaml --region {REGION} --project {PROJECT}",
        f"gcloud run jobs replace {deploy}/eval-job.yaml --region {REGION} --project {PROJECT}",
        f"gcloud run jobs execute sqltune-finetune --wait --region {REGION} --project {PROJECT}",
        f"gcloud run services replace {deploy}/service.yaml --region {REGION} --project {PROJECT}",
    ]
    assert "hf_test_token" not in out + done.stderr
    assert "dry run: nothing was changed" in out
    assert _mutating(cloud.calls()) == [], "a dry run made a call that changes something"
    assert not any(c[0] in ("iam", "secrets", "artifacts", "run") for c in cloud.calls()), (
        "asked an API the project has not enabled")
    assert not cloud.state_path.exists()
    assert (deploy / "job.yaml").is_file() and (deploy / "service.yaml").is_file()


def test_dry_run_where_resources_exist_reuses_them(cloud: Cloud) -> None:
    secret_policy = [{"role": "roles/secretmanager.secretAccessor", "members": [f"serviceAccount:{SA}"]}]
    cloud.state = {
        "services": list(APIS),
        f"sa:{SA}": {}, "secret:HF_TOKEN": {"bindings": secret_policy}, f"bucket:{PROJECT}-sqltune-models": {},
        "repo:sqltune": {}, f"image:{IMAGE}/sqltune-finetune:0.1.0": {},
    }
    done = cloud.sqltune("--project", PROJECT, "--region", REGION, "--dry-run", "--no-execute")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for reused in ("enable the APIs: all enabled", f"service account {SA}: exists, reused", "secret HF_TOKEN (the Hugging Face token): exists, reused",
                   "roles/secretmanager.secretAccessor on the secret for the service account: exists, reused",
                   f"bucket gs://{PROJECT}-sqltune-models: exists, reused",
                   "Artifact Registry repository sqltune: exists, reused",
                   f"image {IMAGE}/sqltune-finetune:0.1.0 (Cloud Build): tag exists, reused"):
        assert reused in out
    cmds = _commands(out)
    # the bucket exists but the binding on it does not: only the binding is added
    assert [c.split(" --")[0] for c in cmds] == [
        f"gcloud storage buckets add-iam-policy-binding gs://{PROJECT}-sqltune-models",
        "gcloud builds submit",
        f"gcloud run jobs replace {cloud.tmp}/deploy/job.yaml",
        f"gcloud run jobs replace {cloud.tmp}/deploy/eval-job.yaml",
        f"gcloud run services replace {cloud.tmp}/deploy/service.yaml",
    ]
    assert "cloudbuild-serve.yaml" in cmds[1]


def test_deploy_creates_then_reuses_and_teardown_removes_only_its_own(cloud: Cloud) -> None:
    cloud.state = {"bucket:shared-bucket": {"labels": {"team": "data"}}}
    args = ("--project", PROJECT, "--region", REGION, "--deploy-bucket", "shared-bucket")
    first = cloud.sqltune(*args)
    assert first.returncode == 0, first.stderr
    state = cloud.state
    for key in (f"sa:{SA}", "secret:HF_TOKEN", "repo:sqltune", f"image:{IMAGE}/sqltune-finetune:0.1.0",
                f"image:{IMAGE}/sqltune-serve:0.1.0", "job:sqltune-finetune", "job:sqltune-finetune-eval",
                "service:sqltune-serve"):
        assert key in state, key
    assert state["executions"] == ["sqltune-finetune"]
    assert state["bucket:shared-bucket"]["labels"] == {"team": "data"}, "an existing bucket was relabelled"
    assert {"role": "roles/storage.objectAdmin", "members": [f"serviceAccount:{SA}"]} in state["bucket:shared-bucket"]["bindings"]
    assert "[2/13] service account" in first.stderr and "running" in first.stderr
    assert "retrying in 2 s: IAM takes a few seconds" in first.stderr  # the binding right after the account

    calls_before = len(cloud.calls())
    second = cloud.sqltune(*args)
    assert second.returncode == 0, second.stderr
    rerun = [c[:3] for c in _mutating(cloud.calls()[calls_before:])]
    # a second run creates nothing: it re-applies the manifests and runs the job again
    assert rerun == [["run", "jobs", "replace"], ["run", "jobs", "replace"], ["run", "jobs", "execute"],
                     ["run", "services", "replace"]]
    assert "done: 4 steps ran, 9 reused" in second.stdout

    refused = cloud.sqltune(*args, "--teardown")
    assert refused.returncode == 2 and "pass --yes" in refused.stderr
    assert "service:sqltune-serve" in cloud.state

    plan = cloud.sqltune(*args, "--teardown", "--dry-run")
    assert "bucket gs://shared-bucket and the models in it: not created by sqltune, kept" in plan.stdout
    gone = cloud.sqltune(*args, "--teardown", "--yes")
    assert gone.returncode == 0, gone.stderr
    assert sorted(k for k in cloud.state if k.partition(":")[1]) == ["bucket:shared-bucket"]


def test_missing_project_region_or_gcloud_fail_before_any_call(cloud: Cloud) -> None:
    no_project = cloud.sqltune("--region", REGION, "--dry-run")
    assert no_project.returncode == 2 and "no Google Cloud project given" in no_project.stderr
    assert "--project" in no_project.stderr
    no_region = cloud.sqltune("--project", PROJECT)
    assert no_region.returncode == 2 and "no region given" in no_region.stderr
    assert cloud.calls() == []
    empty = cloud.tmp / "empty"
    empty.mkdir()
    no_gcloud = cloud.sqltune("--project", PROJECT, "--region", REGION, path=str(empty))
    assert no_gcloud.returncode == 2 and "gcloud is not installed" in no_gcloud.stderr
    assert "https://cloud.google.com/sdk/docs/install" in no_gcloud.stderr


def test_missing_token_stops_before_anything_changes(cloud: Cloud) -> None:
    done = cloud.sqltune("--project", PROJECT, "--region", REGION, hf_token=None)
    assert done.returncode == 2 and "HF_TOKEN is not set" in done.stderr
    assert _mutating(cloud.calls()) == [] and not cloud.state_path.exists()


def test_logged_out_gcloud_is_an_error_not_an_empty_project(cloud: Cloud) -> None:
    cloud.state = {"logged_out": True}
    done = cloud.sqltune("--project", PROJECT, "--region", REGION, "--dry-run")
    assert done.returncode == 2 and "active account" in done.stderr and "gcloud auth list" in done.stderr
    assert len(cloud.calls()) == 1


def test_unreadable_describe_output_is_an_error_not_an_existing_resource(cloud: Cloud) -> None:
    cloud.state = {"garbled": True}
    done = cloud.sqltune("--project", PROJECT, "--region", REGION, "--dry-run")
    assert done.returncode == 2 and "not JSON" in done.stderr and "gcloud info" in done.stderr
    assert _mutating(cloud.calls()) == []


def test_cloud_run_limits_are_checked_before_gcloud(cloud: Cloud) -> None:
    done = cloud.sqltune("--project", PROJECT, "--region", REGION, "--deploy-cpu", "2", "--dry-run")
    assert done.returncode == 2 and "nvidia-l4 on Cloud Run needs at least 4 vCPU" in done.stderr
    assert cloud.calls() == []
