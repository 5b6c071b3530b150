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


def score(folder: Path, examples: list[Any], precision: Any, samples: int = 5) -> dict[str, Any]:
    from sqltune.engines import batch

    # the folder as it is (its manifest is written after this check), on the server's transformers engine
    with batch.open_model(folder, engine="transformers", batch_size=16, precision=precision, resolve=False) as llm:
        predicted = llm.generate_sql([(ex.question, ex.context) for ex in examples])
    return summarise(examples, predicted, samples)


def summarise(examples: list[Any], predicted: list[str], samples: int = 5) -> dict[str, Any]:
    """The held-out figures of `predicted` against the examples' gold SQL: EX (executed on synthesised
    databases, sqltune.evaluate.score), exact match and parse rate, overall and per kind of question."""
    from sqltune.data.loading import table_kind
    from sqltune.evaluate.score import Item, Settings, score_example

    settings = Settings()
    rows = []
    for i, (ex, p) in enumerate(zip(examples, predicted, strict=True)):
        record = score_example(Item(i, ex.question, ex.context, ex.answer, p), settings)
        rows.append({"kind": table_kind(ex.context, ex.answer), "ex": bool(record["ex"]),
                     "gold_ok": bool(record["gold_ok"]), "exact": normalise(p) == normalise(ex.answer),
                     "parses": parses(p)})

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
        "samples": [{"question": ex.question, "gold": ex.answer, "predicted": p, "ex": r["ex"]}
                    for ex, p, r in zip(examples[:samples], predicted[:samples], rows[:samples], strict=True)],
    }
    logs.event(log, "held-out check", examples=overall["examples"], ex=overall["ex"],
               exact_match=overall["exact_match"], parseable=overall["parseable"],
               **{f"ex_{k}": v["ex"] for k, v in result["by_kind"].items()},
               **{f"examples_{k}": v["examples"] for k, v in result["by_kind"].items()})
    return result
