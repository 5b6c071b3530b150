"""POST /v1/sql/run: a SQL query run on a small database synthesised from its schema, in the sandbox.

    curl -s localhost:8000/v1/sql/run -H 'Authorization: Bearer KEY' -d '{
      "context": "CREATE TABLE head (age INTEGER, name VARCHAR)",
      "sql": "SELECT name FROM head WHERE age > 56"}'
    # {"valid": true, "result": {"ok": true, "columns": ["name"], "rows": [["name3"], ...]}, "database": ...}

The database comes from the evaluator's generator (sqltune.sql.synth_db) with the query itself as
the plan, so its conditions hold on some rows and just miss on others: a WHERE that a random
table would leave empty shows rows, and the neighbours it rightly left out are in `database`.
The query runs in sqltune.sql.sandbox (in memory, read-only, time and row budgets) on a worker
thread; at most RUN_SLOTS run at once and more get a 429, so a burst of runs cannot take the
threads that every other route reads its schemas on.
"""

from __future__ import annotations

import datetime
import math
import sqlite3
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, model_validator

from sqltune.errors import DataError
from sqltune.serve.deps import in_thread
from sqltune.serve.lint import lint
from sqltune.serve.protocol import Int, _Request
from sqltune.serve.service import ApiError
from sqltune.sql.check import check_sql
from sqltune.sql.sandbox import ExecResult, Sandbox
from sqltune.sql.schema import Schema, parse_schema, parse_sql
from sqltune.sql.synth_db import SynthesisTooSlow, make_plan, synthesise

router = APIRouter()

MAX_SQL_CHARS = 20_000
MAX_ROWS = 1000  # the sandbox's own default cap; the page asks for far fewer
MAX_CELL_CHARS = 1000  # a 100 kB string (the sandbox's length limit) x 1000 rows is not a reply
TIME_BUDGET_S = 1.0
RUN_SLOTS = 4


class SqlRunRequest(_Request):
    sql: str = Field(min_length=1, max_length=MAX_SQL_CHARS, description="One read-only SQL statement.")
    context: str | None = Field(None, description="CREATE TABLE statements, as for /v1/sql.")
    schema_: list[str] | None = Field(None, alias="schema", description="Or a list of CREATE TABLE statements.")
    question: str = Field("", max_length=MAX_SQL_CHARS, description="Its words and numbers seed the values.")
    seed: Int = Field(0, ge=0, lt=2**63, description="Same seed, same database.")
    max_rows: Int = Field(100, ge=1, le=MAX_ROWS, description="Rows returned at most; more is `truncated`.")

    @model_validator(mode="after")
    def _has_schema(self) -> SqlRunRequest:
        if not (self.context or "").strip() and not self.schema_:
            raise ValueError("give `context` (CREATE TABLE statements) or `schema` (a list of them)")
        if not self.sql.strip().rstrip(";").strip():
            raise ValueError("sql is blank: give one SELECT statement")
        return self

    def ddl(self) -> str:
        parts = [self.context or ""] + [s for s in self.schema_ or []]
        return "; ".join(p.strip().rstrip(";") for p in parts if p.strip())


class RunResult(BaseModel):
    ok: bool
    columns: list[str]
    rows: list[list[Any]]
    error_kind: str = Field(description="'' when it ran; else syntax, denied, timeout, row_limit, too_big, runtime, ...")
    error: str
    timed_out: bool
    truncated: bool = Field(description="More rows than max_rows; the first max_rows are here.")
    cells_cut: bool = Field(description=f"Some text was longer than {MAX_CELL_CHARS} characters and is cut.")
    elapsed_ms: float


class SynthTable(BaseModel):
    name: str
    columns: list[str]
    rows: list[list[Any]]


class SqlRunResponse(BaseModel):
    sql: str
    valid: bool = Field(description="The /v1/sql check against the schema: one read-only query naming what exists.")
    error: str | None = Field(description="Why it is not valid.")
    tables: list[str]
    columns: list[str]
    lint: list[str] = Field(description="What a reader should check although it runs (sqltune.serve.lint).")
    result: RunResult
    database: list[SynthTable] = Field(description="The synthesised tables it ran on.")
    seed: int


