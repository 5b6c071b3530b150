"""The arithmetic of the attempt model, shared by the job (attempts.py) and the deployment plan
(deploy/plan.py); no torch here, so `sqltune deploy` stays fast.

    python -c "from sqltune.finetune.budget import project; print(project(now_s=300, step=0, max_steps=4813, step_s=0.57, save_s=30, setup_s=300, export_s=600, budget_s=3600, save_steps=200, attempt=0, attempts=4))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def reserve_s(budget_s: float) -> float:
    """Seconds kept free at the end of every attempt beyond the measured costs: the exit itself, a slow
    upload, the platform's own stop. 2% of the budget, at least 2 s (72 s of an hour)."""
    return max(2.0, 0.02 * budget_s)


def must_stop(elapsed_s: float, step_s: float, save_s: float, budget_s: float) -> bool:
    """True when one more step and the checkpoint saved after it would not end inside the budget."""
    return elapsed_s + step_s + save_s + reserve_s(budget_s) > budget_s


@dataclass(frozen=True)
class Projection:
    """What the rest of the run looks like from here, with the costs measured so far."""

    steps_this_attempt: int  # more steps this attempt can still train
    remaining_after: int  # steps left for later attempts
    attempts_needed: int  # in all, this one and the ones before included
    attempts_available: int
    finish_in_s: float  # from now until the last attempt has published (an estimate)

    @property
    def fits(self) -> bool:
        return self.attempts_needed <= self.attempts_available


def project(*, now_s: float, step: int, max_steps: int, step_s: float, save_s: float, setup_s: float,
            export_s: float, budget_s: float, save_steps: int, attempt: int, attempts: int) -> Projection:
    """Pure arithmetic of the attempt model; `now_s` is the time since this attempt started."""
    per_step = step_s + save_s / max(save_steps, 1)  # the periodic checkpoints, spread over the steps
    spare = reserve_s(budget_s) + save_s
    remaining = max(max_steps - step, 0)
    here = min(remaining, max(int((budget_s - now_s - spare) // per_step), 0))
    after = remaining - here
    per_attempt = max(int((budget_s - setup_s - spare) // per_step), 1)
    more = math.ceil(after / per_attempt) if after else 0
    if not more and now_s + here * per_step + export_s + reserve_s(budget_s) > budget_s:
        more = 1  # the steps fit but merge and publish do not: a fresh attempt publishes
    if more:
        last = after - (more - 1) * per_attempt if after else 0
        finish = (budget_s - now_s) + (more - 1) * budget_s + setup_s + last * per_step + export_s
    else:
        finish = here * per_step + export_s
    return Projection(here, after, attempt + 1 + more, attempts, round(finish, 1))
