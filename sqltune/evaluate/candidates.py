"""`sqltune eval --candidates K`: each example's answer chosen among its K candidates by execution.

    sqltune eval --model ./models/sql --dataset ../shared/data/sql-create-context/train.jsonl --split eval --candidates 4
    sqltune eval --predictions preds.jsonl --candidates 8      # lines with `candidates`: [greedy, sample, ...]

The candidates run read-only where the answer will be judged without ever seeing the gold query: on
databases synthesised from the example's schema and question (sqltune.sql.vote.on_synthesised), or
on the real database with --database (through the same translation and gate as `sqltune ask`).
The chosen one is scored as the prediction; the greedy one (the first candidate) is scored too
wherever the vote changed the answer, so the report shows what choosing gained and lost.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqltune import config, logs
from sqltune.errors import ConfigError, DataError
from sqltune.sql import vote
from sqltune.sql.schema import parse_schema

log = logs.get("eval")


def choose_for(cfg: config.Config, mode: str, examples: Sequence[Any], rows: list[dict[str, Any]] | None,
            preds: Sequence[Any], real_db: Any) -> list[Any] | None:
    """--candidates K: each example's answer voted among its first K candidates (sqltune.evaluate.candidates);
    an endpoint votes itself (its /v1/sql takes `candidates`), on databases synthesised from the schema."""
    if cfg.candidates > 1 and mode == "endpoint" and real_db is not None:
        raise ConfigError("--candidates with --endpoint and --database: the server votes on databases it "
                          "synthesises, not on yours", "use --model DIR to vote on the real database")
    if cfg.candidates <= 1 or mode == "endpoint":
        return None
    if mode == "predictions":
        lists = from_rows(rows or [], examples, cfg.eval_predictions)
    else:
        lists = [list(p.candidates) for p in preds] if preds and all(p.candidates for p in preds) else None
    if lists is None:
        raise ConfigError(f"--candidates {cfg.candidates}: {mode} gives one answer per question",
                          "pass --model DIR, or --predictions FILE whose lines carry `candidates` (greedy first)")
    pairs = [(ex.question, ex.context) for ex in examples]
    started = time.perf_counter()
    votes = choose_all(pairs, [c[:cfg.candidates] for c in lists], seed=cfg.seed,
                             time_budget_s=cfg.eval_query_timeout, row_cap=cfg.eval_row_cap, real_db=real_db)
    logs.event(log, "candidates voted", k=cfg.candidates, changed=sum(1 for v in votes if v.chosen != 0),
               fallback=sum(1 for v in votes if v.fallback), seconds=round(time.perf_counter() - started, 2))
    return votes


def choose_all(pairs: Sequence[tuple[str, str]], candidates: Sequence[Sequence[vote.Candidate]], *, seed: int = 0,
               time_budget_s: float = 1.0, row_cap: int = 1000, real_db: Any = None) -> list[vote.Vote]:
    """One vote per (question, context): on synthesised databases, or on `real_db` (DatabaseEval)."""
    if real_db is not None:
        return real_db.choose(pairs, candidates)
    out = []
    for (question, context), cands in zip(pairs, candidates, strict=True):
        try:
            schema = parse_schema(context)
        except DataError as e:  # nothing can run on an unreadable context: the greedy answer stands
            runs = tuple(vote.CandidateRun(i, c.sql, c.logprob, vote.EXECUTION, e.message) for i, c in enumerate(cands))
            out.append(vote.Vote(cands[0].sql, 0, len(cands), 0, 0, True, runs, f"context: {e.message}"))
            continue
        out.append(vote.choose(cands, schema, vote.on_synthesised(schema, question, seed=seed,
                                                                  time_budget_s=time_budget_s, row_cap=row_cap)))
    return out


def from_rows(rows: Sequence[dict[str, Any]], examples: Sequence[Any], path: str) -> list[list[vote.Candidate]] | None:
    """Candidates carried by a predictions file (`candidates`: a list of SQL, the greedy answer first; optional
    `logprobs` beside it), matched to the examples as the predictions are; None when no line has any."""
    if not any("candidates" in r for r in rows):
        return None

    def parse(n: int, row: dict[str, Any]) -> list[vote.Candidate]:
        sqls, logprobs = row.get("candidates"), row.get("logprobs")
        if not isinstance(sqls, list) or not sqls or not all(isinstance(s, str) for s in sqls):
            raise DataError(f"{path} line {n}: `candidates` must be a non-empty list of SQL strings",
                            "write each line's candidates as a JSON list, the greedy answer first")
        if len(sqls) > vote.MAX_CANDIDATES:
            raise DataError(f"{path} line {n}: {len(sqls)} candidates; at most {vote.MAX_CANDIDATES} are voted on",
                            f"keep the first {vote.MAX_CANDIDATES}")
        if logprobs is not None and (not isinstance(logprobs, list) or len(logprobs) != len(sqls)
                                     or not all(isinstance(x, (int, float)) for x in logprobs)):
            raise DataError(f"{path} line {n}: `logprobs` must be one number per candidate",
                            "drop `logprobs`, or give one cumulative log-probability per candidate")
        return [vote.Candidate(s, float(lp) if lp is not None else None)
                for s, lp in zip(sqls, logprobs or [None] * len(sqls), strict=True)]

    parsed = []
    for n, r in enumerate(rows, 1):
        if "candidates" not in r:
            raise DataError(f"{path} line {n} has no `candidates` while other lines do",
                            "give every line its candidates, or none")
        parsed.append(parse(n, r))
    if rows and all("question" in r and "context" in r for r in rows):
        by_key = {(str(r["question"]).strip(), str(r["context"]).strip()): c for r, c in zip(rows, parsed, strict=True)}
        return [by_key[(ex.question, ex.context)] for ex in examples]
    return parsed


def annotate(records: list[dict[str, Any]], votes: Sequence[vote.Vote], greedy: dict[int, dict[str, Any]]) -> None:
    """Each record gets its vote (`candidates`) and, where the vote changed the answer, the greedy answer's EX."""
    for record, v in zip(records, votes, strict=True):
        record["candidates"] = v.to_dict()
        scored = greedy.get(record["index"])
        record["greedy"] = v.runs[0].sql if v.runs else record["predicted"]
        record["ex_greedy"] = bool(scored["ex"]) if scored is not None else bool(record["ex"])


def summary(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """How the votes went, for the report: EX chosen vs greedy, answers changed, gained and lost."""
    voted = [r for r in records if r.get("candidates") and r["gold_ok"]]
    if not voted:
        return None
    n = len(voted)
    changed = [r for r in voted if r["candidates"]["chosen"] != 0]
    return {"k": max(r["candidates"]["candidates"] for r in voted), "examples": n,
            "ex": _rate(sum(r["ex"] for r in voted), n), "ex_greedy": _rate(sum(r["ex_greedy"] for r in voted), n),
            "changed": len(changed), "gained": sum(1 for r in changed if r["ex"] and not r["ex_greedy"]),
            "lost": sum(1 for r in changed if r["ex_greedy"] and not r["ex"]),
            "fallback": sum(1 for r in voted if r["candidates"]["fallback"]),
            "mean_ran": round(sum(r["candidates"]["ran"] for r in voted) / n, 3),
            "mean_agreed": round(sum(r["candidates"]["agreed"] for r in voted) / n, 3)}


def _rate(count: int, total: int) -> dict[str, Any]:
    return {"value": round(count / total, 4) if total else 0.0, "count": count, "total": total}
