"""Attempts of a fine-tuning task: each trains within its platform's timeout, then the next resumes.

    SQLTUNE_ATTEMPT_TIMEOUT=3600 CLOUD_RUN_TASK_ATTEMPT=0 sqltune finetune --config configs/gemma-2b-qlora.yaml

A Cloud Run GPU task runs at most an hour per attempt and is retried up to `maxRetries` times. With
`attempt_timeout` set, the job trains until the timeout minus a margin it measures (the time one
step takes, the time a checkpoint save and upload takes, and a reserve), saves a checkpoint and exits
75 ("more to do", `AttemptEnded`); the platform starts the next attempt, which restores the
checkpoint from the bucket and continues. The attempt that reaches the planned end merges, checks and
publishes. SIGTERM is separate: it still saves at the end of the step and exits 143.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sqltune import logs
from sqltune.errors import DISK_FULL_FIX, ArtifactError, AttemptEnded, ConfigError, disk_full
from sqltune.finetune.budget import Projection, must_stop, project, reserve_s

log = logs.get("attempts")

MORE_TO_DO = AttemptEnded.exit_code
# torch and transformers are imported by now: the part of the setup that merge and publish do not repeat
IMPORTED = time.time()
# Steps timed before the attempt states its projection: the first step also pays for warm-up.
TIMED_STEPS = 3


def process_started() -> float:
    """When this process started (the platform's timeout counts from the container start, which is
    about the same), else now."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # pragma: no cover - psutil ships with accelerate; the clock is the fallback
        return time.time()


def attempt_index(environ: Mapping[str, str]) -> int:
    """This attempt's 0-based number: Cloud Run's CLOUD_RUN_TASK_ATTEMPT (0 on the first run of a
    task, +1 on every retry); 0 where nothing sets it."""
    raw = environ.get("CLOUD_RUN_TASK_ATTEMPT", "") or "0"
    return int(raw) if raw.isdigit() else 0


