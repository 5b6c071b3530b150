"""One question, answered on a real database: schema -> prompt -> SQL -> dialect -> gate -> rows.

    result = ask(cfg, "How many orders shipped in May?")          # cfg.database, cfg.model_name / eval_endpoint
    print(render_table(result))

The schema is read from the database (sqltune.db.introspect) and cut to what fits the model's
context; the model (a local artifact, or a running server) writes SQL in its own dialect, which
sqltune.db.dialect turns into one gated statement for the database, and sqltune.db.execute runs
it read-only. Every step's outcome is a field of AskResult, so the CLI, JSON output and tests read
the same thing.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqltune import config, logs
from sqltune.db import dialect, introspect
from sqltune.db.connect import Database, connect, warn_if_writable
from sqltune.db.execute import open_runner
from sqltune.errors import ConfigError
from sqltune.sql.sandbox import ROW_LIMIT, ExecResult

log = logs.get("db")
MAX_CELL = 60  # characters of one value shown in the terminal table (JSON and CSV carry it whole)


@dataclass
class AskResult:
    question: str
    database: dict[str, Any]
    selection: introspect.Selection
    translation: dialect.Translation
    result: ExecResult
    source: str  # model | endpoint | given (--sql)
    raw_output: str = ""
    generation_error: str = ""
    warnings: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The query ran (a result cut at the row cap still answers)."""
        return self.translation.ok and (self.result.ok or self.result.error_kind == ROW_LIMIT)

    @property
    def error(self) -> str:
        if self.generation_error:
            return f"no SQL: {self.generation_error}"
        if not self.translation.ok:
            return f"refused ({self.translation.error_kind}): {self.translation.error}"
        if not self.ok:
            return f"failed ({self.result.error_kind}): {self.result.error}"
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "database": self.database, "schema": self.selection.to_dict(),
                "source": self.source, "model_sql": self.translation.model_sql, "sql": self.translation.sql,
                "sql_changed": self.translation.changed, "ok": self.ok, "error": self.error,
                "error_kind": self.translation.error_kind or self.result.error_kind,
                "columns": list(self.result.columns), "rows": [list(r) for r in self.result.rows],
                "row_count": len(self.result.rows), "truncated": self.result.truncated,
                "warnings": self.warnings, "timing": self.timing}


class Writer:
    """Where the SQL comes from: a local model, a running server, or the user's own --sql."""

    def __init__(self, cfg: config.Config, sources: dict[str, str], sql: str | None) -> None:
        self.cfg, self.given, self.llm = cfg, sql, None
        self.kind = "given" if sql is not None else "endpoint" if cfg.eval_endpoint else "model"
        if self.kind == "model" and "model_name" not in sources:
            raise ConfigError("nothing writes the SQL", "pass --model DIR, --endpoint URL, or --sql 'SELECT ...'")
        self.max_new_tokens = cfg.eval_max_new_tokens
        if self.kind == "model":
            from sqltune.engines import batch

            # one question: a batch of one on the engine `sqltune serve` would use (--engine)
            self.llm = batch.open_model(cfg.model_name, cfg, batch_size=1)
            trained = self.llm.meta.get("max_new_tokens")
            if trained and "eval_max_new_tokens" not in sources:
                self.max_new_tokens = int(trained)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def fits(self, question: str) -> Callable[[str], bool]:
        """Whether a schema context fits: --db-context-chars, and the local model's own context length."""
        chars = self.cfg.db_context_chars
        if self.llm is None:
            return lambda context: len(context) <= chars
        llm = self.llm
        room = llm.max_model_len - self.max_new_tokens

        def fits(context: str) -> bool:
            if len(context) > chars:
                return False
            return len(llm.encode(llm.template.build_prompt(question, context))) <= room

        return fits

    def write(self, question: str, context: str) -> tuple[str, str, str]:
        """(sql, raw completion, generation error)."""
        if self.given is not None:
            return self.given, self.given, ""
        if self.llm is not None:
            from sqltune import prompts
            from sqltune.engines.base import SamplingParams

            prompt = self.llm.template.build_prompt(question, context)
            [done] = self.llm.generate_text([prompt], SamplingParams(max_tokens=self.max_new_tokens))
            if done.error:
                return "", done.text, done.error
            return prompts.extract_sql(done.text, self.llm.eos_token, self.llm.template), done.text, ""
        from sqltune.evaluate import sources as src

        preds, _ = src.from_endpoint(self.cfg.eval_endpoint, [(question, context)], concurrency=1,
                                     retries=self.cfg.eval_retries, timeout=self.cfg.eval_request_timeout,
                                     max_new_tokens=self.max_new_tokens, progress=lambda n: None)
        return preds[0].sql, preds[0].raw, preds[0].error


