"""With --time-schedule, the learning-rate schedule of a run with max_train_minutes runs over whichever ends
training first, steps or time, and goes on from its checkpoint's progress after a resume; without it, the
schedule is transformers' own.

    pytest tests/test_schedule.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sqltune.artifacts import manifests
from sqltune.finetune import schedule
from sqltune.finetune.schedule import BudgetSchedule, factor
from tests.conftest import log_events, run_sqltune


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(schedule.time, "monotonic", c)
    return c


def _optimizer(lr: float = 1e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _step(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    scheduler.optimizer.step()
    scheduler.step()
    return scheduler.get_last_lr()[0]


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        _step(scheduler)
    return out


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant_with_warmup", "constant"])
def test_without_a_time_budget_it_is_transformers_schedule(kind: str) -> None:
    from transformers import get_scheduler

    warmup = 0 if kind == "constant" else 4
    theirs = get_scheduler(kind, optimizer=_optimizer(), num_warmup_steps=warmup, num_training_steps=20)
    ours = BudgetSchedule(_optimizer(), kind, warmup / 20, max_steps=20, max_s=0)
    assert _lrs(ours, 20) == pytest.approx(_lrs(theirs, 20), abs=1e-9)


def test_the_time_budget_anneals_the_rate_before_the_planned_steps(clock: Clock) -> None:
    s = BudgetSchedule(_optimizer(), "cosine", 0.1, max_steps=100_000, max_s=600)
    clock.now += 30  # 5% of the time: halfway through the warm-up
    assert _lrs(s, 1) == [0.0] and s.get_last_lr()[0] == pytest.approx(0.5e-3)
    clock.now += 30 + 270  # 55% of the time: halfway down the cosine
    assert _step(s) == pytest.approx(0.5e-3)
    clock.now += 300  # the budget is spent at step 3 of 100,000: annealed
    assert _step(s) == 0.0
    assert factor("cosine", 1.0, 0.1) == 0.0 and factor("linear", 0.55, 0.1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="polynomial"):
        factor("polynomial", 0.5, 0.0)


def test_steps_still_end_the_schedule_when_they_come_first(clock: Clock) -> None:
    s = BudgetSchedule(_optimizer(), "linear", 0.0, max_steps=10, max_s=3600)
    lrs = _lrs(s, 11)
    assert lrs[5] == pytest.approx(0.5e-3) and lrs[10] == 0.0  # no time passed: the steps set the pace


def test_a_resumed_attempt_goes_on_from_its_checkpoint_s_progress(clock: Clock) -> None:
    s = BudgetSchedule(_optimizer(), "linear", 0.0, max_steps=100_000, max_s=600)
    clock.now += 360
    _step(s)  # 60% of the first attempt's budget
    state = s.state_dict()
    clock.now += 5000  # the job is restarted much later
    resumed = BudgetSchedule(_optimizer(), "linear", 0.0, max_steps=100_000, max_s=600)
    resumed.load_state_dict(state)
    assert _step(resumed) == pytest.approx(0.4e-3)  # no jump back to the peak, none to the end
    clock.now += 300  # half of its own budget: half of what was left
    assert _step(resumed) == pytest.approx(0.2e-3)


def test_a_timed_checkpoint_resumed_without_a_cap_finishes_the_planned_steps(clock: Clock) -> None:
    from transformers import get_scheduler

    timed = BudgetSchedule(_optimizer(), "linear", 0.0, max_steps=100, max_s=600)
    clock.now += 600
    assert _step(timed) == 0.0  # the cap annealed it at step 1
    untimed = BudgetSchedule(_optimizer(), "linear", 0.0, max_steps=100, max_s=0)  # --max-train-minutes 0
    untimed.load_state_dict(timed.state_dict())
    assert _step(untimed) == pytest.approx(0.98e-3)  # step 2 of 100 on the step schedule
    # and a checkpoint of transformers' own schedule (a run before this scheduler) resumes on its step
    theirs = get_scheduler("linear", optimizer=_optimizer(), num_warmup_steps=0, num_training_steps=100)
    _lrs(theirs, 50)
    ours = BudgetSchedule(_optimizer(), "linear", 0.0, max_steps=100, max_s=0)
    ours.load_state_dict(theirs.state_dict())
    assert _step(ours) == pytest.approx(_step(theirs))


@pytest.mark.slow
def test_a_job_cut_by_its_time_cap_ends_with_an_annealed_learning_rate(tmp_path: Path) -> None:
    out = tmp_path / "timed"
    proc = run_sqltune("finetune", "--model", "tiny", "--tiny-layers", "1", "--dataset", "synthetic:400",
                       "--train-batch-size", "4", "--max-seq-length", "128", "--eval-generate-limit", "0",
                       "--logging-steps", "1", "--learning-rate", "0.003", "--warmup-ratio", "0.1",
                       "--max-steps", "100000", "--max-train-minutes", "0.05", "--time-schedule", "--save-steps", "100000",
                       "--output", str(out))
    lrs = [e["lr"] for e in log_events(proc.stderr, "train step") if "lr" in e]
    cut = manifests.read_meta(out)["metrics"]["cut_short"]
    assert 3 <= cut["steps_run"] < 100_000 and len(lrs) >= 3
    assert max(lrs) > 0.5 * 0.003  # it warmed up to near the peak within the three seconds
    assert lrs[-1] < 0.05 * 0.003, lrs  # and came down to the end of the cosine when the time ran out
