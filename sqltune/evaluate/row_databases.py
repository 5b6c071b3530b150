"""Execution accuracy on each row's own database: `sqltune eval --dataset spider:DIR`, and the job's held-out
check for rows on real databases.

    sqltune eval --model ./models/smollm2-135m-sql --dataset spider:../shared/data/spider-train --split eval

Each row (sqltune.data.databases: the Spider / BIRD layout, or --database pairs) names the SQLite file or
URL its gold query runs on; predicted and gold SQL run there read-only, translated and gated as `ask`
runs SQL, under --db-timeout and the row cap, and are compared by the result rule of Spider and BIRD
(multisets; order only under the gold's ORDER BY: sqltune.evaluate.metrics). A row whose database has
no file (a schema from tables.json only) is scored on databases synthesised from its context, as any
other row. Records carry the row's db_id, kind (single- / multi-table) and Spider hardness, so the
report breaks EX down by each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqltune import logs
from sqltune.data import loading
from sqltune.data.databases import Databases
from sqltune.evaluate.database import score_one
from sqltune.evaluate.hardness import hardness
from sqltune.sql import vote
from sqltune.sql.sandbox import ExecResult

log = logs.get("eval")


def has_databases(examples: Sequence[Any]) -> bool:
    return any(getattr(ex, "database", "") for ex in examples)


class RowDatabases:
    """The databases of an evaluation's rows, each opened read-only once, keyed by the rows' positions."""

    def __init__(self, examples: dict[int, Any], *, timeout_s: float = 10.0, row_cap: int = 1000,
                 written: str = "sqlite", keys: bool = True, settings: Any = None) -> None:
        self.examples, self.written, self.settings = examples, written, settings
        self.dbs = Databases(keys=keys, timeout_s=timeout_s, row_cap=row_cap)
        self.order: list[int] = []  # positions of the rows `choose` gets its pairs for, in that order

    def describe(self) -> dict[str, Any]:
        names = {ex.db_id for ex in self.examples.values() if ex.database}
        return {"engine": "sqlite", "database": f"each row's own database ({len(names)} databases)",
                "databases": len(names)}

    def _annotate(self, record: dict[str, Any], ex: Any) -> dict[str, Any]:
        return {**record, "db_id": ex.db_id, "kind": loading.kind_of(ex), "hardness": hardness(ex.answer)}

    def score(self, items: Sequence[Any]) -> list[dict[str, Any]]:
        from sqltune.evaluate.score import Settings, score_example

        records = []
        step = max(1, len(items) // 10)
        for n, item in enumerate(items, 1):
            ex = self.examples[item.index]
            if ex.database:
                db, schema, runner = self.dbs.get(ex.database)
                record = score_one(runner, db, schema.to_schema(), item, self.written)
            else:
                record = score_example(item, self.settings or Settings())
            records.append(self._annotate(record, ex))
            if n % step == 0 or n == len(items):
                logs.event(log, "scoring", done=n, total=len(items),
                           ex_so_far=round(sum(r["ex"] for r in records) / n, 4))
        return records

    def choose(self, pairs: Sequence[tuple[str, str]], candidates: Sequence[Sequence[vote.Candidate]]) -> list[vote.Vote]:
        """--candidates: each row's candidates voted on by running them on its own database."""
        from sqltune.db import dialect
        from sqltune.evaluate.candidates import choose_all

        votes = []
        for position, (question, context), cands in zip(self.order, pairs, candidates, strict=True):
            ex = self.examples[position]
            if not ex.database:  # synthesised databases, as for any row without one
                votes += choose_all([(question, context)], [cands])
                continue
            db, schema, runner = self.dbs.get(ex.database)
            tables = schema.to_schema()

            def run(sql: str, db: Any = db, tables: Any = tables, runner: Any = runner) -> ExecResult:
                t = dialect.translate(sql, tables, source=self.written, target=db.dialect)
                return runner.run(t.sql) if t.ok else ExecResult(ok=False, error_kind=t.error_kind, error=t.error)

            votes.append(vote.choose(cands, tables, vote.on_runner(run)))
        return votes

    def close(self) -> None:
        self.dbs.close()