@router.post("/v1/sql/run", response_model=SqlRunResponse)
async def run(body: SqlRunRequest, request: Request) -> SqlRunResponse:
    """Run one query on a database synthesised from the schema, sandboxed; no model is involved."""
    state = request.app.state
    in_flight = getattr(state, "sql_runs", 0)
    if in_flight >= RUN_SLOTS:
        raise ApiError(429, f"{in_flight} queries are running (at most {RUN_SLOTS} at once); retry in a second",
                       "rate_limit_error", "queue_full", headers={"Retry-After": "1"})
    state.sql_runs = in_flight + 1
    try:
        schema = await in_thread(_schema, body)
        return await in_thread(run_on_synthesised, schema, body.sql, body.question, body.seed, body.max_rows)
    finally:
        state.sql_runs -= 1


def _schema(body: SqlRunRequest) -> Schema:
    try:
        return parse_schema(body.ddl())
    except DataError as e:
        param = "schema" if body.schema_ and not body.context else "context"
        hint = f"; {e.hint}" if e.hint else ""
        raise ApiError(400, f"{param}: {e.message}{hint}", code="invalid_schema", param=param) from None


def run_on_synthesised(schema: Schema, sql: str, question: str = "", seed: int = 0,
                       max_rows: int = 100) -> SqlRunResponse:
    """Check `sql` against `schema`, synthesise a database for it and run it there."""
    check = check_sql(sql, schema)
    parsed = parse_sql(sql, schema)
    try:
        plan = make_plan(schema, parsed.expression if parsed.ok else None, question)
        rows = synthesise(plan, seed)
    except SynthesisTooSlow as e:
        raise ApiError(400, f"context: {e.message}; {e.hint}", code="schema_too_large", param="context") from None
    try:
        box = Sandbox(schema.ddl(), rows, time_budget_s=TIME_BUDGET_S, row_cap=max_rows)
    except sqlite3.Error as e:  # a schema sqlglot reads but SQLite will not build
        raise ApiError(400, f"context: SQLite cannot build these tables: {e}; give plain CREATE TABLE statements",
                       code="invalid_schema", param="context") from None
    with box:
        # a query whose numbers were rewritten for numeric columns runs as SQLite would read it
        result = box.run(parsed.sql(sql) if parsed.ok else sql)
    out_rows, cut = json_rows(result.rows)
    database = [SynthTable(name=t.name, columns=[c.name for c in t.columns], rows=json_rows(rows[t.name])[0])
                for t in schema.tables]
    return SqlRunResponse(sql=sql, valid=check.valid, error=check.error, tables=check.tables, columns=check.columns,
                          lint=lint(sql, schema, question) if check.valid else [], result=_result(result, out_rows, cut),
                          database=database, seed=seed)


def _result(result: ExecResult, rows: list[list[Any]], cut: bool) -> RunResult:
    return RunResult(ok=result.ok, columns=list(result.columns), rows=rows, error_kind=result.error_kind,
                     error=result.error, timed_out=result.timed_out, truncated=result.truncated, cells_cut=cut,
                     elapsed_ms=round(result.elapsed_ms, 3))


def json_rows(rows: Any) -> tuple[list[list[Any]], bool]:
    """Rows as JSON can carry them: blobs as hex (x'00ff', SQLite's literal), inf and nan as
    text, dates and times (PostgreSQL's) in ISO 8601, long text cut to MAX_CELL_CHARS."""
    cut = False
    out = []
    for row in rows:
        cells: list[Any] = []
        for v in row:
            if isinstance(v, (bytes, bytearray, memoryview)):
                v = "x'" + bytes(v).hex() + "'"
            elif isinstance(v, (datetime.date, datetime.time)):
                v = v.isoformat(sep=" ") if isinstance(v, datetime.datetime) else v.isoformat()
            elif not isinstance(v, (str, int, float, type(None))):  # Decimal, timedelta, UUID, ...
                v = str(v)
            elif isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            if isinstance(v, str) and len(v) > MAX_CELL_CHARS:
                v, cut = v[:MAX_CELL_CHARS] + "…", True
            cells.append(v)
        out.append(cells)
    return out, cut
