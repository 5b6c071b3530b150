"""Rendered manifests: byte-for-byte against golden files, and structurally valid.

    pytest tests/test_deploy_render.py                              # compare
    SQLTUNE_UPDATE_GOLDEN=1 pytest tests/test_deploy_render.py      # rewrite tests/golden/ after a deliberate change

Kubernetes objects are validated strictly against the Kubernetes OpenAPI schemas (kubernetes-validate);
Cloud Run's envelope against the fields of the Cloud Run YAML reference, and its pod part, which the
Cloud Run v1 API shares with Kubernetes, against the Kubernetes Pod schema.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from sqltune import config
from sqltune.config import Config
from sqltune.deploy import common, render
from sqltune.errors import DeployError

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
K8S_VERSION = "1.33"  # a version kubernetes-validate ships schemas for; the objects use only stable APIs
UPDATE = os.environ.get("SQLTUNE_UPDATE_GOLDEN") == "1"

CASES: dict[str, tuple[str, Config]] = {
    "cloudrun-default": ("cloudrun", Config(gcp_project="demo-project", gcp_region="us-central1")),
    "cloudrun-gcsfuse-vpc": ("cloudrun", Config(
        gcp_project="demo-project", gcp_region="europe-west1", model_name="google/gemma-2b",
        new_model="gemma-2b-sql", lora_r=16, lora_alpha=32, dataset_limit=1000, bucket_mode="gcsfuse",
        vpc_egress="all-traffic", job_task_count=4, job_parallelism=2, min_instances=1, max_instances=3,
        image_registry="europe-docker.pkg.dev/shared/images", image_tag="2026-11-28", job_max_retries=1)),
    "cloudrun-cpu": ("cloudrun", Config(gpu_count=0, deploy_cpu=4, deploy_memory="16Gi", task_timeout=7200)),
    "kubernetes-multigpu": ("kubernetes", Config(
        gpu_count=4, gpu_type="nvidia-tesla-a100", deploy_cpu=32, deploy_memory="170Gi",
        bucket_mode="gcsfuse", k8s_namespace="ml", deploy_bucket="team-models", task_timeout=86400,
        model_name="google/gemma-2b", method="qlora", gradient_checkpointing=True)),
    "kubernetes-cpu": ("kubernetes", Config(gpu_count=0, deploy_cpu=4, deploy_memory="8Gi", min_instances=2,
                                            k8s_accelerator_label="")),
}
for _name in ("gemma-2b-qlora", "tiny-cpu"):
    if (ROOT / "configs" / f"{_name}.yaml").is_file():
        _cfg, _ = config.resolve(str(ROOT / "configs" / f"{_name}.yaml"), {},
                                 {"gcp_project": "demo-project", "gcp_region": "us-central1"})
        CASES[f"cloudrun-{_name}"] = ("cloudrun", _cfg)
        CASES[f"kubernetes-{_name}"] = ("kubernetes", _cfg)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_golden(case: str) -> None:
    target, cfg = CASES[case]
    files = render.render(cfg, target)
    folder = GOLDEN / case
    if UPDATE:
        render.write(files, folder)
    expected = sorted(p.name for p in folder.glob("*.yaml"))
    assert sorted(files) == expected, f"rendered files differ from {folder}"
    for name, text in files.items():
        assert text == (folder / name).read_text(), (
            f"{case}/{name} differs from the golden file; if the change is intended, rerun with "
            "SQLTUNE_UPDATE_GOLDEN=1 and review the diff")


def test_rendering_is_deterministic_and_pure() -> None:
    cfg = CASES["cloudrun-gcsfuse-vpc"][1]
    before = copy.deepcopy(cfg)
    assert render.render(cfg, "cloudrun") == render.render(cfg, "cloudrun")
    assert cfg == before


# --- structure --------------------------------------------------------------------------------

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {"type": "object", "required": ["name"], "additionalProperties": False,
         "properties": {"name": {"type": "string"}, "labels": _STR_MAP, "annotations": _STR_MAP}}
_TEMPLATE_META = {"type": "object", "additionalProperties": False, "properties": {"annotations": _STR_MAP}}
# From https://cloud.google.com/run/docs/reference/yaml/v1 (Job and Service), only the fields sqltune uses
# plus their siblings; unknown keys fail, which is what catches a field placed one level too deep.
CLOUDRUN_JOB = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "run.googleapis.com/v1"}, "kind": {"const": "Job"}, "metadata": _META,
        "spec": {"type": "object", "required": ["template"], "additionalProperties": False, "properties": {
            "template": {"type": "object", "required": ["spec"], "additionalProperties": False, "properties": {
                "metadata": _TEMPLATE_META,
                "spec": {"type": "object", "required": ["template"], "additionalProperties": False, "properties": {
                    "taskCount": {"type": "integer", "minimum": 1},
                    "parallelism": {"type": "integer", "minimum": 0},
                    "template": {"type": "object", "required": ["spec"], "additionalProperties": False,
                                 "properties": {"spec": {"type": "object", "required": ["containers"], "properties": {
                                     "maxRetries": {"type": "integer", "minimum": 0, "maximum": 10},
                                     "timeoutSeconds": {"type": "integer", "minimum": 1, "maximum": 604800}}}}},
                }}}}}}},
}
CLOUDRUN_SERVICE = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "serving.knative.dev/v1"}, "kind": {"const": "Service"}, "metadata": _META,
        "spec": {"type": "object", "required": ["template"], "additionalProperties": False, "properties": {
            "template": {"type": "object", "required": ["spec"], "additionalProperties": False, "properties": {
                "metadata": _TEMPLATE_META,
                "spec": {"type": "object", "required": ["containers"], "properties": {
                    "containerConcurrency": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "timeoutSeconds": {"type": "integer", "minimum": 1, "maximum": 3600}}}}}}}},
}
CLOUDBUILD = {"type": "object", "required": ["steps", "images"], "properties": {
    "steps": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "args"]}},
    "images": {"type": "array", "items": {"type": "string"}}}}


def _as_pod(spec: dict, drop: tuple[str, ...]) -> dict:
    pod_spec = {k: v for k, v in spec.items() if k not in drop}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": pod_spec}


def _k8s(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_manifests_are_structurally_valid(case: str) -> None:
    target, cfg = CASES[case]
    for name, text in render.render(cfg, target).items():
        doc = yaml.safe_load(text)
        if target == "kubernetes":
            _k8s(doc)
        elif name.startswith("cloudbuild"):
            jsonschema.validate(doc, CLOUDBUILD)
        elif doc["kind"] == "Job":
            jsonschema.validate(doc, CLOUDRUN_JOB)
            _k8s(_as_pod(doc["spec"]["template"]["spec"]["template"]["spec"], ("maxRetries", "timeoutSeconds")))
        else:
            jsonschema.validate(doc, CLOUDRUN_SERVICE)
            _k8s(_as_pod(doc["spec"]["template"]["spec"], ("containerConcurrency", "timeoutSeconds")))


def test_validator_rejects_a_misplaced_field() -> None:
    """The structural check can fail: a field one level too deep is caught."""
    cfg = CASES["cloudrun-default"][1]
    job = render.cloudrun_job(cfg, common.names(cfg))
    job["spec"]["template"]["spec"]["template"]["spec"]["containers"][0]["maxRetries"] = 3
    with pytest.raises(Exception, match="maxRetries"):
        _k8s(_as_pod(job["spec"]["template"]["spec"]["template"]["spec"], ("maxRetries", "timeoutSeconds")))
    svc = render.cloudrun_service(cfg, common.names(cfg))
    svc["spec"]["containerConcurrency"] = 4
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(svc, CLOUDRUN_SERVICE)


# --- content a user relies on ------------------------------------------------------------------

def _container(doc: dict) -> dict:
    spec = doc["spec"]["template"]["spec"]
    return (spec["template"]["spec"] if "template" in spec else spec)["containers"][0]


def test_job_env_carries_the_tutorial_names_and_the_token_by_reference() -> None:
    cfg = Config(gcp_project="p", gcp_region="us-central1", lora_r=16, dataset_limit=1000, api_key="s3cret-key",
                 weight_decay=0.01)
    files = render.render(cfg, "cloudrun")
    env = {e["name"]: e for e in _container(yaml.safe_load(files["job.yaml"]))["env"]}
    for name in ("MODEL_NAME", "NEW_MODEL", "LORA_R", "LORA_ALPHA", "GRADIENT_ACCUMULATION_STEPS", "DATASET_LIMIT",
                 "LOGGING_STEPS", "MAX_SEQ_LENGTH", "TRAIN_BATCH_SIZE"):
        assert name in env
    assert env["LORA_R"]["value"] == "16" and env["DATASET_LIMIT"]["value"] == "1000"
    assert env["SQLTUNE_WEIGHT_DECAY"]["value"] == "0.01"  # non-default fields outside the tutorial's list follow too
    assert env["SQLTUNE_OUTPUT"]["value"] == "gs://p-sqltune-models/sqltune-sql"
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "HF_TOKEN", "key": "latest"}}}
    assert all("s3cret-key" not in text for text in files.values())


def test_every_env_name_resolves_back_to_the_same_config() -> None:
    """What the job's container reads from its environment is the config that was rendered."""
    cfg = CASES["kubernetes-multigpu"][1]
    env = _container(yaml.safe_load(render.render(cfg, "kubernetes")["job.yaml"]))["env"]
    environ = {e["name"]: e["value"] for e in env if "value" in e}
    back, _ = config.resolve(None, environ, {})
    for name in ("model_name", "method", "gradient_checkpointing", "lora_r", "max_seq_length"):
        assert getattr(back, name) == getattr(cfg, name)
    assert back.output == "/mnt/models/sqltune-sql"


