"""Experiment tracking: TensorBoard by default beside the checkpoints, MLflow on request, the same
figures as the JSON log lines, and eval reports joining the training run.

    python -m pytest -q tests/test_tracking.py      # ~1 min on 2 cores

Read back with the backends' own readers: TensorBoard's EventAccumulator and an MLflow client on a
local file store.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_sqltune

TINY_RUN = ("--model", "tiny", "--method", "full", "--dataset", "synthetic:200", "--learning-rate", "0.003",
            "--train-batch-size", "8", "--logging-steps", "1", "--save-steps", "2", "--max-seq-length", "192",
            "--eval-generate-limit", "0", "--tiny-layers", "1", "--tiny-vocab-size", "400")


def _json_steps(stderr: str) -> dict[int, dict]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return {e["step"]: e for e in lines if e.get("message") == "train step"}


def _scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_is_the_default_and_holds_the_logged_figures(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    meta = json.loads((tiny_model_dir / "sqltune.json").read_text())
    logdir = tiny_model_dir / "checkpoints" / "tensorboard"
    assert meta["tracking"] == {"report_to": "tensorboard", "run_id": str(logdir)}
    scalars = _scalars(logdir)
    # every logging step of the run, with the loss the JSON line (and the loss curve) shows
    losses = {h["step"]: h["loss"] for h in meta["loss_history"]}
    assert scalars["train/loss"].keys() == losses.keys()
    for step, loss in losses.items():
        assert scalars["train/loss"][step] == pytest.approx(loss, abs=1e-4)
    assert {"train/lr", "train/grad_norm", "train/epoch", "train/tokens_per_s", "train/eta_s"} <= scalars.keys()
    assert "train/step" not in scalars
    assert scalars["final/train_loss"][meta["metrics"]["steps"]] == pytest.approx(meta["metrics"]["train_loss"], rel=1e-5)

    # an eval report joins the run when its folder is given as the run id
    copy = tmp_path / "tb"
    shutil.copytree(logdir, copy)
    proc = run_sqltune("eval", "--model", str(tiny_model_dir), "--dataset", "synthetic:40", "--limit", "12",
                       "--eval-workers", "1", "--report-dir", str(tmp_path / "report"), "--run-id", str(copy))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    after = _scalars(copy)
    step = meta["metrics"]["steps"]
    assert after["eval/ex"] == {step: pytest.approx(report["results"]["metrics"]["ex"]["value"])}
    assert after["eval/examples"][step] == 12
    assert after["train/loss"] == scalars["train/loss"]  # the training figures are still there
    assert "eval report logged" in proc.stderr


def test_mlflow_run_gets_the_json_figures_keeps_its_id_on_resume_and_takes_the_eval(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    out = tmp_path / "model"
    common = (*TINY_RUN, "--output", str(out), "--report-to", "mlflow", "--tracking-uri", store,
              "--tracking-experiment", "sqltune-test")
    first = run_sqltune("finetune", *common, "--max-steps", "2")
    run_id = json.loads((out / "sqltune.json").read_text())["tracking"]["run_id"]
    assert f"tracking: mlflow run {run_id}" in first.stdout  # the id `sqltune eval --run-id` takes
    second = run_sqltune("finetune", *common, "--max-steps", "4")  # resumes from checkpoint-2
    meta = json.loads((out / "sqltune.json").read_text())
    assert meta["tracking"]["run_id"] == run_id and meta["tracking"]["report_to"] == "mlflow"

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads a file store only when told to
    client = MlflowClient(tracking_uri=store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["lora_r"] == "8"
    logged = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    json_lines = {**_json_steps(first.stderr), **_json_steps(second.stderr)}
    assert logged == {step: e["loss"] for step, e in json_lines.items()} and set(logged) == {1, 2, 3, 4}
    lr = {m.step: m.value for m in client.get_metric_history(run_id, "train/lr")}
    assert lr == {step: e["lr"] for step, e in json_lines.items()}

    # eval into the same run: the backend and store come from the model's sqltune.json
    run_sqltune("eval", "--model", str(out), "--dataset", "synthetic:30", "--limit", "8", "--eval-workers", "1",
                "--report-dir", str(tmp_path / "report"), "--run-id", run_id)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    ex = client.get_metric_history(run_id, "eval/ex")
    assert [(m.step, m.value) for m in ex] == [(4, pytest.approx(report["results"]["metrics"]["ex"]["value"]))]
    assert client.get_run(run_id).info.status == "FINISHED"  # eval logs into the run without ending it again


def test_bad_tracking_settings_fail_with_the_fix(tmp_path: Path) -> None:
    from sqltune import tracking
    from sqltune.config import load
    from sqltune.errors import ConfigError

    with pytest.raises(ConfigError, match="--report-to: 'comet' is not allowed") as err:
        load([], {"SQLTUNE_REPORT_TO": "comet"})
    assert "tensorboard" in (err.value.hint or "")
    if importlib.util.find_spec("mlflow") is not None:
        with pytest.raises(ConfigError, match="no such MLflow run") as err:
            tracking.open_tracker("mlflow", run_id="0" * 32, uri=f"file:{tmp_path / 'mlruns'}")
        assert "--tracking-uri" in (err.value.hint or "")
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="needs the `wandb` package") as err:
            tracking.open_tracker("wandb", default_logdir=tmp_path)
        assert "pip install wandb" in (err.value.hint or "")
    assert tracking.open_tracker("none") is None
