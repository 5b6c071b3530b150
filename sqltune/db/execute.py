"""Run one checked SELECT on a real database: read-only, within a time limit, up to a row cap.

    with open_runner(db, timeout_s=10, row_cap=1000) as runner:
        result = runner.run("SELECT name FROM customers")   # sqltune.sql.sandbox.ExecResult

PostgreSQL: each query is its own transaction, `SET TRANSACTION READ ONLY` (on a session that is
already `default_transaction_read_only`), with `statement_timeout` set LOCAL to the limit, and it
is always rolled back, never committed. The query runs through a server-side cursor: DECLARE
goes by the extended protocol, which refuses a second statement, and FETCH takes at most
row_cap + 1 rows, so a huge result never crosses the wire. A watchdog cancels the query from the
client if the server's timeout does not stop it (a timeout reset inside the query, a stuck
network). SQLite: the project's sandbox (sqltune.sql.sandbox) on the file opened `mode=ro`, with
its authorizer, progress handler and watchdog.

The SQL must already have passed sqltune.db.dialect's gate; these walls hold if it had not.
"""

from __future__ import annotations

import decimal
import itertools
import threading
import time
from typing import Any, Protocol

from sqltune import logs
from sqltune.db.connect import Database
from sqltune.sql import sandbox
from sqltune.sql.sandbox import ExecResult

log = logs.get("db")
# PostgreSQL SQLSTATEs -> sandbox error kinds (https://www.postgresql.org/docs/current/errcodes-appendix.html)
_KINDS = {"57014": sandbox.TIMEOUT, "25006": sandbox.DENIED, "42501": sandbox.DENIED, "42601": sandbox.SYNTAX,
          "54000": sandbox.TOO_BIG, "53200": sandbox.TOO_BIG}
_names = itertools.count()


class Runner(Protocol):
    def run(self, sql: str, timeout_s: float | None = None) -> ExecResult:
        """`timeout_s` shortens this one query's limit (a question's candidates share one deadline)."""

    def close(self) -> None: ...


def _plain(value: Any) -> Any:
    """NUMERIC comes back as Decimal; as float (or int when whole) it compares like SQLite's REAL does."""
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            return str(value)
        return int(value) if value == value.to_integral_value() else float(value)
    return value


class SqliteRunner:
    def __init__(self, db: Database, *, timeout_s: float, row_cap: int) -> None:
        assert db.path is not None
        # no instruction budget on a real file (a full scan of a large table is fine): the clock bounds it
        self.box = sandbox.Sandbox([], time_budget_s=timeout_s, instruction_budget=10**18, row_cap=row_cap,
                                   database=str(db.path))

    def run(self, sql: str, timeout_s: float | None = None) -> ExecResult:
        full = self.box.time_budget_s
        self.box.time_budget_s = min(full, timeout_s) if timeout_s is not None else full
        try:
            return self.box.run(sql)
        finally:
            self.box.time_budget_s = full

    def close(self) -> None:
        self.box.close()


class PostgresRunner:
    def __init__(self, db: Database, *, timeout_s: float, row_cap: int) -> None:
        self.db = db
        self.timeout_s = timeout_s
        self.row_cap = row_cap
        self._raw: Any = None
        self.conn: Any = None

    def _connection(self) -> Any:
        if self.conn is None or self.conn.closed or self.conn.broken:
            if self._raw is not None:
                self._raw.invalidate()
            self._raw = self.db.engine.raw_connection()
            self.conn = self._raw.driver_connection
            self.conn.autocommit = False
        return self.conn

    def run(self, sql: str, timeout_s: float | None = None) -> ExecResult:
        import psycopg

        text = sql.strip().rstrip(";").strip()
        if not text:
            return ExecResult(ok=False, error_kind=sandbox.EMPTY, error="empty query")
        limit = min(self.timeout_s, timeout_s) if timeout_s is not None else self.timeout_s
        conn = self._connection()
        start = time.perf_counter()
        cancelled = threading.Event()

        def cancel() -> None:
            cancelled.set()
            getattr(conn, "cancel_safe", conn.cancel)()

        # the server's statement_timeout acts first; this is for when it cannot
        watchdog = threading.Timer(limit + 2.0, cancel)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{max(1, int(limit * 1000))}ms",))
            with conn.cursor(name=f"sqltune_{next(_names)}") as cur:
                cur.execute(text)
                fetched = cur.fetchmany(self.row_cap + 1)
                columns = tuple(d.name for d in cur.description or ())
        except psycopg.Error as e:
            return self._failure(e, start, cancelled.is_set(), limit)
        finally:
            watchdog.cancel()
            watchdog.join()
            try:
                conn.rollback()  # never commit: nothing this transaction did is kept
            except psycopg.Error:
                pass
        rows = tuple(tuple(_plain(v) for v in row) for row in fetched)
        if len(rows) > self.row_cap:
            return ExecResult(ok=False, rows=rows[: self.row_cap], columns=columns, error_kind=sandbox.ROW_LIMIT,
                              error=f"more than {self.row_cap} rows", truncated=True, elapsed_ms=_ms(start))
        return ExecResult(ok=True, rows=rows, columns=columns, elapsed_ms=_ms(start))

    def _failure(self, e: Any, start: float, cancelled: bool, limit: float) -> ExecResult:
        state = getattr(e, "sqlstate", None) or ""
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        kind = _KINDS.get(state, sandbox.RUNTIME)
        if cancelled:
            kind, message = sandbox.TIMEOUT, f"cancelled by sqltune after {limit:g} s: {message}"
        elif kind == sandbox.TIMEOUT:
            message = f"stopped after {limit:g} s (statement_timeout): {message}"
        logs.event(log, "query failed", level=10, sqlstate=state, kind=kind, error=message)
        return ExecResult(ok=False, error_kind=kind, error=message, timed_out=kind == sandbox.TIMEOUT,
                          elapsed_ms=_ms(start))

    def close(self) -> None:
        if self._raw is not None:
            try:
                self.conn.rollback()
            except Exception:  # a broken connection has nothing to roll back
                pass
            self._raw.close()
            self._raw = self.conn = None


class _Opened:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def __enter__(self) -> Runner:
        return self.runner

    def __exit__(self, *exc: object) -> None:
        self.runner.close()


def open_runner(db: Database, *, timeout_s: float, row_cap: int) -> _Opened:
    cls = SqliteRunner if db.kind == "sqlite" else PostgresRunner
    return _Opened(cls(db, timeout_s=timeout_s, row_cap=row_cap))


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
