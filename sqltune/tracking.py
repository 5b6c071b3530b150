"""Experiment tracking: the figures of the JSON log lines, also sent to TensorBoard, MLflow or W&B.

    sqltune finetune --config configs/tiny-cpu.yaml                       # TensorBoard, the default
    tensorboard --logdir models/tiny-sql/checkpoints/tensorboard
    sqltune finetune --report-to mlflow --tracking-uri file:./mlruns ...  # prints and records the run id
    sqltune eval --model models/tiny-sql --run-id <that id>               # the eval report joins the same run

`report_to` picks the backend (none | tensorboard | mlflow | wandb); `run_id` names the run to log
into: for TensorBoard its log folder (default `<output>/checkpoints/tensorboard`, beside the
checkpoints), for MLflow and W&B the backend's run id (default: a new run, or on a resumed job the
run it started). Each backend is imported only when chosen; a missing one is an error with its pip
command. Only rank 0 of a torchrun job tracks.
"""

from __future__ import annotations

import atexit
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from sqltune import logs
from sqltune.errors import ConfigError

log = logs.get("tracking")

BACKENDS = ("none", "tensorboard", "mlflow", "wandb")
STATE_FILE = "tracking.json"  # in the checkpoints folder: which run a resumed job continues
_PIP = {"tensorboard": "pip install tensorboard", "mlflow": "pip install 'sqltune[tracking]' (mlflow-skinny)",
        "wandb": "pip install wandb"}


class Tracker(Protocol):
    kind: str
    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, Any], step: int, prefix: str = "") -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


def numeric(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers among `metrics` (bools, strings and None dropped), keys prefixed."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoardTracker:
    kind = "tensorboard"

    def __init__(self, logdir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--report-to tensorboard needs the `tensorboard` package, which is not installed",
                              f"{_PIP['tensorboard']}, or pass --report-to none") from None
        self.run_id = str(logdir)
        self._writer = SummaryWriter(log_dir=str(logdir))
        self._closed = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in params.items())  # indented: TensorBoard renders Markdown
        self._writer.add_text("config", text)

    def log_metrics(self, metrics: Mapping[str, Any], step: int, prefix: str = "") -> None:
        for key, value in numeric(metrics, prefix).items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        if not self._closed:
            self._closed = True
            self._writer.close()


class MlflowTracker:
    kind = "mlflow"

    def __init__(self, uri: str, experiment: str, run_id: str, run_name: str, owned: bool = False) -> None:
        if uri.startswith("file:") or (uri and "://" not in uri):
            # MLflow 3 refuses a file store unless told it is wanted; a file URI given here says so
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("--report-to mlflow needs MLflow, which is not installed",
                              f"{_PIP['mlflow']}, or pass --report-to none") from None
        self._client = MlflowClient(tracking_uri=uri or None)
        self.uri = self._client.tracking_uri
        self._owned = owned or not run_id  # a run we start or resume is ours to mark running and finished
        if run_id:
            try:
                self._client.get_run(run_id)
            except Exception as e:  # MlflowException: unknown id, or a store it cannot reach
                raise ConfigError(f"--run-id {run_id}: no such MLflow run at {self.uri} ({str(e)[:200]})",
                                  "pass a run id that `sqltune finetune` printed, with the same --tracking-uri") from None
            if self._owned:
                self._client.update_run(run_id, status="RUNNING")
        else:
            found = self._client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
            run_id = self._client.create_run(experiment_id, run_name=run_name, tags={"sqltune": "finetune"}).info.run_id
        self.run_id = run_id
        self._closed = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow params never change once logged: a resumed run keeps its first values and notes the changes
        logged = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v)[:6000])
        if changed:
            logs.event(log, "resumed run keeps its first params", run_id=self.run_id, changed=changed)
            self._client.set_tag(self.run_id, "sqltune.changed_on_resume", ",".join(changed))
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int, prefix: str = "") -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in numeric(metrics, prefix).items()]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def close(self, status: str = "FINISHED") -> None:
        if not self._closed:
            self._closed = True
            if self._owned:  # a run someone else started (eval into a training run) keeps its own status
                self._client.set_terminated(self.run_id, status=status)


