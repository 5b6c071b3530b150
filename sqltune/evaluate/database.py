"""Execution accuracy on a real database: `sqltune eval --database URL`.

    sqltune eval --model ./models/sql --dataset my_questions.jsonl --database postgresql://reader@host/shop
    sqltune eval --predictions preds.jsonl --database ./shop.sqlite        # lines with question, gold, predicted

The questions need only `question` and `answer` (the gold SQL, in --db-dialect like the model's):
the context each question is asked with is read from the database (sqltune.db.introspect, cut
to --db-context-chars per question). Gold and predicted SQL both go through the same dialect
translation and gate as `sqltune ask`, and run read-only on the database; the results are
compared by the same rules as the synthesised-database evaluation (sqltune.evaluate.metrics:
multisets, order only under the gold's ORDER BY). Records have the same fields, so reports,
--compare and merge read them unchanged; the report names the engine and database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqltune import config, logs
from sqltune.data import loading
from sqltune.db import dialect, introspect
from sqltune.db.connect import connect, warn_if_writable
from sqltune.db.execute import open_runner
from sqltune.errors import ConfigError, DataError
from sqltune.evaluate import metrics
from sqltune.sql import check, vote
from sqltune.sql.sandbox import EMPTY, MULTIPLE, SYNTAX, ExecResult

log = logs.get("eval")


class DatabaseEval:
    """One database for a whole evaluation: its schema read once, one read-only connection."""

    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.db = connect(cfg.database, schema=cfg.db_schema)
        self.warning = warn_if_writable(db=self.db)
        self.db_schema = introspect.introspect(self.db, keys=cfg.db_keys)
        self.schema = self.db_schema.to_schema()
        self._contexts: dict[str, introspect.Selection] = {}
        logs.event(log, "evaluating on a real database", **self.describe())

    def describe(self) -> dict[str, Any]:
        return {**self.db.describe(), "tables": len(self.db_schema.tables), "dialect_written": self.cfg.db_dialect}

    def selection(self, question: str) -> introspect.Selection:
        if question not in self._contexts:
            chars = self.cfg.db_context_chars
            self._contexts[question] = introspect.select_tables(self.db_schema, question, lambda c: len(c) <= chars)
        return self._contexts[question]

    def with_contexts(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Prediction rows with the database's context for their question (what the examples carry)."""
        return [{**r, "context": self.selection(str(r["question"]).strip()).context} if r.get("question") else r
                for r in rows]

    def examples(self, cfg: config.Config, sources: Mapping[str, str], mode: str,
                 rows: list[dict[str, Any]] | None) -> tuple[list[loading.Example], dict[str, Any]]:
        """The questions with their gold SQL and the database's context, and their description."""
        if mode == "predictions" and "dataset" not in sources:
            source, raw = cfg.eval_predictions, [{**r, "answer": r.get("gold", r.get("answer"))} for r in rows or []]
            mapping = {f: f for f in loading.FIELDS}
        elif "dataset" in sources:
            source, raw = cfg.dataset, loading.read_rows(cfg.dataset, cfg.dataset_split, cfg.seed)
            mapping = loading.parse_columns(cfg.column_map)
        else:
            raise ConfigError("--database needs the questions to ask it", "pass --dataset FILE with question and "
                              "answer (gold SQL) on each line")
        report = loading.DataReport(source=source)
        examples: list[loading.Example] = []
        seen: set[tuple[str, str]] = set()
        for row in raw:
            report.rows_read += 1
            q, a = (row.get(mapping[k]) if isinstance(row, dict) else None for k in ("question", "answer"))
            if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()):
                report.skipped["missing_question_or_answer"] += 1
                continue
            if (q.strip(), a.strip()) in seen:
                report.duplicates += 1
                continue
            seen.add((q.strip(), a.strip()))
            examples.append(loading.Example(q.strip(), self.selection(q.strip()).context, a.strip()))
        examples = loading.select(examples, cfg.eval_split, cfg.eval_fraction, cfg.eval_limit, cfg.seed)
        if not examples:
            raise DataError(f"no questions with gold SQL in {source} (skipped: {dict(report.skipped) or 'none'})",
                            "give each line `question` and `answer` (or map them with --column-map)")
        left_out = sum(1 for ex in examples if self.selection(ex.question).left_out)
        desc = {"source": source, "split": cfg.eval_split, "limit": cfg.eval_limit, "examples": len(examples),
                "fingerprint": loading.fingerprint(examples), "skipped": dict(report.skipped),
                "duplicates": report.duplicates, "context": "read from the database",
                "questions_with_tables_left_out": left_out}
        return examples, desc

    def score(self, items: Sequence[Any]) -> list[dict[str, Any]]:
        cfg = self.cfg
        records = []
        step = max(1, len(items) // 10)
        with open_runner(self.db, timeout_s=cfg.db_timeout, row_cap=cfg.eval_row_cap) as runner:
            for n, item in enumerate(items, 1):
                records.append(self._score_one(runner, item))
                if n % step == 0 or n == len(items):
                    logs.event(log, "scoring", done=n, total=len(items),
                               ex_so_far=round(sum(r["ex"] for r in records) / n, 4))
        return records

    def _score_one(self, runner: Any, item: Any) -> dict[str, Any]:
        return score_one(runner, self.db, self.schema, item, self.cfg.db_dialect)

    def choose(self, pairs: Sequence[tuple[str, str]], candidates: Sequence[Sequence[vote.Candidate]]) -> list[vote.Vote]:
        """--candidates: each question's candidates voted on by running them here, translated and gated as the
        predictions are (sqltune.sql.vote); the gold query plays no part."""
        with open_runner(self.db, timeout_s=self.cfg.db_timeout, row_cap=self.cfg.eval_row_cap) as runner:
            def run(sql: str) -> ExecResult:
                t = dialect.translate(sql, self.schema, source=self.cfg.db_dialect, target=self.db.dialect)
                return runner.run(t.sql) if t.ok else ExecResult(ok=False, error_kind=t.error_kind, error=t.error)

            return [vote.choose(c, self.schema, vote.on_runner(run)) for c in candidates]

    def close(self) -> None:
        self.db.close()


def score_one(runner: Any, db: Any, schema: Any, item: Any, written: str) -> dict[str, Any]:
    """One prediction against its gold query on a real database (`runner` on `db`, its tables `schema`): both
    translated and gated as `ask` does, the results compared by the Spider / BIRD rule (multisets, order only
    under the gold's ORDER BY)."""
    gold_t = dialect.translate(item.gold, schema, source=written, target=db.dialect)
    gold_tree = _tree(item.gold, schema, written)
    feats = metrics.features(gold_tree, item.gold)
    record: dict[str, Any] = {
        "index": item.index, "question": item.question, "context": item.context, "gold": item.gold,
        "predicted": item.predicted, "source": f"{db.kind}", "features": feats,
        "categories": metrics.categories(feats), "gold_ok": False, "gold_error_kind": "", "gold_error": "",
        "gold_empty": False, "valid": False, "executable": False, "schema_ok": False, "unknown_names": [],
        "em_raw": metrics.exact_match_raw(item.gold, item.predicted), "em_norm": False, "ex": False,
        "error_kind": "", "error": "", "timed_out": False, "gold_sql_run": gold_t.sql, "sql_run": ""}
    if not gold_t.ok:
        return {**record, "gold_error_kind": gold_t.error_kind, "gold_error": gold_t.error}
    gold = runner.run(gold_t.sql)
    again = runner.run(gold_t.sql) if gold.ok else gold
    ordered = metrics.is_ordered(item.gold, gold_tree)
    if not gold.ok:
        return {**record, "gold_error_kind": gold.error_kind, "gold_error": gold.error}
    if not metrics.same_result(gold.rows, again.rows, gold_width=len(gold.columns), pred_width=len(again.columns),
                               ordered=ordered):
        return {**record, "gold_error_kind": "nondeterministic", "gold_error": "the gold query's result changed "
                "between two runs (LIMIT without ORDER BY, or the data is changing)"}
    record.update(gold_ok=True, gold_empty=not any(v is not None and v != 0 for row in gold.rows for v in row))
    pred_tree = _tree(item.predicted, schema, written)
    unknown = check.unknown_names(pred_tree, schema) if pred_tree is not None else []
    record.update(unknown_names=unknown, schema_ok=pred_tree is not None and not unknown,
                  em_norm=metrics.exact_match_norm(gold_tree, pred_tree, gold_sql=item.gold, pred_sql=item.predicted))
    pred_t = dialect.translate(item.predicted, schema, source=written, target=db.dialect)
    if not pred_t.ok:
        valid = pred_t.error_kind not in (SYNTAX, EMPTY, MULTIPLE, dialect.TRANSPILE)
        return {**record, "valid": valid, "schema_ok": record["schema_ok"] and valid,
                "error_kind": pred_t.error_kind, "error": pred_t.error}
    result = runner.run(pred_t.sql)
    record["sql_run"] = pred_t.sql
    if not result.ok:
        valid = result.error_kind not in (SYNTAX, EMPTY, MULTIPLE)
        return {**record, "valid": valid, "schema_ok": record["schema_ok"] and valid,
                "error_kind": result.error_kind, "error": result.error, "timed_out": result.timed_out}
    ex = metrics.same_result(gold.rows, result.rows, gold_width=len(gold.columns), pred_width=len(result.columns),
                             ordered=ordered)
    return {**record, "valid": True, "executable": True, "ex": ex,
            "error": "" if ex else "result differs from the gold result"}


def _tree(sql: str, schema: Any, written: str) -> Any:
    """The parsed statement for features and exact match, or None."""
    from sqltune.sql.schema import parse_sql

    if written == "sqlite":
        parsed = parse_sql(sql, schema)
        return parsed.expression if parsed.ok else None
    import sqlglot

    try:
        return sqlglot.parse_one(sql, read=written)
    except Exception:  # sqlglot raises several types for unreadable SQL; all mean "no tree"
        return None
