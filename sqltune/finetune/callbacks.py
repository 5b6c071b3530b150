"""Trainer callbacks of the fine-tuning job: JSON log lines, checkpoint manifests, graceful stops."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sqltune import logs
from sqltune.artifacts import checkpoints, manifests
from sqltune.artifacts.storage import ensure_space

log = logs.get("train")


class JsonLogs(TrainerCallback):
    """One JSON line per logging step: step, loss, lr, grad norm, tokens/s, ETA."""

    def __init__(self, tracker: Any = None, max_minutes: float = 0.0) -> None:
        self._t0 = time.time()
        self._last: tuple[float, int] | None = None
        self.tracker = tracker  # sqltune.tracking: the same fields go to TensorBoard / MLflow / W&B
        self.max_s = max_minutes * 60  # max_train_minutes: training ends there if its steps have not

    def eta_s(self, state: Any, now: float) -> float | None:
        """Seconds of training left: the steps left at the pace so far, or the time left to max_train_minutes
        when that comes first."""
        done = state.global_step - self._start_step
        if done <= 0 or not state.max_steps:
            return None
        left = (now - self._t0) / done * (state.max_steps - state.global_step)
        if self.max_s:
            left = min(left, max(0.0, self.max_s - (now - self._t0)))
        return round(left, 1)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._t0 = time.time()
        self._start_step = state.global_step
        logs.event(log, "training", max_steps=state.max_steps, start_step=state.global_step,
                   batch_size=args.per_device_train_batch_size, world_size=args.world_size)

    def on_log(self, args: Any, state: Any, control: Any, logs_: dict[str, Any] | None = None, **kw: Any) -> None:
        entry = dict(kw.get("logs") or logs_ or {})
        if not state.is_world_process_zero or "loss" not in entry:
            return
        now, seen = time.time(), int(getattr(state, "num_input_tokens_seen", 0) or 0)
        fields: dict[str, Any] = {"step": state.global_step, "max_steps": state.max_steps,
                                  "loss": round(entry["loss"], 4), "lr": entry.get("learning_rate"),
                                  "grad_norm": _round(entry.get("grad_norm")), "epoch": _round(entry.get("epoch"))}
        if self._last and now > self._last[0]:
            fields["tokens_per_s"] = round((seen - self._last[1]) / (now - self._last[0]), 1)
        if (eta := self.eta_s(state, now)) is not None:
            fields["eta_s"] = eta
        self._last = (now, seen)
        logs.event(log, "train step", **fields)
        if self.tracker is not None:
            figures = {k: v for k, v in fields.items() if k not in ("step", "max_steps")}  # step is the x axis
            self.tracker.log_metrics(figures, state.global_step, prefix="train/")


def _round(value: Any) -> Any:
    return round(float(value), 4) if isinstance(value, (int, float)) else value


class CheckpointManifest(TrainerCallback):
    """Write each checkpoint's manifest.json once it is fully saved: a checkpoint is complete when its
    manifest is, so a job killed mid-save never resumes from half a checkpoint."""

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            manifests.write_manifest(folder, exclude=(), step=state.global_step)
            logs.event(log, "checkpoint saved", step=state.global_step, path=str(folder))


def trim_heap() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim; nothing elsewhere). glibc keeps what
    a long batch freed: measured on the SmolLM2 demo, resident memory jumps from 4.2 to 6.0 GB at one batch of
    long rows and stays there, while what training uses is under 3 GB (benchmarks/train_growth.py)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def resident_mb() -> float:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class HeapTrim(TrainerCallback):
    """trim_heap after each checkpoint, and after any step that left resident memory more than `growth_mb` above
    where the last trim left it: rows of very different lengths (a Spider schema of 700 tokens beside a
    one-table question of 80) leave glibc holding freed pages, and a run at batch 8 and 768 tokens grew to 9.5 GB
    while under 3 GB were in use. Trimming after every step would cost 20% of the step time in refaulted pages;
    trimming on growth costs one trim when the heap has grown by half a gigabyte."""

    def __init__(self, growth_mb: float = 512.0) -> None:
        self.growth_mb, self.floor_mb = growth_mb, 0.0

    def _trim(self) -> None:
        trim_heap()
        self.floor_mb = resident_mb()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        now = resident_mb()
        if not self.floor_mb:
            self.floor_mb = now
        elif now > self.floor_mb + self.growth_mb:
            self._trim()

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._trim()


class DiskSpaceCheck(TrainerCallback):
    """Before a checkpoint is written, check that its disk has room for it (the size of the last one, or an
    estimate from the model before the first): a full disk then stops the job with a clear error, between
    steps, with every earlier checkpoint intact. Goes after every callback that may ask for a save."""

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if control.should_save and state.is_world_process_zero:
            root = Path(args.output_dir)
            root.mkdir(parents=True, exist_ok=True)
            ensure_space(root, checkpoint_bytes(model, root), f"checkpoint-{state.global_step}")


def checkpoint_bytes(model: Any, root: Path) -> int:
    newest = checkpoints.newest_complete(root)
    if newest is not None:
        return sum(f.stat().st_size for f in newest[1].rglob("*") if f.is_file())
    params = list(model.parameters()) if model is not None else []
    trainable = [p for p in params if p.requires_grad]
    weights = trainable if hasattr(model, "peft_config") else params  # an adapter, or the whole model
    # the weights, AdamW's two moments per trained value in fp32, and the small files
    return sum(p.numel() * p.element_size() for p in weights) + 8 * sum(p.numel() for p in trainable) + 2**20


class StopControl(TrainerCallback):
    """Stop at a step boundary on SIGTERM (save first, then exit non-zero) or after a time budget."""

    def __init__(self, max_minutes: float = 0.0) -> None:
        self.max_s = max_minutes * 60
        self.reason: str | None = None
        self._t0 = time.time()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            self.reason = "sigterm"
            logs.event(log, "SIGTERM received: saving a checkpoint at the end of this step")

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._t0 = time.time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.reason is None and self.max_s and time.time() - self._t0 >= self.max_s:
            self.reason = "time"
        if self.reason:
            control.should_save = True
            control.should_training_stop = True
