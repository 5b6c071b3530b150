"""Run untrusted SQL in an in-memory SQLite database that can only be read.

    with Sandbox(["CREATE TABLE t (a INTEGER)"], {"t": [(1,), (2,)]}) as box:
        result = box.run("SELECT a FROM t WHERE a > 1")   # ExecResult(ok=True, rows=((2,),), ...)

Generated SQL is untrusted, so four walls stand between it and the machine: the database lives
in memory and temporary storage is forced to memory (nothing touches disk); an authorizer allows
reads and functions only (no ATTACH, PRAGMA writes, DDL, DML or load_extension); a progress
handler aborts after an instruction budget and a watchdog interrupts at the wall-clock budget
(runaway recursive CTEs, cross joins, a slow function repeated over many rows); and results stop
at a row cap. SQLite's own limits bound string sizes, LIKE patterns and attached databases too.

The time budget holds inside one function call as well: every built-in whose cost is not bounded
by the size of its result is bounded by its arguments. printf()/format() loop once per character
of a `%.*c` precision even past the length limit (1e9 took 8.5 s), so they run through a wrapper
that refuses widths and precisions adding up to more than the length limit; LIKE and GLOB cost
pattern x text, so patterns stop at 1000 characters; replace() and instr() cost at most ~0.1 s
at the length limit, which the watchdog's interrupt between rows keeps from adding up.
Every outcome is an ExecResult with explicit fields; nothing is signalled by None. `database=` reads a
real SQLite file instead (opened read-only, behind the same walls); sqltune.db uses it.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Error kinds an ExecResult can carry; "" means the query ran.
OK, SYNTAX, DENIED, TIMEOUT, ROW_LIMIT, TOO_BIG, RUNTIME, MULTIPLE, EMPTY = (
    "", "syntax", "denied", "timeout", "row_limit", "too_big", "runtime", "multiple_statements", "empty")
ERROR_KINDS = (SYNTAX, DENIED, TIMEOUT, ROW_LIMIT, TOO_BIG, RUNTIME, MULTIPLE, EMPTY)

# Pragmas that only report on the schema; every other pragma is refused.
READ_PRAGMAS = frozenset({"table_info", "table_xinfo", "table_list", "index_list", "index_info",
                          "index_xinfo", "foreign_key_list", "collation_list", "function_list"})
# The one list of functions untrusted SQL may not call: the sandbox's authorizer refuses them and
# sqltune.sql.check calls a query that names one invalid (file access, native code, shell editors).
DENIED_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})
_ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE})

# SQLite's per-connection limits: no attached databases at all; strings, SQL text and
# compound selects far beyond anything a text-to-SQL answer needs, far below a memory bomb
# (row cap x longest value bounds what one result can hold: 1000 x 100 kB). A LIKE/GLOB costs
# pattern length x text length per row: 1000 x 100 kB is ~0.1 s, where SQLite's default 50 000 took 3.7 s.
MAX_LENGTH = 100_000
MAX_LIKE_PATTERN = 1000
_LIMITS = {sqlite3.SQLITE_LIMIT_ATTACHED: 0, sqlite3.SQLITE_LIMIT_LENGTH: MAX_LENGTH,
           sqlite3.SQLITE_LIMIT_SQL_LENGTH: 50_000, sqlite3.SQLITE_LIMIT_COMPOUND_SELECT: 50,
           sqlite3.SQLITE_LIMIT_EXPR_DEPTH: 200, sqlite3.SQLITE_LIMIT_VDBE_OP: 250_000,
           sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH: MAX_LIKE_PATTERN}
# A printf conversion: flags, width, precision (digits or `*`, which takes the next argument), type.
_PRINTF_SPEC = re.compile(r"%([-+ #0!,]*)(\*|\d+)?(?:\.(\*|\d*))?(l{0,2})(.)", re.S)


@dataclass(frozen=True)
class ExecResult:
    ok: bool
    rows: tuple[tuple[Any, ...], ...] = ()
    columns: tuple[str, ...] = ()
    error_kind: str = OK
    error: str = ""
    timed_out: bool = False
    truncated: bool = False
    elapsed_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rows": [list(r) for r in self.rows], "columns": list(self.columns),
                "error_kind": self.error_kind, "error": self.error, "timed_out": self.timed_out,
                "truncated": self.truncated, "elapsed_ms": round(self.elapsed_ms, 3)}


def _authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_FUNCTION:
        # for SQLITE_FUNCTION the function name is the second argument
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        # arg2 is the table for table_info(t), the new value for a write; these names never write
        return sqlite3.SQLITE_OK if (arg1 or "").lower() in READ_PRAGMAS else sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_DENY


def read_only_uri(path: str | Path) -> str:
    """The `file:` URI that opens a SQLite file read-only and leaves its folder as it was. In WAL mode
    even a mode=ro reader creates -wal and -shm files beside the database; when none are there (no
    connection has the file open for writing), it is opened immutable, which needs neither."""
    file = Path(path).resolve()
    uri = f"{file.as_uri()}?mode=ro"
    with file.open("rb") as fh:
        wal = fh.read(20)[18:20] == b"\x02\x02"  # the header's read and write versions: 2 = WAL
    if wal and not any(file.with_name(file.name + s).exists() for s in ("-wal", "-shm")):
        uri += "&immutable=1"
    return uri


class Sandbox:
    """One in-memory database built from `ddl` and `rows`, then locked to reads."""

    def __init__(self, ddl: Sequence[str], rows: Mapping[str, Sequence[Sequence[Any]]] | None = None, *,
                 time_budget_s: float = 1.0, instruction_budget: int = 10_000_000, row_cap: int = 1000,
                 check_every: int = 2000, database: str | None = None) -> None:
        self.time_budget_s = time_budget_s
        self.instruction_budget = instruction_budget
        self.row_cap = row_cap
        self._check_every = check_every
        self._ticks = 0
        self._deadline = 0.0
        self._tripped = ""
        self._too_big = ""
        # isolation_level=None: no implicit BEGIN, which the authorizer would refuse. A real database file
        # (sqltune.db) is opened mode=ro, so SQLite itself refuses writes below the authorizer, and never created.
        if database is not None and ddl:
            raise ValueError("a database file is read as it is: pass no ddl")
        target = read_only_uri(database) if database is not None else ":memory:"
        self.conn = sqlite3.connect(target, uri=database is not None, isolation_level=None, check_same_thread=False)
        # the built-in printf, called by the bounded wrapper once it has checked the widths; it sees
        # only the wrapper's own statement and bound values, never the untrusted SQL
        self._builtins = sqlite3.connect(":memory:", check_same_thread=False)
        for conn in (self.conn, self._builtins):
            for limit, value in _LIMITS.items():
                conn.setlimit(limit, value)
        for name in ("printf", "format"):
            self.conn.create_function(name, -1, self._printf, deterministic=True)
        self.conn.execute("PRAGMA temp_store = MEMORY")  # sorts and temp b-trees never spill to disk
        for statement in ddl:
            self.conn.execute(statement)
        for table, table_rows in (rows or {}).items():
            if table_rows:
                marks = ",".join("?" * len(table_rows[0]))
                self.conn.executemany(f'INSERT INTO "{table}" VALUES ({marks})', table_rows)
        self.conn.execute("PRAGMA query_only = ON")
        self.conn.set_authorizer(_authorize)
        self.conn.set_progress_handler(self._progress, check_every)

    def _printf(self, fmt: Any, *args: Any) -> Any:
        """SQLite's printf, refusing widths and precisions whose padding alone passes the length limit."""
        if time.perf_counter() > self._deadline:  # many rows of printf between two progress checks
            self._tripped = "time budget"
            raise sqlite3.OperationalError("interrupted")
        text = fmt.decode("utf-8", "replace") if isinstance(fmt, bytes) else "" if fmt is None else str(fmt)
        asked, next_arg = 0, 0
        for spec in _PRINTF_SPEC.finditer(text):
            if spec.group(5) == "%":
                continue
            for part in (spec.group(2), spec.group(3)):
                if part == "*":
                    value = args[next_arg] if next_arg < len(args) else 0
                    next_arg += 1
                    asked += abs(self._as_int(value))
                elif part:
                    asked += int(part)
            next_arg += 1
            if asked > MAX_LENGTH:
                self._too_big = (f"printf widths and precisions add up to {asked} characters; "
                                 f"the sandbox's length limit is {MAX_LENGTH}")
                raise sqlite3.DataError(self._too_big)
        marks = ", ".join("?" * (1 + len(args)))
        return self._builtins.execute(f"SELECT printf({marks})", (fmt, *args)).fetchone()[0]

    def _as_int(self, value: Any) -> int:
        # SQLite's own conversion (text prefixes, reals, NULL), as printf applies it to a `*` argument
        return int(self._builtins.execute("SELECT CAST(? AS INTEGER)", (value,)).fetchone()[0] or 0)

    def _progress(self) -> int:
        self._ticks += 1
        if self._ticks * self._check_every > self.instruction_budget:
            self._tripped = "instruction budget"
            return 1
        if time.perf_counter() > self._deadline:
            self._tripped = "time budget"
            return 1
        return 0

    def run(self, sql: str) -> ExecResult:
        """Execute one statement and fetch at most `row_cap` rows; never raises for bad SQL."""
        text = sql.strip()
        if not text.rstrip(";").strip():
            return ExecResult(ok=False, error_kind=EMPTY, error="empty query")
        self._ticks, self._tripped, self._too_big = 0, "", ""
        start = time.perf_counter()
        self._deadline = start + self.time_budget_s
        # the progress handler runs every `check_every` VM steps, and one step can be a 0.1 s replace():
        # SQLite checks for an interrupt between rows, so the budget holds within one such call
        watchdog = threading.Timer(self.time_budget_s, self._interrupt)
        watchdog.daemon = True
        watchdog.start()
        cursor = None
        try:
            cursor = self.conn.execute(text)
            fetched = cursor.fetchmany(self.row_cap + 1)
            columns = tuple(d[0] for d in cursor.description or ())
        except sqlite3.Error as e:
            return self._failure(e, start)
        except (OverflowError, MemoryError, ValueError) as e:  # huge integers, oversized text
            return ExecResult(ok=False, error_kind=TOO_BIG, error=f"{type(e).__name__}: {e}",
                              elapsed_ms=_ms(start))
        finally:
            watchdog.cancel()
            watchdog.join()  # an interrupt must not land on the next query
            if cursor is not None:
                cursor.close()
        if len(fetched) > self.row_cap:
            return ExecResult(ok=False, rows=tuple(fetched[: self.row_cap]), columns=columns,
                              error_kind=ROW_LIMIT, error=f"more than {self.row_cap} rows",
                              truncated=True, elapsed_ms=_ms(start))
        return ExecResult(ok=True, rows=tuple(fetched), columns=columns, elapsed_ms=_ms(start))

    def _interrupt(self) -> None:
        self._tripped = self._tripped or "time budget"
        self.conn.interrupt()

    def _failure(self, e: sqlite3.Error, start: float) -> ExecResult:
        message = str(e)
        code = getattr(e, "sqlite_errorcode", None)
        if self._too_big:
            return ExecResult(ok=False, error_kind=TOO_BIG, error=self._too_big, elapsed_ms=_ms(start))
        if self._tripped or code == sqlite3.SQLITE_INTERRUPT:
            return ExecResult(ok=False, error_kind=TIMEOUT, error=f"aborted: {self._tripped or 'interrupted'}",
                              timed_out=True, elapsed_ms=_ms(start))
        if isinstance(e, sqlite3.ProgrammingError) and "one statement" in message:
            kind = MULTIPLE
        elif code == sqlite3.SQLITE_AUTH or "not authorized" in message or "prohibited" in message:
            kind = DENIED
        elif code == sqlite3.SQLITE_READONLY or "readonly" in message:
            kind = DENIED
        elif (code == sqlite3.SQLITE_TOOBIG or "too big" in message or "too large" in message
              or "pattern too complex" in message):
            kind = TOO_BIG
        elif "syntax error" in message or "incomplete input" in message or "unrecognized token" in message:
            kind = SYNTAX
        else:
            kind = RUNTIME
        return ExecResult(ok=False, error_kind=kind, error=message, elapsed_ms=_ms(start))

    def close(self) -> None:
        self.conn.close()
        self._builtins.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
