"""A learning-rate schedule over whichever ends training first: max_steps or max_train_minutes (--time-schedule).

A run stopped by its time cap before its planned steps stops mid-schedule: a cosine planned over 100 steps and
cut at 60 leaves the learning rate at 39% of its peak, never annealed. With --time-schedule, the schedule's
progress is the larger of the steps done and the share of the minutes used, so warm-up, decay and the final low
learning rate all happen inside the cap on a fast machine and on a slow one. Without it the rates are exactly
transformers' schedules of the same names (the same scheduler either way, so checkpoints resume across both).

    lr = peak * factor(kind, progress, warmup)     progress = max(step / max_steps, seconds / max_train_seconds)

A resumed run (a new attempt gets its own max_train_minutes) goes on from the progress its checkpoint reached
and spreads what is left of the schedule over its own budget; resumed with no time cap, it finishes the
planned steps on the step schedule. Under torch.distributed every rank takes rank 0's
clock, so every replica steps with the same learning rate."""

from __future__ import annotations

import math
import time
from typing import Any

from torch.optim.lr_scheduler import LRScheduler

KINDS = ("cosine", "linear", "constant", "constant_with_warmup")


def factor(kind: str, progress: float, warmup: float) -> float:
    """The share of the peak learning rate at `progress` (0..1) of training, after a warm-up of `warmup` of it:
    the shapes of transformers' schedules of the same names (cosine: half a cycle down to 0)."""
    if kind not in KINDS:
        raise ValueError(f"lr_scheduler_type {kind!r}: a time budget schedules only {', '.join(KINDS)}")
    if kind != "constant" and progress < warmup:
        return progress / warmup
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    left = (progress - warmup) / max(1.0 - warmup, 1e-12)
    if kind == "linear":
        return max(0.0, 1.0 - left)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(left, 1.0))))


def _shared(value: float) -> float:
    """`value` as rank 0 has it, where several processes train together."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


class BudgetSchedule(LRScheduler):
    """`kind` over max(steps, time) progress; its checkpointed state (`reached`) carries the progress over a resume."""

    def __init__(self, optimizer: Any, kind: str, warmup: float, max_steps: int, max_s: float) -> None:
        factor(kind, 0.0, warmup)  # an unknown kind fails here, before training
        self.kind, self.warmup, self.max_steps, self.max_s = kind, warmup, max(max_steps, 1), max_s
        self.start = 0.0  # the progress this attempt started from
        self.reached = 0.0  # the progress of the last step: saved in the checkpoint's scheduler state
        self.t0 = time.monotonic()
        super().__init__(optimizer)

    def progress(self) -> float:
        by_steps = self.last_epoch / self.max_steps
        if not self.max_s:
            return min(1.0, by_steps)
        by_time = _shared(self.start + (1.0 - self.start) * (time.monotonic() - self.t0) / self.max_s)
        return min(1.0, max(by_steps, by_time, self.reached))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        self.reached = self.progress()
        scale = factor(self.kind, self.reached, self.warmup)
        return [base * scale for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checkpoint's position (step, progress, peak rates); the schedule itself (kind, warm-up, planned steps,
        time budget) is this run's, as transformers' own schedules keep theirs. A checkpoint of transformers'
        step schedule has no progress of its own: its step gives it."""
        mine = {k: getattr(self, k) for k in ("kind", "warmup", "max_steps", "max_s")}
        super().load_state_dict(state_dict)
        self.__dict__.update(mine)
        self.__dict__.pop("lr_lambdas", None)
        # a new attempt: with a time budget, what is left of the schedule spreads over this attempt's own budget;
        # without one (--max-train-minutes 0 finishes the planned steps), the steps alone set the pace
        self.start = self.reached = float(state_dict.get("reached", 0.0)) if self.max_s else 0.0
        self.t0 = time.monotonic()


def budget_trainer(base: type, cfg: Any) -> type:
    """`base` (a transformers Trainer) whose learning rate follows BudgetSchedule: over max(steps, time) progress
    with cfg.time_schedule and a max_train_minutes, exactly transformers' schedule of the same name otherwise."""
    max_minutes = cfg.max_train_minutes if cfg.time_schedule else 0.0

    class BudgetTrainer(base):  # type: ignore[misc, valid-type]
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            kind = str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
            if self.lr_scheduler is None and (kind in KINDS or max_minutes):
                warmup = self.args.get_warmup_steps(num_training_steps) / max(num_training_steps, 1)
                self.lr_scheduler = BudgetSchedule(optimizer or self.optimizer, kind, warmup, num_training_steps,
                                                   max_minutes * 60)
                self._created_lr_scheduler = True
            return super().create_scheduler(num_training_steps, optimizer)

    return BudgetTrainer
