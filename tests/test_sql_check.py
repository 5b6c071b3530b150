"""The /v1/sql check (sqlglot against the request's schema), cross-checked with SQLite, and the
stop-string handling of streamed text. No server needed.

    pytest tests/test_sql_check.py
"""

from __future__ import annotations

import sqlite3

import pytest

from sqltune.serve.engines.text import TextStream
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
    ("DROP TABLE head", False, [], [], "not a query"),
]


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
