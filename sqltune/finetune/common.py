"""What the SFT job and the GRPO job share: where a rerun resumes, what training holds in memory, and the
held-out check the export runs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sqltune import config, logs
from sqltune.artifacts import checkpoints, manifests, registry
from sqltune.errors import ArtifactError, ConfigError, TrainingInterrupted

log = logs.get("train")


def as_start_model(cfg: config.Config, sources: dict[str, str]) -> config.Config:
    """A run that starts from a finished sqltune model (GRPO after SFT, SFT continued) builds its contexts
    with that model's schema budget unless told otherwise: a database's context is cut as the model learnt it."""
    folder = Path(cfg.model_name)
    if not (folder / manifests.SQLTUNE_META).is_file():
        return cfg
    try:
        trained = manifests.read_meta(folder).get("config") or {}
    except ArtifactError:
        return cfg  # the model load says what is wrong with the folder
    return config.as_trained(cfg, sources, trained)


STOP_MESSAGES = {"sigterm": "SIGTERM received: checkpoint saved, exiting so the retry resumes here",
                 "time": "max_train_minutes reached: training stops here, then merge and publish"}


def train(trainer: Any, cfg: config.Config, ckpt_root: Path, resume_from: Path | None, stop: Any, budget: Any,
          started: float) -> dict[str, Any]:
    """Train to the end, to max_train_minutes or to SIGTERM, each checkpoint copied to a bucket output as it is
    written; returns the run's metrics so far (`cut_short` when the time cap stopped it before its steps).
    SIGTERM raises TrainingInterrupted once its checkpoint is saved (exit 143: the retry resumes there), and
    the end of a Cloud Run attempt with steps left raises AttemptEnded (exit 75)."""
    from sqltune.finetune import attempts

    remote_cb = checkpoints.callback(cfg.output_dir, ckpt_root, cfg.save_total_limit)
    if remote_cb is not None and logs.is_rank0():
        trainer.add_callback(remote_cb)
    if resume_from is not None:
        logs.event(log, "resuming", checkpoint=str(resume_from))
    with stop.installed():
        train_loss = attempts.train(trainer, resume_from, budget)
    if stop.reason == "sigterm":
        raise TrainingInterrupted(STOP_MESSAGES["sigterm"], "rerun with the same --output to resume")
    if stop.reason:
        logs.event(log, STOP_MESSAGES[stop.reason], step=trainer.state.global_step)
    else:
        budget.finish(trainer.state.global_step)
    metrics: dict[str, Any] = {"train_loss": train_loss, "steps": trainer.state.global_step,
                               "train_runtime_s": round(time.time() - started, 1)}
    if stop.reason == "time" and trainer.state.global_step < trainer.state.max_steps:
        # the summary says so: figures of a model trained on a fraction of the plan are not the recipe's
        metrics["cut_short"] = {"reason": "max_train_minutes", "max_train_minutes": cfg.max_train_minutes,
                                "steps_run": trainer.state.global_step, "planned_steps": trainer.state.max_steps}
    return metrics


def find_resume_checkpoint(root: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: newest complete one (auto), none (never), or an explicit path."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not manifests.is_complete(path):
            raise ConfigError(f"--resume {resume}: not a complete checkpoint (missing or without manifest.json)",
                              "pass a checkpoint-<step> folder written by sqltune, or --resume auto")
        return path
    if not root.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := checkpoints.NAME.match(p.name))), reverse=True)
    for _step, path in found:
        if manifests.is_complete(path):
            return path
        log.warning(f"skipping incomplete checkpoint {path.name} (no manifest: the job died while saving it)")
    return None


def check_resumable(checkpoint: Path, method: str, output: str) -> None:
    """A checkpoint of another method cannot be resumed: a LoRA checkpoint holds an adapter, a full one the
    whole model. Say so before loading anything (a folder that once held another recipe's run)."""
    has_adapter = (checkpoint / "adapter_config.json").exists()
    if has_adapter == (method in ("lora", "qlora")):
        return
    kind, other = ("a LoRA adapter", "full") if has_adapter else ("a fully fine-tuned model", method)
    raise ConfigError(f"{checkpoint.name} in {output} holds {kind}, and this run's method is {other}: it cannot "
                      "resume from it", f"pass a new --output, or delete {checkpoint.parent} to start over there")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def release_training_state(trainer: Any) -> None:
    """Free what only training needs before the export loads more models: the optimizer's state (AdamW keeps
    twice the trained weights: 1.1 GB for a full fine-tune of a 135M model) lives on in the trainer and in
    accelerate's references; the checkpoints already hold it for a resume."""
    trainer.optimizer = trainer.lr_scheduler = None
    trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
    trainer.accelerator.free_memory()
    from sqltune.finetune.callbacks import trim_heap

    trim_heap()  # what was freed leaves the resident set, not only the Python heap


def heldout_check(cfg: Any, examples: list[Any], train: list[Any]) -> Any:
    """The held-out check the export runs on the staged model (None when eval_generate_limit is 0)."""
    if not cfg.eval_generate_limit or not examples:
        return None
    from sqltune.data.loading import normalise_question
    from sqltune.finetune import heldout

    seen = {normalise_question(ex.question) for ex in train}
    return lambda stage, precision: heldout.score(stage, heldout.sample(examples, cfg.eval_generate_limit), precision,
                                                  trained_on=lambda q: normalise_question(q) in seen,
                                                  complete_joins=cfg.complete_joins)


def prepare_run(cfg: Any, method: str) -> tuple[Path, Path, Path | None]:
    """(run folder, checkpoint folder, checkpoint to resume from): the output's checkpoints restored from the
    bucket first, by one process per machine while the others wait (they then find the same checkpoint on the
    local disk, so every rank resumes at the same step); a checkpoint of another method is refused."""
    from accelerate import PartialState

    run_dir = registry.work_dir(cfg.output_dir)
    ckpt_root = run_dir / manifests.CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    state = PartialState()
    with state.local_main_process_first():
        # only the first process looks at the bucket: one that looked later could see a newer checkpoint land
        restored = checkpoints.restore(cfg.output_dir, ckpt_root) if state.is_local_main_process else 0
    if restored:
        logs.event(log, "restored checkpoints from the output", count=restored)
    if cfg.resume == "auto" and int(os.environ.get("CLOUD_RUN_TASK_ATTEMPT", "0") or 0) > 0:
        logs.event(log, "retried task: resuming", attempt=os.environ["CLOUD_RUN_TASK_ATTEMPT"])
    resume_from = find_resume_checkpoint(ckpt_root, cfg.resume)
    if resume_from is not None:
        check_resumable(resume_from, method, cfg.output_dir)
    return run_dir, ckpt_root, resume_from


def load_data(cfg: Any) -> Any:
    """The job's Splits: every source of cfg.dataset, rows on real databases with the contexts `ask` builds."""
    from sqltune.data import loading

    return loading.load_splits(cfg.dataset, split=cfg.dataset_split, columns=cfg.column_map, limit=cfg.dataset_limit,
                               eval_fraction=cfg.eval_fraction, seed=cfg.seed, keep_literal_case=cfg.keep_literal_case,
                               db=loading.database_options(cfg))