def test_service_probes_and_scaling() -> None:
    cfg = CASES["cloudrun-gcsfuse-vpc"][1]
    doc = yaml.safe_load(render.render(cfg, "cloudrun")["service.yaml"])
    c = _container(doc)
    assert c["startupProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["args"][:3] == ["serve", "--model", "/mnt/models/gemma-2b-sql"]
    notes = doc["spec"]["template"]["metadata"]["annotations"]
    assert notes["autoscaling.knative.dev/minScale"] == "1" and notes["autoscaling.knative.dev/maxScale"] == "3"
    assert notes["run.googleapis.com/vpc-access-egress"] == "all-traffic"
    assert doc["spec"]["template"]["spec"]["nodeSelector"] == {"run.googleapis.com/accelerator": "nvidia-l4"}
    assert c["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}


def test_eval_job_is_sharded_and_training_is_not() -> None:
    files = render.render(CASES["cloudrun-gcsfuse-vpc"][1], "cloudrun")
    train = yaml.safe_load(files["job.yaml"])["spec"]["template"]["spec"]
    evaluation = yaml.safe_load(files["eval-job.yaml"])["spec"]["template"]["spec"]
    assert (train["taskCount"], train["parallelism"]) == (1, 1)
    assert (evaluation["taskCount"], evaluation["parallelism"]) == (4, 2)
    args = evaluation["template"]["spec"]["containers"][0]["args"]
    assert args == ["eval", "--model", "/mnt/models/gemma-2b-sql", "--report-dir", "/mnt/models/reports/gemma-2b-sql"]
    volume = evaluation["template"]["spec"]["volumes"][0]["csi"]
    assert volume["readOnly"] is False, "the shards write their reports into the bucket"


def test_kubernetes_multi_gpu_job_runs_torchrun() -> None:
    job = yaml.safe_load(render.render(CASES["kubernetes-multigpu"][1], "kubernetes")["job.yaml"])
    c = _container(job)
    assert c["command"] == ["torchrun", "--nproc-per-node", "4", "-m", "sqltune"] and c["args"] == ["finetune"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == common.RUN_AS_UID and pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 3  # retries on by default: each pod resumes from the checkpoints


@pytest.mark.parametrize(("overrides", "message"), [
    ({"deploy_cpu": 2}, "needs at least 4 vCPU and 16Gi"),
    ({"deploy_memory": "8Gi"}, "needs at least 4 vCPU and 16Gi"),
    ({"gpu_count": 2}, "exactly one GPU"),
    ({"gpu_type": "nvidia-tesla-t4"}, "Cloud Run has no GPU"),
    ({"task_timeout": 7200}, "caps GPU tasks at 3600"),
    ({"deploy_memory": "32GB"}, "not a memory size"),
    ({"deploy_job_name": "Fine_Tune"}, "not a valid resource name"),
    ({"gpu_count": 0, "deploy_cpu": 3}, "1, 2, 4, 6 or 8 vCPU"),
])
def test_cloudrun_limits_fail_before_rendering(overrides: dict, message: str) -> None:
    with pytest.raises(DeployError, match=message) as e:
        render.render(Config(**overrides), "cloudrun")
    assert e.value.hint


def test_kubernetes_allows_what_cloud_run_does_not() -> None:
    render.render(Config(gpu_count=8, deploy_cpu=2, task_timeout=86400), "kubernetes")


def test_warns_when_a_stopped_task_would_never_resume() -> None:
    assert any("--job-max-retries 3" in w for w in common.warnings(Config(job_max_retries=0), "cloudrun"))
    assert common.warnings(Config(), "cloudrun") == []


@pytest.mark.parametrize("case", ["cloudrun-gcsfuse-vpc", "kubernetes-multigpu"])
def test_container_commands_parse_with_the_real_cli(case: str) -> None:
    """Every container's arguments are a valid `sqltune` command line of this version."""
    from sqltune import cli

    target, cfg = CASES[case]
    parser = cli.build_parser()
    for name, text in render.render(cfg, target).items():
        doc = yaml.safe_load(text)
        if "spec" not in doc or name.startswith("cloudbuild") or doc["kind"] == "Service" and target == "kubernetes":
            continue
        args = _container(doc)["args"]
        ns = parser.parse_args(args)
        assert ns.command == args[0]


def test_render_command_writes_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sqltune import cli

    argv = ["deploy", "render", "--target", "cloudrun", "--project", "demo-project", "--region", "us-central1",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    golden = GOLDEN / "cloudrun-default"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in golden.iterdir())
    for path in golden.iterdir():
        assert (tmp_path / path.name).read_text() == path.read_text()
    assert "plan: attempts available: 4 x 3600 s" in capsys.readouterr().err  # the plan, before any money is spent


@pytest.mark.parametrize("argv", [["deploy", "--help"], ["deploy", "render", "--help"], ["deploy", "cloudrun", "--help"]])
def test_help_runs(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from sqltune import cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out
