"""The job's own check after training: generate SQL for held-out questions and report exact match
and parse rate, with a few samples, in sqltune.json (`sqltune eval` measures execution accuracy)."""

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
    exact = sum(normalise(p) == normalise(ex.answer) for p, ex in zip(predicted, examples, strict=True))
    valid = sum(parses(p) for p in predicted)
    n = len(examples)
    result = {
        "examples": n,
        "exact_match": round(exact / n, 4),
        "parseable": round(valid / n, 4),
        "samples": [{"question": ex.question, "gold": ex.answer, "predicted": p}
                    for ex, p in zip(examples[:samples], predicted[:samples], strict=True)],
    }
    logs.event(log, "held-out check", examples=n, exact_match=result["exact_match"], parseable=result["parseable"])
    return result