class WandbTracker:
    kind = "wandb"

    def __init__(self, project: str, run_id: str, run_name: str, folder: Path | None) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--report-to wandb needs the `wandb` package, which is not installed",
                              f"{_PIP['wandb']}, or pass --report-to none") from None
        self._wandb = wandb
        self._run = wandb.init(project=project, id=run_id or None, resume="allow", name=run_name,
                               dir=str(folder) if folder else None)
        self.run_id = self._run.id
        self._closed = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int, prefix: str = "") -> None:
        self._run.log(numeric(metrics, prefix), step=step)

    def close(self, status: str = "FINISHED") -> None:
        if not self._closed:
            self._closed = True
            self._run.finish(exit_code=0 if status == "FINISHED" else 1)


def open_tracker(kind: str, *, run_id: str = "", uri: str = "", experiment: str = "sqltune", run_name: str = "",
                 default_logdir: Path | None = None, owned: bool = False) -> Tracker | None:
    """The tracker `kind` names, logging into `run_id` (or a new run); None for `none` and off rank 0.
    An unfinished run is closed FAILED when the process exits without closing it."""
    if kind not in BACKENDS:
        raise ConfigError(f"--report-to {kind!r} is not allowed", f"use one of: {', '.join(BACKENDS)}")
    if kind == "none" or not logs.is_rank0():
        return None
    tracker: Tracker
    if kind == "tensorboard":
        if not run_id and default_logdir is None:
            raise ConfigError("--report-to tensorboard needs a log folder", "pass --run-id with the folder to write to")
        tracker = TensorBoardTracker(Path(run_id) if run_id else default_logdir)  # type: ignore[arg-type]
    elif kind == "mlflow":
        tracker = MlflowTracker(uri, experiment, run_id, run_name, owned)
    else:
        tracker = WandbTracker(experiment, run_id, run_name, default_logdir.parent if default_logdir else None)
    atexit.register(tracker.close, "FAILED")
    logs.event(log, "tracking", report_to=kind, run_id=tracker.run_id, **({"uri": tracker.uri} if kind == "mlflow" else {}))
    return tracker


def describe(tracker: Tracker | None) -> dict[str, Any]:
    """What sqltune.json records about the run (no secrets: a tracking URI holds none)."""
    if tracker is None:
        return {"report_to": "none"}
    info = {"report_to": tracker.kind, "run_id": tracker.run_id}
    if getattr(tracker, "uri", None):
        info["uri"] = tracker.uri  # type: ignore[attr-defined]
    return info


def for_finetune(cfg: Any, checkpoints: Path, resuming: bool) -> Tracker | None:
    """The job's tracker: a resumed job goes on logging into the run its first attempt started."""
    state = checkpoints / STATE_FILE
    run_id, resumed = cfg.run_id, False
    if not run_id and resuming and cfg.report_to in ("mlflow", "wandb") and state.is_file():
        saved = json.loads(state.read_text())
        if saved.get("report_to") == cfg.report_to:
            run_id, resumed = saved.get("run_id", ""), True
    tracker = open_tracker(cfg.report_to, run_id=run_id, uri=cfg.tracking_uri, experiment=cfg.tracking_experiment,
                           run_name=cfg.new_model, default_logdir=checkpoints / "tensorboard", owned=resumed)
    if tracker is not None:
        state.write_text(json.dumps(describe(tracker)))
        tracker.log_params({k: v for k, v in cfg.to_dict().items() if v not in ("", None, [])})
    return tracker


def eval_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The headline figures of an eval report: every metric's value, and the example counts."""
    results = report.get("results", {})
    out = {name: block["value"] for name, block in results.get("metrics", {}).items()
           if isinstance(block, Mapping) and "value" in block}
    out.update({"examples": results.get("examples"), "scored": results.get("scored")})
    return numeric(out)


def log_eval(cfg: Any, sources: Mapping[str, str], report: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """Log an eval report's figures into run `cfg.run_id`, at the model's last training step. Without
    an explicit --report-to, the backend the model was trained with (its sqltune.json) is used."""
    trained = meta.get("tracking") or {}
    kind = cfg.report_to if "report_to" in sources or not trained.get("report_to") else trained["report_to"]
    uri = cfg.tracking_uri if "tracking_uri" in sources or not trained.get("uri") else trained["uri"]
    tracker = open_tracker(kind, run_id=cfg.run_id, uri=uri, experiment=cfg.tracking_experiment)
    if tracker is None:
        return "none"
    step = int((meta.get("metrics") or {}).get("steps") or 0)
    tracker.log_metrics(eval_metrics(report), step, prefix="eval/")
    tracker.close()
    logs.event(log, "eval report logged", report_to=kind, run_id=tracker.run_id, step=step)
    return kind
