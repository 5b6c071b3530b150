"""Rewards of `--method grpo`: a completion is worth what its SQL returns, executed by sqltune's own sandbox.

    scorer = Scorer(Limits(timeout_s=1.0, row_cap=1000), workers=2)
    [outcome] = scorer.score([Task(sql, gold, context, database="shop.sqlite")])   # Outcome(ex=True, ...)
    funcs, weights = build(["execution", "format:0.2"], scorer, runs=0.1, template=t, eos_ids=[2])

Execution follows the EX rule of `sqltune eval`: on the row's real database when it has one (opened read-only,
the SQL translated and gated as `sqltune eval --database` does, sqltune.evaluate.database), else on databases
synthesised from its schema (sqltune.evaluate.score). Completions run in worker processes, each query within the
sandbox's time and row limits, so a cross join or a runaway recursive CTE costs its budget and scores 0; a worker
that stops answering altogether is replaced after a backstop and its completions score 0 too. A row whose gold
query fails scores None: TRL gives such a completion no advantage, so a broken row teaches nothing.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqltune.errors import ConfigError, DataError

NAMES = ("execution", "format", "schema")
WORKER_LOST = "worker_lost"  # the error kind of a completion whose worker passed the backstop
MAX_WORKERS = 8


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 1.0
    row_cap: int = 1000
    databases: int = 3  # synthesised databases per row (test-suite K, as `sqltune eval`)


@dataclass(frozen=True)
class Task:
    sql: str  # the SQL of one completion, as inference extracts it
    gold: str
    context: str
    database: str = ""  # a SQLite file or database URL; "" = databases synthesised from the context
    question: str = ""


@dataclass(frozen=True)
class Outcome:
    ex: bool  # the rows equal the gold query's
    executable: bool  # it parsed and ran
    gold_ok: bool  # the gold query itself ran; otherwise the row says nothing about the completion
    error_kind: str = ""
    timed_out: bool = False


def parse_rewards(spec: Sequence[str]) -> list[tuple[str, float]]:
    """`["execution", "format:0.2"]` -> [("execution", 1.0), ("format", 0.2)]; fails naming the flag."""
    out: list[tuple[str, float]] = []
    for item in spec:
        name, _, weight = item.partition(":")
        name = name.strip()
        if name not in NAMES:
            raise ConfigError(f"--grpo-rewards: {name!r} is not a reward function", f"use some of: {', '.join(NAMES)}")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(f"--grpo-rewards: weight {weight!r} of {name} is not a number", "write e.g. format:0.2")
        if name in (n for n, _ in out):
            raise ConfigError(f"--grpo-rewards: {name} is given twice", "name each reward function once")
        out.append((name, value))
    if not out:
        raise ConfigError("--grpo-rewards is empty", "use execution (and optionally format, schema)")
    return out


# --- in the worker processes ------------------------------------------------------------------------

_LIMITS = Limits()
_OPEN: dict[str, Any] = {}  # database -> (Database, Schema, runner), opened once per worker


def _init(limits: Limits, parent: int) -> None:
    global _LIMITS
    _LIMITS = limits
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """End this worker once the trainer is gone: a SIGKILLed job leaves no workers behind to hold its databases."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def execute(task: Task, limits: Limits | None = None) -> Outcome:
    """The outcome of one completion (runs in a worker; callable in-process for a check)."""
    limits = limits or _LIMITS
    if task.database:
        return _on_database(task, limits)
    from sqltune.evaluate.score import Item, Settings, score_example

    record = score_example(Item(0, task.question, task.context, task.gold, task.sql),
                           Settings(databases=limits.databases, time_budget_s=limits.timeout_s, row_cap=limits.row_cap))
    return Outcome(ex=bool(record["ex"]), executable=bool(record["executable"]), gold_ok=bool(record["gold_ok"]),
                   error_kind=record["error_kind"] or record["gold_error_kind"], timed_out=bool(record["timed_out"]))