def ask(cfg: config.Config, question: str, *, sources: dict[str, str] | None = None, sql: str | None = None,
        db: Database | None = None) -> AskResult:
    """Answer `question` on cfg.database (or the open `db`)."""
    if not question.strip() and sql is None:
        raise ConfigError("no question given", 'pass the question as the last argument: sqltune ask ... "How many ...?"')
    t0 = time.perf_counter()
    own = db is None
    db = db or connect(cfg.database, schema=cfg.db_schema)
    try:
        warnings = [w for w in [warn_if_writable(db)] if w]
        schema = introspect.introspect(db, keys=cfg.db_keys)
        t1 = time.perf_counter()
        logs.event(log, "schema read", database=db.display, tables=len(schema.tables),
                   columns=sum(len(t.columns) for t in schema.tables), seconds=round(t1 - t0, 3))
        writer = Writer(cfg, sources or {}, sql)
        try:
            selection = introspect.select_tables(schema, question, writer.fits(question))
            if selection.left_out:
                logs.event(log, "tables left out of the context", given=selection.tables,
                           left_out=selection.left_out, how=selection.how)
            model_sql, raw, gen_error = writer.write(question, selection.context)
        finally:
            writer.close()
        t2 = time.perf_counter()
        translation = dialect.translate(model_sql, schema.to_schema(), source=cfg.db_dialect, target=db.dialect)
        if gen_error or not translation.ok:
            result = ExecResult(ok=False, error_kind=translation.error_kind or "generation",
                                error=translation.error or gen_error)
        else:
            with open_runner(db, timeout_s=cfg.db_timeout, row_cap=cfg.db_row_cap) as runner:
                result = runner.run(translation.sql)
        t3 = time.perf_counter()
        out = AskResult(question, db.describe(), selection, translation, result, writer.kind, raw, gen_error, warnings,
                        {"schema_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3), "query_s": round(t3 - t2, 3)})
        logs.event(log, "ask finished", ok=out.ok, kind=out.to_dict()["error_kind"], rows=len(result.rows),
                   truncated=result.truncated, changed=translation.changed, query_ms=round(result.elapsed_ms, 1))
        return out
    finally:
        if own:
            db.close()


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    text = value.hex() if isinstance(value, (bytes, bytearray, memoryview)) and not isinstance(value, str) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def table_text(columns: tuple[str, ...], rows: tuple[tuple[Any, ...], ...]) -> str:
    """Rows as an aligned table; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows)
               for i in range(len(columns))]

    def line(values: list[str], right: list[bool]) -> str:
        return " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)).rstrip()

    out = [line(list(columns), [False] * len(columns)), "-+-".join("-" * w for w in widths)]
    out += [line(r, numeric) for r in cells]
    return "\n".join(out)


def render_table(res: AskResult) -> str:
    lines = [f"-- {w}" for w in res.warnings]
    sel = res.selection
    if sel.left_out:
        lines.append(f"-- schema: {len(sel.tables)} of {len(sel.tables) + len(sel.left_out)} tables given to the model "
                     f"({', '.join(sel.tables)}); left out: {', '.join(sel.left_out)} [{sel.how}]")
    t = res.translation
    if t.changed:
        lines += [f"-- SQL as the model wrote it ({'given' if res.source == 'given' else 'model'}): {t.model_sql}",
                  f"-- SQL as run on {res.database['engine']}:", t.sql]
    else:
        lines.append(t.sql or t.model_sql or "(no SQL)")
    if not res.ok:
        lines.append(f"error: {res.error}")
        return "\n".join(lines)
    lines += ["", table_text(res.result.columns, res.result.rows), ""]
    count = len(res.result.rows)
    if res.result.truncated:
        lines.append(f"({count} rows shown; the query returns more: raise --db-row-cap to see them)")
    else:
        lines.append(f"({count} row{'s' if count != 1 else ''}, {res.result.elapsed_ms:.0f} ms)")
    return "\n".join(lines)


def render_json(res: AskResult) -> str:
    return json.dumps(res.to_dict(), indent=2, default=str, ensure_ascii=False)


def render_csv(res: AskResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(res.result.columns)
    w.writerows(["" if v is None else v for v in row] for row in res.result.rows)
    return buf.getvalue()
