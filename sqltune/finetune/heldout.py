"""The job's own check after training: generate SQL for held-out questions and report execution accuracy
(on databases synthesised from each schema, as `sqltune eval` scores), exact match and parse rate, each
overall and by kind of question (single-table vs multi-table), with a few samples, in sqltune.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqltune import logs

log = logs.get("heldout")


def normalise(sql: str) -> str:
    return " ".join(sql.strip().rstrip(";").split()).lower()


def parses(sql: str) -> bool:
    import sqlglot
    from sqlglot.errors import SqlglotError

    if not sql.strip():
        return False
    try:
        return sqlglot.parse_one(sql, read="sqlite") is not None
    except SqlglotError:
        return False


def sample(examples: list[Any], limit: int) -> list[Any]:
    """Up to `limit` held-out rows of each kind of source: rows on real databases and the others (a job on
    sql-create-context and Spider shows both figures side by side), in their order."""
    on_db = [ex for ex in examples if ex.db_id]
    other = [ex for ex in examples if not ex.db_id]
    if not on_db or not other:
        return examples[:limit]
    step = max(1, len(on_db) // limit)  # spread over the held-out databases, not the first one's questions
    return other[:limit] + on_db[::step][:limit]


# The reference tutorial's own sample question, with its two CREATE TABLEs as the tutorial gives them (a row of
# sql-create-context from Spider's student_assessment, a database sqltune holds out): printed after every run.
TUTORIAL = ("what are the first name and last name of all candidates?",
            "CREATE TABLE candidates (candidate_id VARCHAR); CREATE TABLE people (first_name VARCHAR, "
            "last_name VARCHAR, person_id VARCHAR)",
            "SELECT T2.first_name, T2.last_name FROM candidates AS T1 JOIN people AS T2 ON T1.candidate_id = "
            "T2.person_id")


def score(folder: Path, examples: list[Any], precision: Any, samples: int = 5,
          trained_on: Any = None, complete_joins: bool = True) -> dict[str, Any]:
    from sqltune.data.loading import Example
    from sqltune.engines import batch

    tutorial = Example(*TUTORIAL)
    # the folder as it is (its manifest is written after this check), on the server's transformers engine
    with batch.open_model(folder, engine="transformers", batch_size=16, precision=precision, resolve=False) as llm:
        predicted = llm.generate_sql([(ex.question, ex.context) for ex in [*examples, tutorial]])
    own = predicted
    if complete_joins:  # as eval, ask and serve answer (sqltune.sql.joins)
        from sqltune.sql.joins import with_joins

        predicted = [with_joins(sql, ex.context) for sql, ex in zip(own, [*examples, tutorial], strict=True)]
    result = summarise(examples, predicted[:-1], samples, own=own[:-1])
    from sqltune.evaluate.score import Item, Settings, score_example

    record = score_example(Item(0, tutorial.question, tutorial.context, tutorial.answer, predicted[-1]), Settings())
    result["tutorial"] = {"question": tutorial.question, "context": tutorial.context, "gold": tutorial.answer,
                          "predicted": predicted[-1], "ex": bool(record["ex"]),
                          "seen_in_training": None if trained_on is None else trained_on(tutorial.question)}
    return result


def _sample_rows(examples: list[Any], samples: int) -> list[int]:
    """The rows printed: the first ones, or, when some are on real databases, two others and the rest JOINs on
    the held-out databases."""
    on_db = [i for i, ex in enumerate(examples) if ex.db_id]
    if not on_db:
        return list(range(min(samples, len(examples))))
    joins = [i for i in on_db if " join " in examples[i].answer.lower()] or on_db
    other = [i for i, ex in enumerate(examples) if not ex.db_id][:2]
    return other + joins[: samples - len(other)]


def summarise(examples: list[Any], predicted: list[str], samples: int = 5, own: list[str] | None = None) -> dict[str, Any]:
    """The held-out figures of `predicted` against the examples' gold SQL: EX (executed on synthesised
    databases, sqltune.evaluate.score), exact match and parse rate, overall and per kind of question. `own`:
    the model's SQL before its joins were completed, where that changed it (sqltune.sql.joins)."""
    from sqltune.data.loading import kind_of
    from sqltune.evaluate.row_databases import RowDatabases
    from sqltune.evaluate.score import Item, Settings, score_example

    settings = Settings()
    rows = []
    on_db = {i: ex for i, ex in enumerate(examples) if ex.database}
    real = RowDatabases(on_db, timeout_s=settings.time_budget_s * 5) if on_db else None
    try:
        for i, (ex, p) in enumerate(zip(examples, predicted, strict=True)):
            item = Item(i, ex.question, ex.context, ex.answer, p)
            record = real.score([item])[0] if i in on_db and real is not None else score_example(item, settings)
            rows.append({"kind": kind_of(ex), "ex": bool(record["ex"]), "gold_ok": bool(record["gold_ok"]),
                         "exact": normalise(p) == normalise(ex.answer), "parses": parses(p),
                         "on_database": bool(ex.db_id), "completed": own is not None and own[i] != p})
    finally:
        if real is not None:
            real.close()

    def figures(subset: list[dict[str, Any]]) -> dict[str, Any]:
        n, scored = len(subset), [r for r in subset if r["gold_ok"]]
        return {"examples": n,
                "ex": round(sum(r["ex"] for r in scored) / len(scored), 4) if scored else None,
                "ex_scored": len(scored),  # a gold query that fails on its own schema is excluded, as in eval
                "exact_match": round(sum(r["exact"] for r in subset) / n, 4) if n else None,
                "parseable": round(sum(r["parses"] for r in subset) / n, 4) if n else None}

    overall = figures(rows)
    result = {
        **overall,
        "by_kind": {kind: figures([r for r in rows if r["kind"] == kind]) for kind in ("single_table", "multi_table")},
        **({"held_out_databases": {
            "all": figures([r for r in rows if r["on_database"]]),
            **{kind: figures([r for r in rows if r["on_database"] and r["kind"] == kind])
               for kind in ("single_table", "multi_table")}},
            "other_rows": {"all": figures([r for r in rows if not r["on_database"]]),
                           **{kind: figures([r for r in rows if not r["on_database"] and r["kind"] == kind])
                              for kind in ("single_table", "multi_table")}}}
           if any(r["on_database"] for r in rows) else {}),
        "samples": [{"question": examples[i].question, "gold": examples[i].answer, "predicted": predicted[i],
                     "ex": rows[i]["ex"], **({"db_id": examples[i].db_id} if examples[i].db_id else {})}
                    for i in _sample_rows(examples, samples)],
    }
    done = [r for r in rows if r["completed"]]
    if done:  # completion only changes SQL that cannot run, so a completed answer that is right was wrong before
        db_rows = [r for r in rows if r["on_database"] and r["gold_ok"]]
        result["joins_completed"] = {
            "answers": len(done), "right": sum(r["ex"] for r in done),
            "ex_model_sql_held_out_databases":
                round(sum(r["ex"] and not r["completed"] for r in db_rows) / len(db_rows), 4) if db_rows else None}
        logs.event(log, "joins completed", **result["joins_completed"])
    if "held_out_databases" in result:
        logs.event(log, "held-out check by source", ex_held_out_databases=result["held_out_databases"]["all"]["ex"],
                   ex_held_out_databases_multi_table=result["held_out_databases"]["multi_table"]["ex"],
                   examples_held_out_databases=result["held_out_databases"]["all"]["examples"],
                   ex_other_rows=result["other_rows"]["all"]["ex"],
                   ex_other_rows_single_table=result["other_rows"]["single_table"]["ex"])
    logs.event(log, "held-out check", examples=overall["examples"], ex=overall["ex"],
               exact_match=overall["exact_match"], parseable=overall["parseable"],
               **{f"ex_{k}": v["ex"] for k, v in result["by_kind"].items()},
               **{f"examples_{k}": v["examples"] for k, v in result["by_kind"].items()})
    return result