def _opened(database: str, limits: Limits) -> Any:
    if database not in _OPEN:
        from sqltune.db import introspect
        from sqltune.db.connect import connect
        from sqltune.db.execute import open_runner

        db = connect(database)
        schema = introspect.introspect(db).to_schema()
        _OPEN[database] = (db, schema, open_runner(db, timeout_s=limits.timeout_s, row_cap=limits.row_cap).runner)
    return _OPEN[database]


@functools.lru_cache(maxsize=4096)
def _gold(database: str, gold: str, limits: Limits) -> tuple[Any, bool]:
    """The gold query's result on the database, and whether its row order counts (one run per worker)."""
    import sqlglot

    from sqltune.db import dialect
    from sqltune.evaluate.metrics import is_ordered

    db, schema, runner = _opened(database, limits)
    t = dialect.translate(gold, schema, source="sqlite", target=db.dialect)
    try:
        tree = sqlglot.parse_one(gold, read="sqlite")
    except Exception:  # sqlglot raises several types for SQL it cannot read; the order rule then reads the text
        tree = None
    from sqltune.sql.sandbox import ExecResult

    result = runner.run(t.sql) if t.ok else ExecResult(ok=False, error_kind=t.error_kind, error=t.error)
    return result, is_ordered(gold, tree)


def _on_database(task: Task, limits: Limits) -> Outcome:
    from sqltune.db import dialect
    from sqltune.evaluate.metrics import same_result

    db, schema, runner = _opened(task.database, limits)
    gold, ordered = _gold(task.database, task.gold, limits)
    if not gold.ok:
        return Outcome(ex=False, executable=False, gold_ok=False, error_kind=gold.error_kind)
    t = dialect.translate(task.sql, schema, source="sqlite", target=db.dialect)
    if not t.ok:
        return Outcome(ex=False, executable=False, gold_ok=True, error_kind=t.error_kind)
    result = runner.run(t.sql)
    if not result.ok:
        return Outcome(ex=False, executable=False, gold_ok=True, error_kind=result.error_kind,
                       timed_out=result.timed_out)
    ex = same_result(gold.rows, result.rows, gold_width=len(gold.columns), pred_width=len(result.columns),
                     ordered=ordered)
    return Outcome(ex=ex, executable=True, gold_ok=True)


# --- in the training process ------------------------------------------------------------------------

class Scorer:
    """A pool of spawned worker processes that execute completions (spawned, not forked: the trainer holds
    a model whose OpenMP threads a fork would copy mid-flight). Started at the first batch, kept for the run."""

    def __init__(self, limits: Limits, workers: int = 0) -> None:
        self.limits = limits
        self.workers = workers or min(MAX_WORKERS, os.cpu_count() or 1)
        self._pool: Any = None

    def _start(self) -> Any:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ctx.Pool(self.workers, initializer=_init, initargs=(self.limits, os.getpid()))
        return self._pool

    def backstop_s(self, tasks: int) -> float:
        """How long a batch may take before its unanswered completions score 0: every query of every task at
        its full budget (a synthesised row runs its gold on up to 4 seeds per database), plus start-up."""
        per_task = self.limits.timeout_s * (self.limits.databases * 6) + 1.0
        return per_task * math.ceil(tasks / self.workers) + 30.0

    def score(self, tasks: Sequence[Task]) -> list[Outcome]:
        if not tasks:
            return []
        pool = self._start()
        # completions come grouped by question; a group on one worker runs its gold query once there
        pending = [pool.apply_async(execute, (t,)) for t in tasks]
        deadline = time.monotonic() + self.backstop_s(len(tasks))
        out: list[Outcome] = []
        lost = False
        for job in pending:
            try:
                out.append(job.get(timeout=max(0.0, deadline - time.monotonic())))
            except multiprocessing.TimeoutError:
                lost = True
                out.append(Outcome(ex=False, executable=False, gold_ok=True, error_kind=WORKER_LOST, timed_out=True))
        if lost:
            self.close()  # a worker stuck past every budget: a fresh pool for the next batch
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


