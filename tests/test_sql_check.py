"""The /v1/sql check (sqlglot against the request's schema), cross-checked with SQLite, and the
stop-string handling of streamed text. No server needed.

    pytest tests/test_sql_check.py
"""

from __future__ import annotations

import sqlite3

import pytest

from sqltune.engines.text import TextStream
from sqltune.sql.check import check_sql
from sqltune.sql.schema import parse_schema

SCHEMA = "CREATE TABLE head (age INTEGER, name VARCHAR); CREATE TABLE dept (id INTEGER, head_name TEXT)"

CASES = [  # sql, valid, tables, columns, error fragment
    ("SELECT COUNT(*) FROM head WHERE age > 56", True, ["head"], ["head.age"], None),
    ("SELECT h.name, d.id FROM head AS h JOIN dept AS d ON h.name = d.head_name", True, ["dept", "head"],
     ["dept.head_name", "dept.id", "head.name"], None),
    ("SELECT name AS n FROM head ORDER BY n", True, ["head"], ["head.name", "n"], None),
    ('SELECT age FROM head WHERE name = "Ann"', True, ["head"], ["head.age", "head.name"], None),
    ("SELECT nme FROM head", False, ["head"], ["nme"], "unknown column `nme`"),
    ("SELECT name FROM heads", False, ["heads"], ["name"], "unknown table `heads`"),
    ("SELECT id FROM head", False, ["head"], ["id"], "unknown column `id`"),
    ("SELECT FROM WHERE", False, [], [], "does not parse"),
    ("SELECT 1; SELECT 2", False, [], [], "2 statements"),
    ("DROP TABLE head", False, [], [], "not a read-only query"),
    ("SELECT age FROM head UNION SELECT id FROM dept", True, ["dept", "head"], ["dept.id", "head.age"], None),
    ("WITH old AS (SELECT name FROM head WHERE age > 56) SELECT name FROM old", True, ["head", "old"],
     ["head.age", "head.name"], None),
    ("SELECT count(*) FROM (SELECT age FROM head)", True, ["head"], ["head.age"], None),
]

# Statements that SQLite runs (so the cross-check above does not apply) but that change data, read
# no table of the schema, or call what the sandbox refuses: none of them is a valid answer.
NOT_VALID = [
    ("DELETE FROM head", "not a read-only query: DELETE"),
    ("UPDATE head SET age = 0", "not a read-only query: UPDATE"),
    ("INSERT INTO head VALUES (1, 'x')", "not a read-only query: INSERT"),
    ("REPLACE INTO head VALUES (1, 'x')", "not a read-only query"),
    ("WITH x AS (SELECT 1) DELETE FROM head WHERE age IN (SELECT * FROM x) RETURNING *", "DELETE"),
    ("SELECT * INTO copy FROM head", "INTO"),
    ("SELECT 1", "reads no table of the schema"),
    ("SELECT count(*)", "reads no table of the schema"),
    ("SELECT * FROM (SELECT 1 AS a)", "reads no table of the schema"),
    ("SELECT load_extension('/tmp/evil.so') FROM head", "`load_extension()` is not allowed"),
    ("SELECT writefile('/tmp/x', name) FROM head", "`writefile()` is not allowed"),
    ("SELECT name FROM head WHERE age = (SELECT readfile('/etc/passwd'))", "`readfile()` is not allowed"),
    ("PRAGMA table_info(head)", "not a read-only query"),
    ("ATTACH DATABASE 'x.db' AS x", "not a read-only query"),
    ("VALUES (1)", "not a read-only query"),
]


@pytest.mark.parametrize(("sql", "error"), NOT_VALID)
def test_what_changes_data_or_reads_no_table_is_not_valid(sql, error):
    got = check_sql(sql, parse_schema(SCHEMA))
    assert not got.valid
    assert error in got.error, got.error


def test_the_checker_and_the_sandbox_deny_the_same_functions():
    from sqltune.sql.sandbox import DENIED_FUNCTIONS, Sandbox

    assert "load_extension" in DENIED_FUNCTIONS
    with Sandbox(SCHEMA.split(";")) as box:
        assert box.run("SELECT load_extension('x') FROM head").error_kind == "denied"
        for name in sorted(DENIED_FUNCTIONS):
            sql = f"SELECT {name}('x') FROM head"
            # denied by the authorizer, or unknown to Python's SQLite (edit(), readfile() exist only in its shell)
            assert box.run(sql).error_kind in ("denied", "runtime"), name
            assert f"`{name}()` is not allowed" in check_sql(sql, parse_schema(SCHEMA)).error


def _sqlite_runs(sql: str) -> bool:
    db = sqlite3.connect(":memory:")
    try:
        for statement in SCHEMA.split(";"):
            db.execute(statement)
        db.execute(sql).fetchall()
        return True
    except (sqlite3.Error, sqlite3.Warning):
        return False
    finally:
        db.close()


@pytest.mark.parametrize(("sql", "valid", "tables", "columns", "error"), CASES)
def test_check_sql(sql, valid, tables, columns, error):
    got = check_sql(sql, parse_schema(SCHEMA))
    assert (got.valid, got.tables, got.columns) == (valid, tables, columns)
    assert (got.error is None) if error is None else (error in got.error)
    if "DROP" not in sql:
        assert _sqlite_runs(sql) == valid  # SQLite agrees on every query it can run


class _CharTokenizer:
    """One character per token, so tests can split stop strings across tokens at will."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _feed(text: str, stop: list[str], min_tokens: int = 0) -> tuple[list[str], bool]:
    stream = TextStream(_CharTokenizer(), stop, min_tokens)
    pieces = []
    for ch in text:
        pieces.append(stream.push(ord(ch)))
        if stream.stopped:
            return pieces, True
    pieces.append(stream.flush())
    return pieces, False


def test_stop_string_split_over_tokens_never_leaks():
    pieces, stopped = _feed("SELECT a FROM t\nQuestion: next", ["\nQuestion:"])
    assert stopped and "".join(pieces) == "SELECT a FROM t"
    assert all("\n" not in p for p in pieces)  # the held-back prefix was never emitted


def test_held_text_is_released_when_it_is_not_a_stop():
    pieces, stopped = _feed("a\nb\nQc", ["\nQuestion:"])
    assert not stopped and "".join(pieces) == "a\nb\nQc"


def test_min_tokens_ignores_an_early_stop():
    pieces, stopped = _feed("ab;cd;ef", [";"], min_tokens=4)
    assert stopped and "".join(pieces) == "ab;cd"
