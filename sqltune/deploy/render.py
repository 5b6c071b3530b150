"""Pure renderers: Config -> Cloud Run Job and Service manifests, Kubernetes Job, Deployment and
Service, and Cloud Build configs, as dicts and as YAML text. Nothing here reads the environment,
calls the network or touches the disk except `write`, so the same Config always renders the same
bytes (tests compare them with golden files).

    sqltune deploy render --target cloudrun --config configs/gemma-2b-qlora.yaml --out deploy/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqltune.config import Config
from sqltune.deploy.common import (
    MOUNT_PATH,
    SERVE_PORT,
    Names,
    check,
    config_env,
    job_env,
    names,
    serve_args,
    serve_env,
    to_yaml,
)


def _cloudrun_annotations(cfg: Config) -> dict[str, str]:
    notes: dict[str, str] = {}
    if cfg.gpu_count:
        # The tutorial's --no-gpu-zonal-redundancy: cheaper, best-effort failover across zones.
        # https://cloud.google.com/run/docs/configuring/services/gpu-zonal-redundancy
        notes["run.googleapis.com/gpu-zonal-redundancy-disabled"] = "true"
    if cfg.vpc_egress != "off":
        # Direct VPC egress: https://cloud.google.com/run/docs/configuring/vpc-direct-vpc
        notes["run.googleapis.com/vpc-access-egress"] = cfg.vpc_egress
        notes["run.googleapis.com/network-interfaces"] = json.dumps(
            [{"network": cfg.vpc_network, "subnetwork": cfg.vpc_subnet}], separators=(",", ":"))
    return notes


def _cloudrun_resources(cfg: Config) -> dict[str, Any]:
    limits = {"cpu": str(cfg.deploy_cpu), "memory": cfg.deploy_memory}
    if cfg.gpu_count:
        limits["nvidia.com/gpu"] = str(cfg.gpu_count)
    return {"limits": limits}


def _metadata(name: str, n: Names) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if n.region:
        meta["labels"] = {"cloud.googleapis.com/location": n.region}
    # GPU jobs and services are configured through the BETA surface of the v1 API;
    # BETA also accepts every GA field: https://cloud.google.com/run/docs/troubleshooting#launch-stage
    meta["annotations"] = {"run.googleapis.com/launch-stage": "BETA"}
    return meta


def _cloudrun_pod(cfg: Config, n: Names, container: dict[str, Any], read_only: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if n.service_account:
        spec["serviceAccountName"] = n.service_account
    if cfg.gpu_count:
        spec["nodeSelector"] = {"run.googleapis.com/accelerator": cfg.gpu_type}
    container["resources"] = _cloudrun_resources(cfg)
    if cfg.bucket_mode == "gcsfuse":
        # Cloud Storage volume mounts: https://cloud.google.com/run/docs/configuring/jobs/cloud-storage-volume-mounts
        container["volumeMounts"] = [{"name": "models", "mountPath": MOUNT_PATH}]
        spec["volumes"] = [{"name": "models", "csi": {"driver": "gcsfuse.run.googleapis.com", "readOnly": read_only,
                                                      "volumeAttributes": {"bucketName": n.bucket}}}]
    spec["containers"] = [container]
    return spec


def cloudrun_job(cfg: Config, n: Names, *, evaluation: bool = False) -> dict[str, Any]:
    """The fine-tuning job (one task), or with `evaluation` the sharded evaluation job: taskCount
    tasks, each reading CLOUD_RUN_TASK_INDEX / CLOUD_RUN_TASK_COUNT to pick its shard."""
    if evaluation:
        # Every shard writes into one shared report folder; the task index picks the shard.
        args = ["eval", "--model", n.model_url, "--report-dir", n.report_url]
        env = config_env(cfg, ("eval", "common"), exclude=("eval_output", "eval_shard"))
        container = {"name": "eval", "image": n.finetune_image, "args": args, **({"env": env} if env else {})}
        tasks, parallel = cfg.job_task_count, cfg.job_parallelism
    else:
        # HF_TOKEN by reference to Secret Manager, never a value in the manifest:
        # https://cloud.google.com/run/docs/configuring/jobs/secrets
        secret = {"secretKeyRef": {"name": cfg.hf_token_secret, "key": "latest"}}
        env = [*job_env(cfg, n), {"name": "HF_TOKEN", "valueFrom": secret}]
        container = {"name": "finetune", "image": n.finetune_image, "args": ["finetune"], "env": env}
        # Training is not sharded by task: N tasks would train N copies. Scale out with GPUs instead.
        tasks, parallel = 1, 1
    task = _cloudrun_pod(cfg, n, container, read_only=False)
    task = {"maxRetries": cfg.job_max_retries, "timeoutSeconds": cfg.task_timeout, **task}
    template: dict[str, Any] = {"spec": {"taskCount": tasks, "parallelism": parallel, "template": {"spec": task}}}
    notes = _cloudrun_annotations(cfg)
    if notes:
        template = {"metadata": {"annotations": notes}, **template}
    return {"apiVersion": "run.googleapis.com/v1", "kind": "Job",
            "metadata": _metadata(n.eval_job if evaluation else n.job, n), "spec": {"template": template}}


def cloudrun_service(cfg: Config, n: Names) -> dict[str, Any]:
    probe_port = {"port": SERVE_PORT}
    container = {
        "name": "serve", "image": n.serve_image, "args": serve_args(n),
        **serve_env(cfg),
        "ports": [{"name": "http1", "containerPort": SERVE_PORT}],
        # Loading weights takes minutes: the startup probe holds traffic until /ready answers, then
        # liveness takes over. https://cloud.google.com/run/docs/configuring/healthchecks
        "startupProbe": {"httpGet": {"path": "/ready", **probe_port}, "periodSeconds": 10,
                         "timeoutSeconds": 5, "failureThreshold": 48},
        "livenessProbe": {"httpGet": {"path": "/health", **probe_port}, "periodSeconds": 30,
                          "timeoutSeconds": 5, "failureThreshold": 3},
    }
    pod = _cloudrun_pod(cfg, n, container, read_only=True)
    spec = {"containerConcurrency": cfg.container_concurrency, "timeoutSeconds": 600, **pod}
    notes = {"autoscaling.knative.dev/minScale": str(cfg.min_instances),
             "autoscaling.knative.dev/maxScale": str(cfg.max_instances),
             # GPU services need CPU always allocated (instance-based billing):
             # https://cloud.google.com/run/docs/configuring/services/gpu
             "run.googleapis.com/cpu-throttling": "false",
             "run.googleapis.com/startup-cpu-boost": "true",
             **_cloudrun_annotations(cfg)}
    return {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": _metadata(n.service, n),
            "spec": {"template": {"metadata": {"annotations": notes}, "spec": spec}}}


def cloudbuild(dockerfile: str, image: str) -> dict[str, Any]:
    """A Cloud Build config that builds one image from the repository root with a Dockerfile that is
    not at the root (`gcloud builds submit --tag` only finds ./Dockerfile):
    https://cloud.google.com/build/docs/building/build-containers"""
    return {"steps": [{"name": "gcr.io/cloud-builders/docker",
                       "args": ["build", "-f", dockerfile, "-t", image, "."]}],
            "images": [image],
            # torch and CUDA layers take longer than the default 10 minutes to build and push.
            "timeout": "3600s",
            "options": {"machineType": "E2_HIGHCPU_8"}}


