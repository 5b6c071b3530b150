"""The tutorial's gcloud sequence as a plan: service account, secret, bucket, IAM bindings,
Artifact Registry repository, Cloud Build images, job replace + execute, service replace; and the
clean-up in reverse. Planning only runs read-only `describe` calls, so `--dry-run` shows exactly what
would change; every step that finds its resource already there reuses it.

    sqltune deploy cloudrun --config configs/gemma-2b-qlora.yaml --project P --region us-central1 --dry-run
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqltune.config import Config
from sqltune.deploy.common import Names
from sqltune.errors import DeployError

# Resources sqltune creates carry this label, so teardown removes those and keeps the ones it found.
LABEL = "managed-by=sqltune"
SA_DESCRIPTION = "Runs the sqltune fine-tuning job and model service (managed-by=sqltune)"
APIS = ("run.googleapis.com", "cloudbuild.googleapis.com", "secretmanager.googleapis.com",
        "artifactregistry.googleapis.com", "iam.googleapis.com")
_NOT_FOUND = ("not_found", "not found", "does not exist", "cannot find", "404")
# The API behind each gcloud command group: behind a disabled API nothing can exist yet, and asking
# fails (SERVICE_DISABLED), so a fresh project is planned without those calls.
_API = {"iam": "iam.googleapis.com", "secrets": "secretmanager.googleapis.com", "run": "run.googleapis.com",
        "artifacts": "artifactregistry.googleapis.com", "builds": "cloudbuild.googleapis.com"}


@dataclass
class Step:
    title: str
    commands: list[list[str]]
    skip: bool = False  # a describe call found it done (or, on teardown, gone)
    stdin_env: str = ""  # the command reads this variable's value on stdin (the secret's payload)
    note: str = ""
    retries: int = 0  # IAM needs seconds to see a service account created a moment ago


@dataclass
class Gcloud:
    """Runs gcloud. `describe` calls decide; failures other than "not found" stop the plan, since an
    expired login must not read as "no bucket yet"."""

    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    executable: str = ""
    _enabled: dict[str, set[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        path = self.environ.get("PATH", os.defpath)
        self.executable = self.executable or shutil.which("gcloud", path=path) or ""
        if not self.executable:
            raise DeployError("gcloud is not installed or not on PATH",
                              "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), "
                              "run `gcloud auth login`, then retry")

    def _call(self, args: list[str], stdin: str | None = None, capture: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([self.executable, *args[1:]], input=stdin, text=True, env=dict(self.environ),
                              capture_output=capture, check=False)

    def _read(self, args: list[str]) -> Any:
        """JSON from a read-only call, or None when gcloud says the resource does not exist."""
        done = self._call([*args, "--format=json"])
        if done.returncode == 0:
            try:
                return json.loads(done.stdout)
            except json.JSONDecodeError:
                # never guess "exists" (a skipped step) or "missing" (a duplicate create) from output we cannot read
                raise DeployError(f"`{shlex.join(args)}` printed output that is not JSON: {done.stdout.strip()[:200]!r}",
                                  "check the gcloud version and configuration (`gcloud info`), then retry") from None
        if any(word in done.stderr.lower() for word in _NOT_FOUND):
            return None
        raise DeployError(f"`{shlex.join(args)}` failed: {done.stderr.strip()[-500:]}",
                          "check `gcloud auth list` and that the project exists and you may read it")

    def enabled_apis(self, project: str) -> set[str]:
        if project not in self._enabled:
            found = self._read(["gcloud", "services", "list", "--enabled", "--project", project]) or []
            self._enabled[project] = {(s.get("config") or {}).get("name") or s.get("name", "").rsplit("/", 1)[-1]
                                      for s in found}
        return self._enabled[project]

    def describe(self, args: list[str]) -> dict[str, Any] | None:
        """The resource as JSON, or None when it does not exist (or cannot, its API being off)."""
        api = _API.get(args[1])
        if api and api not in self.enabled_apis(args[args.index("--project") + 1]):
            return None
        found = self._read(args)
        return None if found is None else found or {}

    def run(self, args: list[str], stdin: str | None = None) -> None:
        print(f"+ {shlex.join(args)}", file=sys.stderr, flush=True)
        done = self._call(args, stdin=stdin, capture=False)
        if done.returncode != 0:
            raise DeployError(f"`{shlex.join(args)}` failed with exit code {done.returncode}",
                              "read gcloud's message above; the steps before it are done and are reused on retry")


def require(cfg: Config) -> None:
    """Project and region come before anything else runs."""
    if not cfg.gcp_project:
        raise DeployError("no Google Cloud project given", "pass --project PROJECT_ID (or set GOOGLE_CLOUD_PROJECT)")
    if not cfg.gcp_region:
        raise DeployError("no region given", "pass --region, e.g. --region us-central1 (which has L4 GPUs)")


def _has_binding(policy: dict[str, Any] | None, role: str, member: str) -> bool:
    return any(b.get("role") == role and member in b.get("members", []) for b in (policy or {}).get("bindings", []))


def plan(cfg: Config, n: Names, out: Path, gcloud: Gcloud, *, rebuild: bool = False,
         execute: bool = True) -> list[Step]:
    """Every step of the deployment, each marked `skip` when a describe call found it done."""
    p, r = ["--project", n.project], ["--region", n.region]
    member = f"serviceAccount:{n.service_account}"
    off = [api for api in APIS if api not in gcloud.enabled_apis(n.project)]
    steps = [Step("enable the APIs", [["gcloud", "services", "enable", *(off or APIS), *p]], skip=not off,
                  note="all enabled")]

    sa = gcloud.describe(["gcloud", "iam", "service-accounts", "describe", n.service_account, *p])
    steps.append(Step(f"service account {n.service_account}", [[
        "gcloud", "iam", "service-accounts", "create", cfg.deploy_service_account,
        "--display-name", "sqltune runner", "--description", SA_DESCRIPTION, *p]], skip=sa is not None))

    secret = gcloud.describe(["gcloud", "secrets", "describe", cfg.hf_token_secret, *p])
    steps.append(Step(f"secret {cfg.hf_token_secret} (the Hugging Face token)", [[
        "gcloud", "secrets", "create", cfg.hf_token_secret, "--data-file=-", "--replication-policy=automatic",
        f"--labels={LABEL}", *p]], skip=secret is not None, stdin_env="HF_TOKEN"))
    policy = gcloud.describe(["gcloud", "secrets", "get-iam-policy", cfg.hf_token_secret, *p]) if secret else None
    role = "roles/secretmanager.secretAccessor"
    steps.append(Step(f"{role} on the secret for the service account", [[
        "gcloud", "secrets", "add-iam-policy-binding", cfg.hf_token_secret, "--member", member, "--role", role, *p]],
        skip=_has_binding(policy, role, member), retries=3))

    bucket = gcloud.describe(["gcloud", "storage", "buckets", "describe", f"gs://{n.bucket}", *p])
    steps.append(Step(f"bucket gs://{n.bucket}", [
        ["gcloud", "storage", "buckets", "create", f"gs://{n.bucket}", "--location", n.region,
         "--uniform-bucket-level-access", *p],
        ["gcloud", "storage", "buckets", "update", f"gs://{n.bucket}", f"--update-labels={LABEL}", *p]],
        skip=bucket is not None))
    policy = gcloud.describe(["gcloud", "storage", "buckets", "get-iam-policy", f"gs://{n.bucket}", *p]) if bucket else None
    role = "roles/storage.objectAdmin"
    steps.append(Step(f"{role} on the bucket for the service account", [[
        "gcloud", "storage", "buckets", "add-iam-policy-binding", f"gs://{n.bucket}", "--member", member,
        "--role", role, *p]], skip=_has_binding(policy, role, member), retries=3))

    if not cfg.image_registry:
        repo = gcloud.describe(["gcloud", "artifacts", "repositories", "describe", cfg.image_repo,
                                "--location", n.region, *p])
        steps.append(Step(f"Artifact Registry repository {cfg.image_repo}", [[
            "gcloud", "artifacts", "repositories", "create", cfg.image_repo, "--repository-format=docker",
            "--location", n.region, f"--labels={LABEL}", *p]], skip=repo is not None))
    for kind, image in (("finetune", n.finetune_image), ("serve", n.serve_image)):
        found = gcloud.describe(["gcloud", "artifacts", "docker", "images", "describe", image, *p])
        steps.append(Step(f"image {image} (Cloud Build)", [[
            "gcloud", "builds", "submit", "--config", str(out / f"cloudbuild-{kind}.yaml"), *p, "."]],
            skip=found is not None and not rebuild, note="tag exists, reused (--rebuild to build again)"))

    steps.append(Step(f"job {n.job}", [["gcloud", "run", "jobs", "replace", str(out / "job.yaml"), *r, *p]]))
    steps.append(Step(f"job {n.eval_job} (sharded evaluation, run on demand)",
                      [["gcloud", "run", "jobs", "replace", str(out / "eval-job.yaml"), *r, *p]]))
    if execute:
        steps.append(Step(f"run job {n.job} and wait for the model in gs://{n.bucket}",
                          [["gcloud", "run", "jobs", "execute", n.job, "--wait", *r, *p]]))
    steps.append(Step(f"service {n.service}",
                      [["gcloud", "run", "services", "replace", str(out / "service.yaml"), *r, *p]]))
    return steps


def _ours(found: dict[str, Any] | None, description: bool = False) -> bool:
    if found is None:
        return False
    if description:
        return "managed-by=sqltune" in found.get("description", "")
    key, value = LABEL.split("=")
    return (found.get("labels") or {}).get(key) == value


def teardown_plan(cfg: Config, n: Names, gcloud: Gcloud) -> list[Step]:
    """Delete, newest first, what `plan` created; resources sqltune did not create are kept."""
    p, r, q = ["--project", n.project], ["--region", n.region], ["--quiet"]
    steps = []
    for kind, name in (("services", n.service), ("jobs", n.eval_job), ("jobs", n.job)):
        found = gcloud.describe(["gcloud", "run", kind, "describe", name, *r, *p])
        steps.append(Step(f"{kind[:-1]} {name}", [["gcloud", "run", kind, "delete", name, *r, *p, *q]],
                          skip=found is None, note="" if found else "absent"))
    checks = []
    if not cfg.image_registry:
        checks.append((f"Artifact Registry repository {cfg.image_repo} and its images",
                       ["gcloud", "artifacts", "repositories", "describe", cfg.image_repo, "--location", n.region, *p],
                       ["gcloud", "artifacts", "repositories", "delete", cfg.image_repo, "--location", n.region, *p, *q],
                       False))
    checks += [
        (f"bucket gs://{n.bucket} and the models in it",
         ["gcloud", "storage", "buckets", "describe", f"gs://{n.bucket}", *p],
         ["gcloud", "storage", "rm", "--recursive", f"gs://{n.bucket}", *p], False),
        (f"secret {cfg.hf_token_secret}", ["gcloud", "secrets", "describe", cfg.hf_token_secret, *p],
         ["gcloud", "secrets", "delete", cfg.hf_token_secret, *p, *q], False),
        (f"service account {n.service_account}",
         ["gcloud", "iam", "service-accounts", "describe", n.service_account, *p],
         ["gcloud", "iam", "service-accounts", "delete", n.service_account, *p, *q], True),
    ]
    for title, describe, delete, by_description in checks:
        found = gcloud.describe(describe)
        keep = found is not None and not _ours(found, by_description)
        steps.append(Step(title, [delete], skip=found is None or keep,
                          note="absent" if found is None else "not created by sqltune, kept" if keep else ""))
    return steps


def format_plan(steps: list[Step], header: str, *, teardown: bool = False) -> str:
    lines = [f"# {header}"]
    for i, step in enumerate(steps, 1):
        if step.skip:
            why = step.note or "exists, reused"
            lines.append(f"# [{i}/{len(steps)}] {step.title}: {why}")
            continue
        lines.append(f"# [{i}/{len(steps)}] {step.title}: {'delete' if teardown else 'run'}")
        for cmd in step.commands:
            text = shlex.join(cmd)
            # The token is read from the environment at run time; it never appears in output.
            lines.append(f'printf %s "${step.stdin_env}" | {text}' if step.stdin_env else text)
    return "\n".join(lines)


def apply(steps: list[Step], gcloud: Gcloud) -> int:
    """Run the steps that are not done; return how many ran."""
    todo = [s for s in steps if not s.skip]
    for step in todo:
        if step.stdin_env and not gcloud.environ.get(step.stdin_env):
            raise DeployError(f"{step.stdin_env} is not set, and {step.title} has to be created from it",
                              f"export {step.stdin_env}=<a Hugging Face read token> and retry")
    for i, step in enumerate(steps, 1):
        state = (step.note or "exists, reused") if step.skip else "running"
        print(f"[{i}/{len(steps)}] {step.title}: {state}", file=sys.stderr, flush=True)
        if step.skip:
            continue
        for cmd in step.commands:
            for attempt in range(step.retries + 1):
                try:
                    gcloud.run(cmd, stdin=gcloud.environ.get(step.stdin_env) if step.stdin_env else None)
                    break
                except DeployError:
                    if attempt == step.retries:
                        raise
                    wait = 2 ** (attempt + 1)
                    print(f"retrying in {wait} s: IAM takes a few seconds to see a new service account",
                          file=sys.stderr, flush=True)
                    time.sleep(wait)
    return len(todo)
