"""Pure renderers of the Kubernetes objects: a batch Job that fine-tunes (torchrun with one process
per GPU when the pod has several) and a Deployment + Service that serve the published model.

    sqltune deploy render --target kubernetes --config configs/gemma-2b-qlora.yaml --out deploy/k8s/
"""

from __future__ import annotations

from typing import Any

from sqltune.config import Config
from sqltune.deploy.common import MOUNT_PATH, RUN_AS_UID, SERVE_PORT, Names, job_env, serve_args, serve_env, to_yaml


def _labels(component: str) -> dict[str, str]:
    # Recommended labels: https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/
    return {"app.kubernetes.io/name": "sqltune", "app.kubernetes.io/component": component}


def _resources(cfg: Config) -> dict[str, Any]:
    requests = {"cpu": str(cfg.deploy_cpu), "memory": cfg.deploy_memory}
    limits: dict[str, str] = {"memory": cfg.deploy_memory}
    if cfg.gpu_count:
        # GPUs are only set in limits (requests default to them):
        # https://kubernetes.io/docs/tasks/manage-gpus/scheduling-gpus/
        limits["nvidia.com/gpu"] = str(cfg.gpu_count)
    return {"requests": requests, "limits": limits}


def _pod(cfg: Config, n: Names, container: dict[str, Any], *, read_only: bool) -> dict[str, Any]:
    container["resources"] = _resources(cfg)
    container["securityContext"] = {"allowPrivilegeEscalation": False}
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    if cfg.gpu_count > 1:
        # NCCL and torchrun workers share tensors through /dev/shm, which is 64 MiB by default.
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    if cfg.bucket_mode == "gcsfuse":
        # Cloud Storage FUSE CSI driver on GKE: https://cloud.google.com/kubernetes-engine/docs/how-to/cloud-storage-fuse-csi-driver
        mounts.append({"name": "models", "mountPath": MOUNT_PATH, "readOnly": read_only})
        volumes.append({"name": "models", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "readOnly": read_only,
                                                  "volumeAttributes": {"bucketName": n.bucket}}})
    if mounts:
        container["volumeMounts"] = mounts
    spec: dict[str, Any] = {
        # Workload Identity maps this ServiceAccount to the Google one that may write the bucket.
        "serviceAccountName": cfg.deploy_service_account,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS_UID, "fsGroup": RUN_AS_UID},
    }
    if cfg.gpu_count:
        if cfg.k8s_accelerator_label:
            spec["nodeSelector"] = {cfg.k8s_accelerator_label: cfg.gpu_type}
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    spec["containers"] = [container]
    if volumes:
        spec["volumes"] = volumes
    return spec


def _template_meta(cfg: Config, component: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"labels": _labels(component)}
    if cfg.bucket_mode == "gcsfuse":
        meta["annotations"] = {"gke-gcsfuse/volumes": "true"}  # injects the FUSE sidecar
    return meta


def job(cfg: Config, n: Names) -> dict[str, Any]:
    # optional: a public base model needs no token, and the pod must still start without the Secret.
    secret = {"secretKeyRef": {"name": n.k8s_secret, "key": "HF_TOKEN", "optional": True}}
    container: dict[str, Any] = {"name": "finetune", "image": n.finetune_image}
    if cfg.gpu_count > 1:
        # One process per GPU; rank 0 alone logs, merges and publishes:
        # https://docs.pytorch.org/docs/stable/elastic/run.html
        container["command"] = ["torchrun", "--nproc-per-node", str(cfg.gpu_count), "-m", "sqltune"]
    container["args"] = ["finetune"]
    container["env"] = [*job_env(cfg, n), {"name": "HF_TOKEN", "valueFrom": secret}]
    # The deadline is per pod, as Cloud Run's timeoutSeconds is per attempt: each pod trains within it,
    # exits 75 and the Job starts the next, up to backoffLimit; a Job-level deadline would cut across them.
    pod = {"restartPolicy": "Never", "activeDeadlineSeconds": cfg.task_timeout,
           **_pod(cfg, n, container, read_only=False)}
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": n.job, "namespace": cfg.k8s_namespace, "labels": _labels("finetune")},
            "spec": {"backoffLimit": cfg.job_max_retries,
                     "ttlSecondsAfterFinished": 86400,
                     "template": {"metadata": _template_meta(cfg, "finetune"), "spec": pod}}}


def deployment(cfg: Config, n: Names) -> dict[str, Any]:
    http = {"path": "/ready", "port": "http"}
    container = {
        "name": "serve", "image": n.serve_image, "args": serve_args(n),
        **serve_env(cfg),
        "ports": [{"name": "http", "containerPort": SERVE_PORT}],
        # startup: weights load for minutes; readiness: out of the Service while not /ready;
        # liveness: restart a wedged server. https://kubernetes.io/docs/tasks/configure-pod-container/configure-liveness-readiness-startup-probes/
        "startupProbe": {"httpGet": http, "periodSeconds": 10, "failureThreshold": 60},
        "readinessProbe": {"httpGet": http, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 30,
                          "failureThreshold": 3},
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": n.service, "namespace": cfg.k8s_namespace, "labels": _labels("serve")},
            "spec": {"replicas": max(cfg.min_instances, 1),
                     "selector": {"matchLabels": _labels("serve")},
                     "template": {"metadata": _template_meta(cfg, "serve"),
                                  "spec": _pod(cfg, n, container, read_only=True)}}}


def service(cfg: Config, n: Names) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": n.service, "namespace": cfg.k8s_namespace, "labels": _labels("serve")},
            "spec": {"type": "ClusterIP", "selector": _labels("serve"),
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


def render(cfg: Config, n: Names) -> dict[str, str]:
    head = ("Rendered by `sqltune deploy render --target kubernetes` from the config; edit the config, "
            "not this file.\n")
    secret = (f"Token for gated base models: kubectl -n {cfg.k8s_namespace} create secret generic "
              f"{n.k8s_secret} --from-literal=HF_TOKEN=...")
    return {
        "job.yaml": to_yaml(job(cfg, n), head + "Apply: kubectl apply -f job.yaml\n" + secret),
        "deployment.yaml": to_yaml(deployment(cfg, n), head + "Apply: kubectl apply -f deployment.yaml"),
        "service.yaml": to_yaml(service(cfg, n), head + "Apply: kubectl apply -f service.yaml"),
    }