class ExecutionReward:
    """1 when the rows equal the gold's, `runs` when the query parses and runs, 0 otherwise; None when the
    row's own gold query fails. Logs the seconds it took and the share of timeouts."""

    __name__ = "execution"

    def __init__(self, scorer: Scorer, runs: float, extract: Callable[[str], str]) -> None:
        self.scorer, self.runs, self.extract = scorer, runs, extract

    def __call__(self, prompts: list[Any], completions: list[str], gold: list[str], context: list[str],
                 database: list[str], question: list[str], log_metric: Any = None, **_: Any) -> list[float | None]:
        tasks = [Task(self.extract(c), g, ctx, db, q)
                 for c, g, ctx, db, q in zip(completions, gold, context, database, question, strict=True)]
        outcomes = self.scorer.score(tasks)
        if log_metric is not None:
            log_metric("execution/ex", sum(o.ex for o in outcomes) / len(outcomes))
            log_metric("execution/runs", sum(o.executable for o in outcomes) / len(outcomes))
            log_metric("execution/timeouts", sum(o.timed_out for o in outcomes) / len(outcomes))
            log_metric("execution/gold_failed", sum(not o.gold_ok for o in outcomes) / len(outcomes))
        return [None if not o.gold_ok else 1.0 if o.ex else self.runs if o.executable else 0.0 for o in outcomes]


class FormatReward:
    """1 when the completion is one statement and then ends (EOS before the length limit, nothing after the
    SQL but an optional `;`): what inference cuts, the model should not have to be cut at."""

    __name__ = "format"

    def __init__(self, eos_ids: Sequence[int], extract: Callable[[str], str]) -> None:
        self.eos_ids, self.extract = set(eos_ids), extract

    def __call__(self, prompts: list[Any], completions: list[str], completion_ids: list[list[int]],
                 **_: Any) -> list[float]:
        out = []
        for text, ids in zip(completions, completion_ids, strict=True):
            sql = self.extract(text)
            ended = bool(ids) and ids[-1] in self.eos_ids
            out.append(1.0 if ended and sql and " ".join(text.strip().rstrip(";").split()) == sql else 0.0)
        return out


class SchemaReward:
    """1 when the SQL is one read-only statement naming only the context's tables and columns (sqltune.sql.check,
    the checker `valid` means everywhere), 0 otherwise; None for a row whose context does not parse."""

    __name__ = "schema"

    def __init__(self, extract: Callable[[str], str]) -> None:
        self.extract = extract

    def __call__(self, prompts: list[Any], completions: list[str], context: list[str],
                 **_: Any) -> list[float | None]:
        from sqltune.sql.check import check_sql

        out: list[float | None] = []
        for text, ctx in zip(completions, context, strict=True):
            schema = _schema(ctx)
            out.append(None if schema is None else float(check_sql(self.extract(text), schema).valid))
        return out


@functools.lru_cache(maxsize=1024)
def _schema(context: str) -> Any:
    from sqltune.sql.schema import parse_schema

    try:
        return parse_schema(context)
    except DataError:
        return None


def build(spec: Sequence[str], scorer: Scorer, *, runs: float, extract: Callable[[str], str],
          eos_ids: Sequence[int]) -> tuple[list[Any], list[float]]:
    """The reward functions named by --grpo-rewards, and their weights, for TRL's GRPOTrainer."""
    made = {"execution": lambda: ExecutionReward(scorer, runs, extract),
            "format": lambda: FormatReward(eos_ids, extract),
            "schema": lambda: SchemaReward(extract)}
    chosen = parse_rewards(spec)
    return [made[name]() for name, _ in chosen], [weight for _, weight in chosen]
