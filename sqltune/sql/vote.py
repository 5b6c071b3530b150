"""Choose one answer among candidate queries by running them (self-consistency over executed results).

    vote = choose([Candidate(greedy_sql, -1.2), Candidate(sample_sql, -3.4), ...], schema,
                  on_synthesised(schema, question))          # or on_runner(run_one) for a real database
    vote.sql, vote.ran, vote.agreed                              # the answer, and how many ran and agreed

Each candidate is checked first (sqltune.sql.check: one read-only statement that parses and names only
the schema's tables and columns); those that fail, and those that fail to run, are dropped. The rest are
grouped by their results (sqltune.sql.results: multisets of rows, columns in any order, in order only
when both sort) and the answer is the most likely member of the largest group: ties between groups go
to the group whose best member is most likely, then to the earliest (the greedy answer comes first).
When nothing runs, the first candidate that was generated is returned as it is and `fallback` says so.

Without a real database, candidates run on small databases synthesised from the schema and the
question's words and numbers (sqltune.sql.synth_db), one planned from each distinct candidate, so the
conditions of every reading of the question hold on some rows and just miss on others: two
candidates agree only if they select the same rows on all of them. The gold query is never used.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlglot import exp

from sqltune.sql.check import check_sql
from sqltune.sql.results import is_ordered, same_result
from sqltune.sql.sandbox import ROW_LIMIT, RUNTIME, ExecResult, Sandbox
from sqltune.sql.schema import Schema, parse_sql
from sqltune.sql.synth_db import make_plan, synthesise

MAX_CANDIDATES = 16
# Why a candidate was dropped ("" = it ran): its generation failed, the checker refused it (does not
# parse, writes, names an unknown table or column, calls a denied function), or it failed to run.
GENERATION, INVALID, EXECUTION = "generation", "invalid", "execution"


@dataclass(frozen=True)
class Candidate:
    sql: str
    logprob: float | None = None  # cumulative log-probability of its tokens; None when the engine gives none
    error: str = ""  # the generation failed (the SQL is then empty or partial)


@dataclass(frozen=True)
class Checked:
    """A candidate that passed the checker: the text to run and its tree (to plan databases from)."""

    sql: str
    expression: exp.Expression


@dataclass(frozen=True)
class CandidateRun:
    index: int
    sql: str
    logprob: float | None
    failure: str  # "" when it ran, else GENERATION, INVALID or EXECUTION
    error: str
    group: int = -1  # the result group it joined; -1 when it did not run
    results: tuple[ExecResult, ...] = field(default=(), repr=False)  # one per database it ran on

    @property
    def ran(self) -> bool:
        return not self.failure

    @property
    def timed_out(self) -> bool:
        """It hit its time limit (or the question's deadline had passed before its turn)."""
        return any(r.timed_out for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "sql": self.sql, "logprob": _finite(self.logprob), "ran": self.ran,
                "failure": self.failure, "error": self.error, "group": self.group, "timed_out": self.timed_out}


@dataclass(frozen=True)
class Vote:
    sql: str  # the chosen answer
    chosen: int  # its index among the candidates
    candidates: int  # how many were generated
    ran: int  # how many passed the checker and ran
    agreed: int  # how many of those returned the chosen answer's result (0 on a fallback)
    fallback: bool  # nothing ran: the first (greedy) candidate, unchecked
    runs: tuple[CandidateRun, ...] = ()
    error: str = ""  # why nothing could run at all (a schema SQLite cannot build), "" otherwise

    @property
    def timed_out(self) -> list[int]:
        """Indices of the candidates that timed out (or never got their turn before the deadline)."""
        return [r.index for r in self.runs if r.timed_out]

    def to_dict(self, *, runs: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"candidates": self.candidates, "ran": self.ran, "agreed": self.agreed,
                               "chosen": self.chosen, "fallback": self.fallback}
        if self.timed_out:
            out["timed_out"] = self.timed_out
        if self.error:
            out["error"] = self.error
        if runs:
            out["runs"] = [r.to_dict() for r in self.runs]
        return out


# Runs checked candidates, returning for each one result per database (the same databases for all).
Execute = Callable[[Sequence[Checked]], list[tuple[ExecResult, ...]]]


def choose(candidates: Sequence[Candidate], schema: Schema, execute: Execute) -> Vote:
    """The answer whose executed result the most candidates share (see the module docstring)."""
    if not candidates:
        raise ValueError("choose() needs at least one candidate")
    runs: list[CandidateRun | None] = [None] * len(candidates)
    checked: dict[str, Checked] = {}  # one run per distinct text
    texts: list[str] = [""] * len(candidates)
    for i, c in enumerate(candidates):
        if c.error or not c.sql.strip():
            runs[i] = CandidateRun(i, c.sql, c.logprob, GENERATION, c.error or "no SQL was generated")
            continue
        verdict = check_sql(c.sql, schema)
        if not verdict.valid:
            runs[i] = CandidateRun(i, c.sql, c.logprob, INVALID, verdict.error or "refused by the checker")
            continue
        parsed = parse_sql(c.sql, schema)
        assert parsed.expression is not None  # check_sql parsed it
        texts[i] = parsed.sql(c.sql)
        checked.setdefault(texts[i], Checked(texts[i], parsed.expression))
    distinct = list(checked.values())
    results = dict(zip(checked, execute(distinct), strict=True)) if distinct else {}
    groups: list[list[int]] = []  # candidate indices per result group, first member = representative
    for i, c in enumerate(candidates):
        if runs[i] is not None:
            continue
        outcome = results[texts[i]]
        failed = next((r for r in outcome if not _answers(r)), None)
        if failed is not None or not outcome:
            error = failed.error if failed is not None else "no database to run on"
            runs[i] = CandidateRun(i, c.sql, c.logprob, EXECUTION, error, results=outcome)
            continue
        ordered = is_ordered(texts[i], checked[texts[i]].expression)
        group = next((g for g, members in enumerate(groups) if _agree(outcome, ordered, members[0], texts, checked,
                                                                        results)), -1)
        if group < 0:
            groups.append([])
            group = len(groups) - 1
        groups[group].append(i)
        runs[i] = CandidateRun(i, c.sql, c.logprob, "", "", group, outcome)
    done = tuple(r for r in runs if r is not None)
    if not groups:
        errors = {r.error for r in done if r.failure == EXECUTION}
        shared = next(iter(errors)) if len(errors) == 1 and all(r.failure == EXECUTION for r in done) else ""
        first = next((r.index for r in done if r.failure != GENERATION), 0)  # greedy, unless it failed to generate
        return Vote(candidates[first].sql, first, len(candidates), 0, 0, True, done, shared)
    best = max(range(len(groups)), key=lambda g: (len(groups[g]), *_likelihood(candidates, groups[g])))
    chosen = max(groups[best], key=lambda i: _rank(candidates, i))
    return Vote(candidates[chosen].sql, chosen, len(candidates), sum(len(g) for g in groups), len(groups[best]),
                False, done)


def _answers(result: ExecResult) -> bool:
    """A result that answers: it ran (a result cut at the row cap still answers, as in `sqltune ask`)."""
    return result.ok or result.error_kind == ROW_LIMIT


def _agree(outcome: tuple[ExecResult, ...], ordered: bool, other: int, texts: list[str],
           checked: dict[str, Checked], results: dict[str, tuple[ExecResult, ...]]) -> bool:
    theirs = results[texts[other]]
    both = ordered and is_ordered(texts[other], checked[texts[other]].expression)
    return len(theirs) == len(outcome) and all(
        same_result(a.rows, b.rows, gold_width=len(a.columns), pred_width=len(b.columns), ordered=both)
        for a, b in zip(outcome, theirs, strict=True))


def _rank(candidates: Sequence[Candidate], i: int) -> tuple[float, int]:
    lp = candidates[i].logprob
    return (lp if lp is not None and math.isfinite(lp) else -math.inf), -i


def _likelihood(candidates: Sequence[Candidate], members: list[int]) -> tuple[float, int]:
    return max(_rank(candidates, i) for i in members)


def _finite(value: float | None) -> float | None:
    return round(value, 4) if value is not None and math.isfinite(value) else None


# --- where candidates run ------------------------------------------------------------------------------


def on_synthesised(schema: Schema, question: str = "", *, databases: int = 4, seed: int = 0,
                   time_budget_s: float = 1.0, row_cap: int = 1000) -> Execute:
    """Run candidates on databases synthesised from the schema and the question: one planned from each
    distinct candidate (the first `databases` of them), at least two, each with its own seed."""

    def execute(checked: Sequence[Checked]) -> list[tuple[ExecResult, ...]]:
        plans = [make_plan(schema, c.expression, question) for c in checked[:databases]]
        plans = plans or [make_plan(schema, None, question)]
        while len(plans) < min(2, databases):
            plans.append(plans[0])  # a second seed of the same plan: other random rows and twins
        boxes: list[Sandbox] = []
        try:
            for k, plan in enumerate(plans):
                boxes.append(Sandbox(schema.ddl(), synthesise(plan, seed + 7919 * k), time_budget_s=time_budget_s,
                                     row_cap=row_cap))
        except sqlite3.Error as e:  # a schema sqlglot reads but SQLite will not build: nothing can run
            for box in boxes:
                box.close()
            failed = ExecResult(ok=False, error_kind=RUNTIME, error=f"SQLite cannot build these tables: {e}")
            return [(failed,) for _ in checked]
        try:
            return [tuple(box.run(c.sql) for box in boxes) for c in checked]
        finally:
            for box in boxes:
                box.close()

    return execute


def on_runner(run: Callable[[str], ExecResult]) -> Execute:
    """Run candidates one by one on a real database (`run` applies its own gate and translation)."""

    def execute(checked: Sequence[Checked]) -> list[tuple[ExecResult, ...]]:
        return [(run(c.sql),) for c in checked]

    return execute