def agree(flag: bool) -> bool:
    """True on every rank when it is true on any (under torchrun each rank reads its own clock, and ranks
    that disagree about stopping would wait on each other forever)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class AttemptBudget(TrainerCallback):
    """Trains within `budget_s` seconds of the process start: times steps and checkpoint saves, states
    the plan and its projection, and ends the attempt (save, then `ended`) before the budget runs out."""

    def __init__(self, budget_s: float, attempt: int, attempts: int, started: float, save_steps: int) -> None:
        self.budget_s, self.attempt, self.attempts = float(budget_s), attempt, attempts
        self.started, self.save_steps = started, save_steps
        self.ended = False
        self.setup_s = 0.0
        self.start_step = 0
        self.max_steps = 0
        self._steps: list[float] = []
        self._saves: list[float] = []
        self._begin: float | None = None
        self._end: float | None = None
        self._saving = False
        self._projected = False

    @property
    def active(self) -> bool:
        return self.budget_s > 0

    def elapsed(self) -> float:
        return time.time() - self.started

    @property
    def step_s(self) -> float:
        recent = sorted(self._steps[1:][-20:] or self._steps)  # the first step pays for warm-up
        return max(recent[len(recent) // 2], self._steps[-1]) if recent else 0.0

    @property
    def save_s(self) -> float:
        return max(self._saves, default=0.0)

    def export_s(self) -> float:
        """Merge, check and publish, before the final attempt has measured them: about this attempt's setup
        after the imports again (the merge reloads the base, the check generates), plus a checkpoint's save
        and upload (the publish uploads the merged model)."""
        return max(self.setup_s - max(IMPORTED - self.started, 0.0), 0.0) + self.save_s

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.begin(state.global_step, state.max_steps)

    def begin(self, step: int, max_steps: int) -> None:
        """State the attempt: its number, the step it resumes at, the planned steps, its budget."""
        self.setup_s = self.elapsed()
        self.start_step, self.max_steps = step, max_steps
        if not logs.is_rank0():
            return
        fields: dict[str, Any] = {
            "attempt": self.attempt + 1, "attempts_available": self.attempts, "resumed_step": step,
            "planned_steps": max_steps, "remaining": max_steps - step, "setup_s": round(self.setup_s, 1)}
        if not self.active:  # no attempt budget: one run to the end, as many retries as the platform gives
            del fields["attempts_available"]
            logs.event(log, f"attempt {self.attempt + 1} starting", **fields)
            return
        fields.update(attempt_budget_s=self.budget_s, total_budget_s=self.budget_s * self.attempts,
                      ends_by=utc(self.started + self.budget_s))
        logs.event(log, f"attempt {self.attempt + 1} of {self.attempts} starting", **fields)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        now = time.time()
        if self._saving and self._end is not None:
            self._saves.append(now - self._end)  # checkpoint written (and uploaded) between two steps
        self._saving = False
        self._begin = now

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        now = time.time()
        if self._begin is not None:
            self._steps.append(now - self._begin)
        self._end = now
        if not self.active:
            return
        first = state.global_step == self.start_step + 1
        if first or state.global_step >= state.max_steps:
            # the first: to measure what a checkpoint costs early; the last: so a publish cut off by the
            # timeout is redone by the next attempt without retraining anything
            control.should_save = True
        done = state.global_step - self.start_step  # >= 1: every attempt trains at least one step
        if not self._projected and (done >= TIMED_STEPS or state.global_step >= state.max_steps) and self._saves:
            self._projected = True
            self._state_projection(state)
        if state.global_step < state.max_steps and agree(
                must_stop(self.elapsed(), self.step_s, max(self.save_s, self.step_s), self.budget_s)):
            self.ended = True
            control.should_save = True
            control.should_training_stop = True
        self._saving = bool(control.should_save)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._saving and self._end is not None:
            self._saves.append(time.time() - self._end)
            self._saving = False

    def projection(self, step: int) -> Projection:
        return project(now_s=self.elapsed(), step=step, max_steps=self.max_steps, step_s=self.step_s,
                       save_s=self.save_s, setup_s=self.setup_s, export_s=self.export_s(),
                       budget_s=self.budget_s, save_steps=self.save_steps, attempt=self.attempt,
                       attempts=self.attempts)

    def _state_projection(self, state: Any) -> None:
        if not state.is_world_process_zero:
            return
        p = self.projection(state.global_step)
        fields = {"attempt": self.attempt + 1, "step": state.global_step, "step_s": round(self.step_s, 3),
                  "save_s": round(self.save_s, 2), "setup_s": round(self.setup_s, 1),
                  "steps_this_attempt": state.global_step - self.start_step + p.steps_this_attempt,
                  "remaining_after": p.remaining_after, "attempts_needed": p.attempts_needed,
                  "attempts_available": p.attempts_available, "projected_finish": utc(time.time() + p.finish_in_s),
                  "fits": p.fits}
        logs.event(log, "attempt projection", **fields)
        if not p.fits:
            logs.event(log, f"the plan cannot fit: {p.attempts_needed} attempts of {self.budget_s:g} s are "
                       f"needed and {p.attempts_available} are available; the run stops unfinished (its "
                       "checkpoints stay in the bucket). Fix: raise job_max_retries (Cloud Run allows 10), "
                       "task_timeout where the platform allows, or lower dataset_limit or max_steps",
                       level=30, **fields)

    def finish(self, step: int) -> None:
        """After `trainer.train`: raise AttemptEnded when this attempt stopped early, or when the planned
        steps are done but merge, check and publish would not end inside the budget (the next attempt
        publishes from the final checkpoint)."""
        if not self.active:
            return
        left = self.budget_s - self.elapsed()
        fields = {"attempt": self.attempt + 1, "step": step, "steps_this_attempt": step - self.start_step,
                  "remaining": self.max_steps - step, "elapsed_s": round(self.elapsed(), 1),
                  "exit_code": MORE_TO_DO}
        if self.ended:
            p = self.projection(step)
            logs.event(log, "attempt budget spent: checkpoint saved, the next attempt resumes here",
                       attempts_needed=p.attempts_needed, attempts_available=self.attempts,
                       projected_finish=utc(time.time() + p.finish_in_s), **fields)
            raise AttemptEnded(f"attempt {self.attempt + 1} trained to step {step} of {self.max_steps} in its "
                               f"{self.budget_s:g} s; the checkpoint is saved and the next attempt resumes from it",
                               "nothing to fix: the platform retries the task (job_max_retries); a local run "
                               "resumes when rerun with the same --output")
        if agree(left < self.export_s() + reserve_s(self.budget_s)):
            logs.event(log, "planned steps done, but merge and publish would outlast this attempt: the next "
                       "attempt publishes", export_estimate_s=round(self.export_s(), 1), left_s=round(left, 1),
                       **fields)
            raise AttemptEnded(f"training reached step {step} of {self.max_steps}; merge and publish (about "
                               f"{self.export_s():.0f} s) would not end in the {left:.0f} s left",
                               "nothing to fix: the next attempt publishes from the final checkpoint")


class EpochSeededOrder(TrainerCallback):
    """Draw each epoch's batch order from a generator seeded with (data seed + epoch).

    The Trainer's length-grouped sampler otherwise draws it from the global RNG when the epoch starts;
    a run resumed inside a later epoch restores that RNG only after the order is drawn, so it would
    skip the wrong batches and end with other weights than an uninterrupted run."""

    def __init__(self) -> None:
        self._sampler: Any = None

    @staticmethod
    def find_sampler(loader: Any) -> Any:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        seen, todo = set(), [loader]
        while todo:
            obj = todo.pop()
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, LengthGroupedSampler):
                return obj
            todo += [getattr(obj, name, None) for name in ("sampler", "batch_sampler", "base_dataloader")]
        return None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import torch

        self._sampler = self.find_sampler(kw.get("train_dataloader"))
        if self._sampler is not None:
            self._sampler.generator = torch.Generator()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self._sampler is not None:
            seed = args.data_seed if args.data_seed is not None else args.seed
            self._sampler.generator.manual_seed(seed + int((state.epoch or 0) + 1e-6))


def train(trainer: Any, resume_from: Path | None, budget: AttemptBudget) -> float:
    """`trainer.train`, resumed from `resume_from`; returns the training loss.

    When that checkpoint already holds the planned end (an earlier attempt trained every step and was
    stopped while it merged or published), its weights and state are loaded and nothing is trained:
    the Trainer would otherwise take one step past the end before noticing.
    """
    state_file = resume_from / "trainer_state.json" if resume_from is not None else None
    if state_file is not None and state_file.is_file():
        saved = json.loads(state_file.read_text())
        # the end planned now: a rerun with a larger --max-steps goes on training from that checkpoint
        planned = trainer.args.max_steps if trainer.args.max_steps > 0 else saved.get("max_steps", 0)
        if planned > 0 and saved.get("max_steps") == planned and saved.get("global_step", 0) >= planned:
            from transformers import TrainerState

            trainer._load_from_checkpoint(str(resume_from))
            trainer.state = TrainerState.load_from_json(str(state_file))
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            budget.begin(saved["global_step"], saved["max_steps"])
            logs.event(log, "the checkpoint holds every planned step: publishing without training",
                       step=saved["global_step"], checkpoint=str(resume_from))
            return sum(losses) / len(losses) if losses else 0.0
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    except Exception as e:
        if not disk_full(e):
            raise
        raise ArtifactError(f"the disk of {trainer.args.output_dir} filled up while a checkpoint was written ({e})",
                            DISK_FULL_FIX) from e
    return float(result.training_loss)


def from_config(cfg: Any, environ: Mapping[str, str] | None = None, started: float | None = None) -> AttemptBudget:
    if cfg.attempt_timeout and cfg.resume == "never":
        raise ConfigError("--attempt-timeout with --resume never: every attempt would start over and none finish",
                          "use --resume auto (the default) so each attempt continues from the last checkpoint")
    environ = os.environ if environ is None else environ
    return AttemptBudget(cfg.attempt_timeout, attempt_index(environ), cfg.job_max_retries + 1,
                         process_started() if started is None else started, cfg.save_steps)