def render(cfg: Config, target: str) -> dict[str, str]:
    """File name -> YAML text for `target`; the same Config always gives the same bytes."""
    check(cfg, target)
    n = names(cfg)
    if target == "kubernetes":
        from sqltune.deploy import k8s

        return k8s.render(cfg, n)
    region = n.region or "REGION"
    head = "Rendered by `sqltune deploy render --target cloudrun` from the config; edit the config, not this file.\n"
    return {
        "job.yaml": to_yaml(cloudrun_job(cfg, n), head + f"Apply: gcloud run jobs replace job.yaml --region {region}"
                            f"\nRun:   gcloud run jobs execute {n.job} --region {region} --wait"),
        "eval-job.yaml": to_yaml(cloudrun_job(cfg, n, evaluation=True),
                                 head + f"Apply: gcloud run jobs replace eval-job.yaml --region {region}\n"
                                 f"Run:   gcloud run jobs execute {n.eval_job} --region {region} --wait\n"
                                 f"Each of the {cfg.job_task_count} tasks scores its shard into {n.report_url}; "
                                 f"then: sqltune eval merge {n.report_url}"),
        "service.yaml": to_yaml(cloudrun_service(cfg, n),
                                head + f"Apply: gcloud run services replace service.yaml --region {region}"),
        "cloudbuild-finetune.yaml": to_yaml(cloudbuild("docker/Dockerfile.finetune", n.finetune_image),
                                            head + "Build, from the repository root: gcloud builds submit --config THIS_FILE ."),
        "cloudbuild-serve.yaml": to_yaml(cloudbuild("docker/Dockerfile.serve", n.serve_image),
                                         head + "Build, from the repository root: gcloud builds submit --config THIS_FILE ."),
    }


def write(files: dict[str, str], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        paths.append(path)
    return paths
