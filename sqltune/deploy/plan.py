"""The plan of a fine-tuning deployment, stated before it spends money: the planned steps, the attempts
available ((job_max_retries + 1) x task_timeout), the time per step it assumes and where that comes
from, and whether the run fits. Pure: no data is read and nothing is called.

    sqltune deploy render --target cloudrun --config configs/gemma-2b-qlora.yaml --out deploy/   # prints it

The job refines the same arithmetic (sqltune/finetune/budget.py) with what it measures: its own setup,
step and checkpoint times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqltune.config import Config
from sqltune.finetune.budget import Projection, project

# Training throughput per GPU type when plan_tokens_per_second is 0: the low end of the 2-3k tokens/s
# that QLoRA typically reaches on a 2B model on one L4 (issue 15's figure). Smaller models train faster,
# so their plans err long; sqltune has no GPU figure of its own for any other GPU type.
TOKENS_PER_SECOND = {"nvidia-l4": 2000.0}
THROUGHPUT_SOURCE = {"nvidia-l4": "a 2B model with QLoRA on an L4: the low end of the typical 2-3k tokens/s"}
# Rows of the datasets sqltune knows, and the mean tokens of one training row (prompt, completion and
# special tokens in the plain template) measured with the Gemma tokenizer on the 9,710 rows of
# ../shared/data/sql-create-context: `python benchmarks/plan_tokens.py` (benchmarks/results/plan_tokens_gemma3-270m.json).
DATASET_ROWS = {"b-mc2/sql-create-context": 78_577}
TOKENS_PER_ROW = 71.8
# What an attempt spends besides training, until the job measures its own: starting, downloading and
# loading the base model and preparing the data (every attempt); saving and uploading one checkpoint;
# merging in 16-bit, checking and publishing (the last attempt).
SETUP_S, SAVE_S, EXPORT_S = 300.0, 30.0, 600.0


@dataclass(frozen=True)
class Plan:
    steps: int | None  # None: the dataset's size is unknown here
    steps_source: str
    step_s: float | None  # None: no throughput figure for this GPU
    step_source: str
    attempts: int
    budget_s: int
    attempts_needed: int | None = None
    finish_s: float | None = None  # from the job's start to the publish
    max_steps_that_fit: int | None = None

    @property
    def fits(self) -> bool:
        return self.attempts_needed is None or self.attempts_needed <= self.attempts

    def lines(self) -> list[str]:
        out = [f"plan: {self.steps:,} steps: {self.steps_source}" if self.steps is not None
               else f"plan: steps unknown: {self.steps_source}"]
        out.append(f"plan: {self.step_s:.2f} s per step assumed: {self.step_source}" if self.step_s is not None
                   else f"plan: step time unknown: {self.step_source}")
        avail = (f"plan: attempts available: {self.attempts} x {self.budget_s} s = {_hm(self.attempts * self.budget_s)} "
                 f"(job_max_retries {self.attempts - 1} + 1, task_timeout {self.budget_s} s); each attempt "
                 f"starts in about {_hm(SETUP_S)}, the last publishes in about {_hm(EXPORT_S)} (assumed here; "
                 "the job measures its own)")
        out.append(avail)
        if self.steps is not None and self.step_s is not None:
            out.append(f"plan: training {_hm(self.steps * self.step_s)}; "
                       + (f"fits: {self.attempts_needed} of {self.attempts} attempts, published about "
                          f"{_hm(self.finish_s or 0)} after the job starts" if self.fits else
                          f"does NOT fit: {self.attempts_needed} attempts needed, {self.attempts} available"))
        return out

    def problem(self) -> tuple[str, str] | None:
        """(what, fix) when the plan cannot fit, else None."""
        if self.fits:
            return None
        return (f"the fine-tuning plan cannot fit: {self.steps:,} steps of {self.step_s:.2f} s need "
                f"{self.attempts_needed} attempts of {self.budget_s} s; available: {self.attempts}",
                f"raise --job-max-retries (Cloud Run allows 10), a larger --task-timeout where the platform "
                f"allows it (Cloud Run caps GPU tasks at 3600 s), or train less: --max-steps "
                f"{self.max_steps_that_fit or 1} fits, or a smaller --dataset-limit; "
                f"--plan-tokens-per-second sets a measured throughput")


def planned_steps(cfg: Config) -> tuple[int | None, str, float]:
    """(optimizer steps, how they were counted, rows per step)."""
    gpus = max(cfg.gpu_count, 1)
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * gpus
    shape = (f"{per_step} rows per step (batch {cfg.train_batch_size} x accumulation "
             f"{cfg.gradient_accumulation_steps} x {gpus} GPU{'s' if gpus > 1 else ''})")
    if cfg.max_steps > 0:
        return cfg.max_steps, f"max_steps, {shape}", per_step
    rows: int | None = None
    where = cfg.dataset
    if cfg.dataset.startswith("synthetic:") and cfg.dataset.split(":", 1)[1].isdigit():
        rows = int(cfg.dataset.split(":", 1)[1])
    elif cfg.dataset in DATASET_ROWS:
        rows = DATASET_ROWS[cfg.dataset]
    if cfg.dataset_limit > 0:
        rows, where = (min(rows, cfg.dataset_limit) if rows else cfg.dataset_limit), f"dataset_limit of {cfg.dataset}"
    if rows is None:
        return None, (f"the size of {cfg.dataset} is not known before the job reads it; set max_steps or "
                      "dataset_limit to plan the run"), per_step
    train = rows * (1 - cfg.eval_fraction)
    steps = math.ceil(math.ceil(train / per_step) * cfg.num_train_epochs)
    return steps, (f"{rows:,} rows of {where}, {1 - cfg.eval_fraction:.0%} for training, {shape}, "
                   f"{cfg.num_train_epochs:g} epoch{'s' if cfg.num_train_epochs != 1 else ''}"), per_step


def step_time(cfg: Config, rows_per_step: float) -> tuple[float | None, str]:
    tokens = rows_per_step * TOKENS_PER_ROW
    what = f"{tokens:,.0f} tokens per step ({rows_per_step:g} rows x {TOKENS_PER_ROW} tokens, the mean measured on sql-create-context)"
    if cfg.plan_tokens_per_second > 0:
        rate, source = cfg.plan_tokens_per_second, "plan_tokens_per_second"
    elif cfg.gpu_count and cfg.gpu_type in TOKENS_PER_SECOND:
        rate = TOKENS_PER_SECOND[cfg.gpu_type] * cfg.gpu_count
        source = f"{cfg.gpu_type}, {THROUGHPUT_SOURCE[cfg.gpu_type]}" + (f", x {cfg.gpu_count} GPUs" if cfg.gpu_count > 1 else "")
    else:
        device = f"{cfg.gpu_count} x {cfg.gpu_type}" if cfg.gpu_count else "a CPU-only task"
        return None, f"sqltune has no throughput figure for {device}; set plan_tokens_per_second to plan the run"
    return tokens / rate, f"{what} at {rate:,.0f} tokens/s ({source})"


def plan(cfg: Config) -> Plan:
    steps, steps_source, per_step = planned_steps(cfg)
    step_s, step_source = step_time(cfg, per_step)
    attempts, budget = cfg.job_max_retries + 1, cfg.task_timeout
    base = Plan(steps, steps_source, step_s, step_source, attempts, budget)
    if steps is None or step_s is None:
        return base
    p = _project(cfg, steps, step_s)
    finish = SETUP_S + p.finish_in_s
    return Plan(steps, steps_source, step_s, step_source, attempts, budget, p.attempts_needed, finish,
                _most_steps(cfg, step_s, steps))


def _project(cfg: Config, steps: int, step_s: float) -> Projection:
    return project(now_s=SETUP_S, step=0, max_steps=steps, step_s=step_s, save_s=SAVE_S, setup_s=SETUP_S,
                   export_s=EXPORT_S, budget_s=cfg.task_timeout, save_steps=cfg.save_steps, attempt=0,
                   attempts=cfg.job_max_retries + 1)


def _most_steps(cfg: Config, step_s: float, upper: int) -> int:
    """The most steps the attempts available can train and publish (a bisection over the projection)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _project(cfg, mid, step_s).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _hm(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"

