"""What every deployment target shares: names derived from the Config, the checks that fail a render
early, the environment a container gets, and YAML output. The Cloud Run and Kubernetes renderers
build on these; nothing here knows either platform's manifest shape.

    sqltune deploy render --target kubernetes --config configs/gemma-2b-qlora.yaml --out deploy/k8s/
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import yaml

from sqltune import __version__, config
from sqltune.config import Config
from sqltune.errors import DeployError

TARGETS = ("cloudrun", "kubernetes")
MOUNT_PATH = "/mnt/models"
SERVE_PORT = 8080
RUN_AS_UID = 10001  # the `sqltune` user created in docker/Dockerfile.*
FINETUNE_IMAGE, SERVE_IMAGE = "sqltune-finetune", "sqltune-serve"
# Minimum vCPU and GiB per GPU type on Cloud Run: https://cloud.google.com/run/docs/configuring/services/gpu
GPU_MINIMUMS = {"nvidia-l4": (4, 16), "nvidia-rtx-pro-6000": (20, 80)}
# "For tasks using GPUs, the maximum available timeout is 1 hour": https://cloud.google.com/run/docs/create-jobs
CLOUDRUN_GPU_TASK_TIMEOUT = 3600
# "Specify the number of retries using an integer from 0 to 10": https://cloud.google.com/run/docs/configuring/max-retries
CLOUDRUN_MAX_RETRIES = 10
# Without a GPU, Cloud Run allows 1, 2, 4, 6 or 8 vCPU and at most 4 GiB per vCPU:
# https://cloud.google.com/run/docs/configuring/jobs/cpu
CLOUDRUN_CPUS = (1, 2, 4, 6, 8)
# The tutorial's job passes these as environment variables; they are always set, even at their
# defaults, so the job's settings can be read off the manifest and edited in the console.
TUTORIAL_FIELDS = ("model_name", "new_model", "method", "dataset", "dataset_limit", "lora_r", "lora_alpha",
                   "lora_dropout", "learning_rate", "num_train_epochs", "max_steps", "train_batch_size",
                   "gradient_accumulation_steps", "max_seq_length", "logging_steps")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,47}[a-z0-9])?$")
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)(Mi|Gi)$")


@dataclass(frozen=True)
class Names:
    """Everything a manifest needs that is derived from the Config rather than copied from it."""

    project: str
    region: str
    bucket: str
    registry: str
    tag: str
    finetune_image: str
    serve_image: str
    service_account: str  # email on Cloud Run ("" = the default compute identity)
    model_url: str
    report_url: str  # where the sharded evaluation writes
    job: str
    eval_job: str
    service: str
    k8s_secret: str


def names(cfg: Config) -> Names:
    project, region = cfg.gcp_project, cfg.gcp_region
    bucket = cfg.deploy_bucket or (f"{project}-sqltune-models" if project else "sqltune-models")
    registry = cfg.image_registry.rstrip("/")
    if not registry and project and region:
        registry = f"{region}-docker.pkg.dev/{project}/{cfg.image_repo}"
    tag = cfg.image_tag or __version__

    def image(name: str) -> str:
        return f"{registry}/{name}:{tag}" if registry else f"{name}:{tag}"

    root = f"gs://{bucket}" if cfg.bucket_mode == "gs" else MOUNT_PATH
    model_url = f"{root}/{cfg.new_model}"
    report_url = cfg.eval_output or f"{root}/reports/{cfg.new_model}"
    account = f"{cfg.deploy_service_account}@{project}.iam.gserviceaccount.com" if project else ""
    return Names(project=project, region=region, bucket=bucket, registry=registry, tag=tag,
                 finetune_image=image(FINETUNE_IMAGE), serve_image=image(SERVE_IMAGE),
                 service_account=account, model_url=model_url, report_url=report_url, job=cfg.deploy_job_name,
                 eval_job=f"{cfg.deploy_job_name}-eval", service=cfg.deploy_service_name,
                 k8s_secret=cfg.hf_token_secret.lower().replace("_", "-"))


def memory_gib(text: str) -> float:
    m = _MEMORY.match(text)
    if not m:
        raise DeployError(f"--deploy-memory: {text!r} is not a memory size", "write it as 16Gi or 16384Mi")
    return float(m.group(1)) / (1024 if m.group(2) == "Mi" else 1)


def check(cfg: Config, target: str) -> None:
    """Fail before rendering on what the platform would reject after an image build."""
    if target not in TARGETS:
        raise DeployError(f"unknown target {target!r}", f"use one of: {', '.join(TARGETS)}")
    for flag, value in (("--deploy-job-name", cfg.deploy_job_name),
                        ("--deploy-service-name", cfg.deploy_service_name),
                        ("--k8s-namespace", cfg.k8s_namespace)):
        if not _NAME.match(value):
            raise DeployError(f"{flag}: {value!r} is not a valid resource name",
                              "use lower-case letters, digits and hyphens, starting with a letter, "
                              "at most 49 characters")
    gib = memory_gib(cfg.deploy_memory)
    if target != "cloudrun":
        return
    if cfg.job_max_retries > CLOUDRUN_MAX_RETRIES:
        raise DeployError(f"--job-max-retries: Cloud Run allows at most {CLOUDRUN_MAX_RETRIES} retries of a task, "
                          f"got {cfg.job_max_retries}",
                          f"set --job-max-retries {CLOUDRUN_MAX_RETRIES} or less; for more training per run, "
                          "lower --dataset-limit or --max-steps")
    if cfg.gpu_count == 0:
        if cfg.deploy_cpu not in CLOUDRUN_CPUS or gib > 4 * cfg.deploy_cpu:
            raise DeployError(f"Cloud Run without a GPU takes 1, 2, 4, 6 or 8 vCPU with at most 4 GiB "
                              f"each; got {cfg.deploy_cpu} vCPU and {cfg.deploy_memory}",
                              "lower --deploy-memory or raise --deploy-cpu")
        return
    if cfg.gpu_type not in GPU_MINIMUMS:
        raise DeployError(f"--gpu-type: Cloud Run has no GPU {cfg.gpu_type!r}",
                          f"use one of: {', '.join(GPU_MINIMUMS)}")
    if cfg.gpu_count != 1:
        raise DeployError(f"--gpu-count: a Cloud Run instance has exactly one GPU, not {cfg.gpu_count}",
                          "set --gpu-count 1, or render --target kubernetes for several GPUs per job")
    min_cpu, min_gib = GPU_MINIMUMS[cfg.gpu_type]
    if cfg.deploy_cpu < min_cpu or gib < min_gib:
        raise DeployError(f"{cfg.gpu_type} on Cloud Run needs at least {min_cpu} vCPU and {min_gib}Gi; "
                          f"got {cfg.deploy_cpu} vCPU and {cfg.deploy_memory}",
                          f"set --deploy-cpu {max(min_cpu, cfg.deploy_cpu)} "
                          f"--deploy-memory {max(min_gib, int(gib))}Gi")
    if cfg.task_timeout > CLOUDRUN_GPU_TASK_TIMEOUT:
        raise DeployError(f"--task-timeout: Cloud Run caps GPU tasks at {CLOUDRUN_GPU_TASK_TIMEOUT} s, "
                          f"got {cfg.task_timeout}",
                          f"set --task-timeout {CLOUDRUN_GPU_TASK_TIMEOUT} or less: each attempt checkpoints "
                          "before its timeout and the next resumes, so raise --job-max-retries for a longer run")


def warnings(cfg: Config, target: str) -> list[str]:
    """What renders but will likely go wrong in the cloud."""
    found = []
    if cfg.job_max_retries == 0:
        # GPU tasks are not live-migrated: maintenance terminates them, and Cloud Run recommends retries
        # for every job: https://cloud.google.com/run/docs/configuring/task-timeout
        found.append("--job-max-retries is 0: a task stopped by its timeout or by maintenance is never resumed "
                     "from its checkpoints; set --job-max-retries 3")
    return found


def env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _default(name: str) -> Any:
    f = config.FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def config_env(cfg: Config, groups: tuple[str, ...], always: tuple[str, ...] = (),
               exclude: tuple[str, ...] = ("output",)) -> list[dict[str, str]]:
    """The fields of `groups` as `NAME=value` pairs under their tutorial names (`LORA_R`): the ones in
    `always`, plus any that differ from the default. Secrets never appear; they come by reference."""
    env = []
    for name, f in config.FIELDS.items():
        if name in config.SECRET_FIELDS or name in exclude or f.metadata["group"] not in groups:
            continue
        value = getattr(cfg, name)
        if name in always or value != _default(name):
            env.append({"name": config.env_name(name), "value": env_value(value)})
    return env


def job_env(cfg: Config, n: Names) -> list[dict[str, str]]:
    env = config_env(cfg, ("finetune", "common"), TUTORIAL_FIELDS, exclude=("output", "attempt_timeout"))
    env.append({"name": config.env_name("output"), "value": n.model_url})
    # Each attempt trains within the task's timeout and exits 75 to be retried; the retries count is how
    # many attempts its plan has (sqltune/finetune/attempts.py).
    env.append({"name": config.env_name("attempt_timeout"), "value": str(cfg.task_timeout)})
    env.append({"name": config.env_name("job_max_retries"), "value": str(cfg.job_max_retries)})
    return env


def serve_env(cfg: Config) -> dict[str, Any]:
    """The serving fields set away from their defaults, as the container's `env` (absent if none)."""
    env = config_env(cfg, ("serve",), exclude=("serve_port",))  # the port is the platform's: 8080
    return {"env": env} if env else {}


def serve_args(n: Names) -> list[str]:
    args = ["serve", "--model", n.model_url]
    if "serve_port" in config.FIELDS:
        args += ["--serve-port", str(SERVE_PORT)]
    args += ["--host", "0.0.0.0"]  # the server binds 127.0.0.1 unless told; a pod must listen on all
    return args


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # a shared probe dict is written out twice, not as a &id001 anchor


def to_yaml(doc: dict[str, Any], header: str) -> str:
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
