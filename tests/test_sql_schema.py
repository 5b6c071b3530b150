"""CREATE TABLE contexts, SQL parsed as SQLite reads it, the seeded databases, and the gold
self-check on ../shared/data (skipped when the data is absent)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from sqlglot import exp

from sqltune.errors import DataError
from sqltune.evaluate.score import Item, Settings, iter_scores
from sqltune.sql.sandbox import Sandbox
from sqltune.sql.schema import affinity, parse_schema, parse_sql
from sqltune.sql.synth_db import make_plan, synthesise


def test_parse_schema_types_constraints_and_repeats() -> None:
    schema = parse_schema("CREATE TABLE head (age INTEGER NOT NULL, name VARCHAR, id INT PRIMARY KEY); "
                          "CREATE TABLE HEAD (extra VARCHAR); CREATE TABLE t2 (att REAL)")
    head = schema.table("Head")
    assert [c.name for c in head.columns] == ["age", "name", "id", "extra"]  # a repeated table is merged
    assert head.column("AGE").not_null and head.column("id").not_null and not head.column("name").not_null
    assert head.column("name").type == "VARCHAR" and head.column("age").numeric and not head.column("name").numeric
    assert schema.table("t2").column("att").affinity == "REAL"
    assert schema.ddl()[0] == 'CREATE TABLE "head" ("age" INT, "name" VARCHAR, "id" INT, "extra" VARCHAR)'
    with Sandbox(schema.ddl()) as box:
        assert box.run("SELECT * FROM head").ok


@pytest.mark.parametrize("bad", ["SELECT 1", "CREATE TABLE (", ""])
def test_parse_schema_refuses_what_is_not_create_table(bad: str) -> None:
    with pytest.raises(DataError, match="CREATE TABLE"):
        parse_schema(bad)


def test_a_huge_or_deep_schema_is_refused_quickly_with_the_limit() -> None:
    import time

    from sqltune.sql.schema import MAX_COLUMNS, MAX_TABLES

    wide = "CREATE TABLE t (" + ", ".join(f"c{i} INT" for i in range(8000)) + ")"  # 90 kB: 21 s before
    started = time.perf_counter()
    with pytest.raises(DataError, match=f"at most {MAX_TABLES} tables and {MAX_COLUMNS} columns"):
        parse_schema(wide)
    assert time.perf_counter() - started < 3
    at_limit = parse_schema("CREATE TABLE t (" + ", ".join(f"c{i} INT, C{i} INT" for i in range(MAX_COLUMNS // 2))
                            + ")")  # duplicates differ only in case: dropped, each in constant time
    assert len(at_limit.tables[0].columns) == MAX_COLUMNS // 2
    with pytest.raises(DataError, match="tables"):
        parse_schema("; ".join(f"CREATE TABLE t{i} (a INT)" for i in range(MAX_TABLES + 1)))
    with pytest.raises(DataError, match="nested too deeply"):  # RecursionError inside sqlglot before
        parse_schema("CREATE TABLE t (a INT CHECK (" + "(" * 5000 + "1" + ")" * 5000 + "))")


def test_affinity_rules() -> None:
    assert [affinity(t) for t in ("INTEGER", "BIGINT", "VARCHAR(20)", "TEXT", "REAL", "DOUBLE", "", "DECIMAL")] == \
        ["INTEGER", "INTEGER", "TEXT", "TEXT", "REAL", "REAL", "BLOB", "NUMERIC"]


def test_double_quotes_follow_sqlite_rule() -> None:
    schema = parse_schema("CREATE TABLE head (name VARCHAR, age INTEGER)")
    parsed = parse_sql('SELECT name FROM head WHERE name = "Ann" AND "age" > 3', schema)
    literals = [lit.this for lit in parsed.expression.find_all(exp.Literal) if lit.is_string]
    columns = [c.name for c in parsed.expression.find_all(exp.Column)]
    assert literals == ["Ann"] and "age" in columns and not parsed.rewritten


def test_thousands_separator_becomes_a_number_only_on_numeric_columns() -> None:
    schema = parse_schema("CREATE TABLE t (attendance INTEGER, crowd VARCHAR)")
    numeric = parse_sql('SELECT 1 FROM t WHERE attendance = "73,405"', schema)
    text = parse_sql('SELECT 1 FROM t WHERE crowd = "73,405"', schema)
    assert numeric.rewritten and "73405" in numeric.sql("raw")
    assert not text.rewritten and text.sql("raw") == "raw"


def test_parse_sql_failures_are_explicit() -> None:
    schema = parse_schema("CREATE TABLE t (a INTEGER)")
    for sql, needle in (("", "empty"), ("SELECT 1; SELECT 2", "2 statements"), ("SELEC a FROM", "")):
        parsed = parse_sql(sql, schema)
        assert not parsed.ok and parsed.expression is None and needle in parsed.error and parsed.error


GOLDS = [
    ("CREATE TABLE table_name_49 (silver INTEGER, total VARCHAR, nation VARCHAR)",
     'SELECT AVG(silver) FROM table_name_49 WHERE total < 2 AND nation = "south korea"'),
    ("CREATE TABLE table_name_41 (goals_against INTEGER, goals_for VARCHAR, losses VARCHAR)",
     "SELECT SUM(goals_against) FROM table_name_41 WHERE goals_for > 52 AND losses < 10"),
    ("CREATE TABLE people (name VARCHAR, city VARCHAR)", "SELECT city FROM people WHERE name LIKE '%smith%'"),
    ("CREATE TABLE t (a INTEGER, b VARCHAR)", "SELECT b FROM t WHERE a BETWEEN 3 AND 5 AND b IN ('x', 'y')"),
    ("CREATE TABLE election (Votes INTEGER, Representative_ID VARCHAR); CREATE TABLE representative "
     "(Representative_ID VARCHAR, Party VARCHAR)",
     'SELECT AVG(T1.Votes) FROM election AS T1 JOIN representative AS T2 ON T1.Representative_ID = '
     'T2.Representative_ID WHERE T2.Party = "Republican"'),
    ("CREATE TABLE table_name_89 (opponent VARCHAR, week VARCHAR, attendance VARCHAR)",
     'SELECT opponent FROM table_name_89 WHERE week < 10 AND attendance = "63,672"'),
]


@pytest.mark.parametrize("context,gold", GOLDS)
def test_planted_databases_make_the_gold_select_something(context: str, gold: str) -> None:
    schema = parse_schema(context)
    plan = make_plan(schema, parse_sql(gold, schema).expression, "")
    for seed in range(5):
        with Sandbox(schema.ddl(), synthesise(plan, seed)) as box:
            result = box.run(gold)
        assert result.ok and any(v not in (None, 0) for row in result.rows for v in row), (seed, result)


def test_synthesis_is_seeded_and_typed() -> None:
    schema = parse_schema("CREATE TABLE t (id INTEGER NOT NULL, score INTEGER, name VARCHAR)")
    plan = make_plan(schema, parse_sql("SELECT name FROM t WHERE score > 70 AND name = 'Ann'", schema).expression,
                     "Who scored above 70 in 'Ann' class?")
    assert synthesise(plan, 3) == synthesise(plan, 3)
    assert synthesise(plan, 3) != synthesise(plan, 4)
    rows = [r for seed in range(10) for r in synthesise(plan, seed)["t"]]
    assert all(isinstance(r[0], int) for r in rows), "NOT NULL integer column"
    assert all(r[1] is None or isinstance(r[1], int) for r in rows)
    assert all(r[2] is None or isinstance(r[2], str) for r in rows)
    assert any(r[1] is None for r in rows) and any(r[2] is None for r in rows)
    assert any(r[1] == 70 for r in rows), "the bound itself appears, so > and >= differ"


def test_synthesis_of_many_same_named_columns_is_linear_and_capped() -> None:
    """256 tables x 16 columns with the same names: every column joins its 255 namesakes. Linking every
    pair took 14 s of make_plan (and 32 s in all with the union-find's long chains); one pass joins each
    to its first namesake, so the classes are the same and an eval row or /v1/sql/run is not stalled.
    Past its own time cap a schema is refused with a DataError rather than run for minutes."""
    import time

    from sqltune.errors import DataError
    from sqltune.sql.synth_db import SynthesisTooSlow

    ddl = "; ".join(f"CREATE TABLE t{i} (" + ", ".join(f"c{j} INTEGER" for j in range(16)) + ")" for i in range(256))
    schema = parse_schema(ddl)
    gold = parse_sql("SELECT t3.c1 FROM t3 JOIN t9 ON t3.c0 = t9.c0 WHERE t3.c2 > 5", schema).expression
    started = time.process_time()
    plan = make_plan(schema, gold, "")
    rows = synthesise(plan, 1)
    cpu = time.process_time() - started
    assert len(set(plan.key_class.values())) == 16  # one join class per shared name
    assert len(plan.key_class) == 256 * 16
    with Sandbox(schema.ddl(), rows) as box:
        joined = box.run("SELECT COUNT(*) FROM t3 JOIN t9 ON t3.c0 = t9.c0")
    assert joined.ok and joined.rows[0][0] > 0  # the shared pool makes namesakes join
    assert cpu < 10, f"{cpu:.1f} s of CPU for one database"  # 32 s before
    with pytest.raises(SynthesisTooSlow) as refused:
        make_plan(schema, gold, "", budget_s=0.0)
    assert isinstance(refused.value, DataError) and "too large" in refused.value.message
    with pytest.raises(SynthesisTooSlow):
        synthesise(plan, 1, budget_s=0.0)


def test_gold_self_check_on_shared_data(shared_data: Path) -> None:
    """Gold vs gold must be 100% EX; report the share of gold queries that run on their own context."""
    rows = [json.loads(line) for line in shared_data.open()]
    rows = random.Random(0).sample(rows, min(2000, len(rows)))
    items = [Item(i, r["question"], r["context"], r["answer"], r["answer"]) for i, r in enumerate(rows)]
    records = list(iter_scores(items, Settings(), workers=2))
    ran = [r for r in records if r["gold_ok"]]
    share = len(ran) / len(records)
    print(f"\ngold self-check: {len(ran)}/{len(records)} = {share:.1%} of gold queries run on their own context")
    assert share > 0.95
    assert all(r["ex"] and r["em_norm"] and r["executable"] for r in ran)
    assert sum(r["schema_ok"] for r in ran) / len(ran) > 0.99
    failed = [r for r in records if not r["gold_ok"]]
    assert all(r["gold_error_kind"] and r["gold_error"] for r in failed), "dataset errors say what went wrong"
    assert sum(r["gold_empty"] for r in ran) / len(ran) < 0.05, "databases make almost every gold select something"
