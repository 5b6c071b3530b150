"""Execution accuracy and exact match on fixture pairs that must and must not match
(tests/assets/sql_metric_cases.yaml), plus the pieces: result comparison, normalisation,
query features and schema adherence."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlglot
import yaml

from sqltune.evaluate import metrics
from sqltune.evaluate.score import Item, Settings, score_example
from sqltune.sql.check import unknown_names
from sqltune.sql.schema import parse_schema, parse_sql

CASES = yaml.safe_load((Path(__file__).parent / "assets" / "sql_metric_cases.yaml").read_text())


@pytest.mark.parametrize("seed", [0, 42])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture_pair(case: dict, seed: int) -> None:
    record = score_example(Item(0, case.get("question", ""), case["context"], case["gold"], case["pred"]),
                           Settings(seed=seed))
    assert record["gold_ok"], record["gold_error"]
    assert not record["gold_empty"], "the databases must make the gold query select something"
    assert record["ex"] is case["ex"], f"EX {record['ex']}: {record['error']}"
    if "em_norm" in case:
        assert record["em_norm"] is case["em_norm"]


def test_fixture_file_has_both_verdicts_and_the_named_traps() -> None:
    names = " ".join(c["name"].lower() for c in CASES)
    assert {c["ex"] for c in CASES} == {True, False}
    for trap in ("column order", "order by", "distinct", "quoted number", "count(*)"):
        assert trap in names


def test_same_result_multiset_order_and_columns() -> None:
    gold = [(1, "a"), (2, "b"), (2, "b")]
    assert metrics.same_result(gold, [(2, "b"), (1, "a"), (2, "b")], gold_width=2, pred_width=2, ordered=False)
    assert not metrics.same_result(gold, [(2, "b"), (1, "a"), (2, "b")], gold_width=2, pred_width=2, ordered=True)
    assert not metrics.same_result(gold, [(1, "a"), (2, "b")], gold_width=2, pred_width=2, ordered=False)
    assert metrics.same_result(gold, [("a", 1), ("b", 2), ("b", 2)], gold_width=2, pred_width=2, ordered=True)
    assert not metrics.same_result(gold, [(1,), (2,), (2,)], gold_width=2, pred_width=1, ordered=False)
    assert metrics.same_result([(2.0000000001,)], [(2,)], gold_width=1, pred_width=1, ordered=False)
    assert not metrics.same_result([("2",)], [(2,)], gold_width=1, pred_width=1, ordered=False)
    assert metrics.same_result([], [], gold_width=1, pred_width=1, ordered=False)


def test_order_matters_only_for_a_top_level_order_by() -> None:
    ordered = sqlglot.parse_one("SELECT a FROM t ORDER BY a", read="sqlite")
    nested = sqlglot.parse_one("SELECT a FROM (SELECT a FROM t ORDER BY a LIMIT 3)", read="sqlite")
    assert metrics.is_ordered("", ordered) and not metrics.is_ordered("", nested)
    assert metrics.is_ordered("select a from t order  by a", None)


@pytest.mark.parametrize("a,b,same", [
    ("SELECT name FROM head WHERE age > 56", "select name from HEAD where age>56;", True),
    ('SELECT name FROM head WHERE name = "x"', "SELECT name FROM head WHERE name = 'x'", True),
    ("SELECT T1.a FROM t AS T1 JOIN u AS T2 ON T1.id = T2.id", "SELECT t.a FROM t JOIN u ON t.id = u.id", True),
    ("SELECT a FROM t WHERE b = 1 AND c = 2", "SELECT a FROM t WHERE c = 2 AND b = 1", True),
    ("SELECT a FROM t WHERE b = 1", "SELECT a FROM t WHERE b = 2", False),
    ("SELECT a FROM t AS x JOIN t AS y ON x.id = y.pid", "SELECT a FROM t AS y JOIN t AS x ON y.id = x.pid", False),
])
def test_normalised_exact_match(a: str, b: str, same: bool) -> None:
    schema = parse_schema("CREATE TABLE head (name VARCHAR, age INTEGER); CREATE TABLE t (a INTEGER, b INTEGER, "
                          "c INTEGER, id INTEGER, pid INTEGER); CREATE TABLE u (id INTEGER)")
    ga, gb = parse_sql(a, schema), parse_sql(b, schema)
    assert metrics.exact_match_norm(ga.expression, gb.expression) is same
    assert metrics.exact_match_raw(a, b) is (a.strip() == b.strip().rstrip(";"))


def test_features_and_categories() -> None:
    f = metrics.features(sqlglot.parse_one(
        "SELECT T1.a, COUNT(*) FROM t AS T1 JOIN u AS T2 ON T1.id = T2.id WHERE T1.b > 1 AND T2.c = 'x' "
        "AND T1.a IN (SELECT a FROM v) GROUP BY T1.a ORDER BY COUNT(*) DESC", read="sqlite"))
    assert f == {"aggregate": True, "where_conditions": 3, "group_by": True, "order_by": True, "join": True,
                 "nested": True}
    assert set(metrics.categories(f)) == {"aggregate", "group_by", "order_by", "join", "nested", "where=3+"}
    plain = metrics.features(sqlglot.parse_one("SELECT a FROM t WHERE b = 1", read="sqlite"))
    assert metrics.categories(plain) == ["where=1", "plain_select"]
    union = metrics.features(sqlglot.parse_one("SELECT a FROM t UNION SELECT a FROM u", read="sqlite"))
    assert union["nested"]


def test_schema_adherence_names_what_does_not_exist() -> None:
    schema = parse_schema("CREATE TABLE head (name VARCHAR, age INTEGER); CREATE TABLE dept (id INTEGER)")

    def unknown(sql: str) -> list[str]:
        parsed = parse_sql(sql, schema)
        assert parsed.ok, parsed.error
        return unknown_names(parsed.expression, schema)

    assert unknown("SELECT name FROM head WHERE age > 3") == []
    assert unknown('SELECT name FROM head WHERE name = "Ann"') == []  # a double-quoted string, not a column
    assert unknown("SELECT T1.name, COUNT(*) AS n FROM head AS T1 JOIN dept AS T2 ON T1.age = T2.id ORDER BY n") == []
    assert unknown("SELECT salary FROM head") == ["column salary"]
    assert unknown("SELECT name FROM people") == ["table people"]
    assert unknown("SELECT T1.id FROM head AS T1") == ["column T1.id"]
    assert unknown("WITH x AS (SELECT name FROM head) SELECT name FROM x") == []


def test_source_of_tells_wikisql_from_spider() -> None:
    assert metrics.source_of(parse_schema("CREATE TABLE table_name_79 (a VARCHAR)")) == "wikisql_like"
    assert metrics.source_of(parse_schema("CREATE TABLE table_1341423_32 (a VARCHAR)")) == "wikisql_like"
    assert metrics.source_of(parse_schema("CREATE TABLE singer (a VARCHAR)")) == "spider_like"


def test_record_fields_are_explicit_for_every_outcome() -> None:
    ctx = "CREATE TABLE head (name VARCHAR, age INTEGER)"
    good = score_example(Item(0, "q", ctx, "SELECT name FROM head", "SELECT name FROM head"), Settings())
    broken_gold = score_example(Item(1, "q", ctx, "SELECT nope FROM head", "SELECT name FROM head"), Settings())
    runaway = score_example(Item(2, "q", ctx, "SELECT name FROM head", "WITH RECURSIVE c(x) AS (SELECT 1 UNION "
                                 "ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"), Settings(time_budget_s=0.2))
    bad_context = score_example(Item(3, "q", "not sql at all (", "SELECT 1", "SELECT 1"), Settings())
    assert good["ex"] and good["em_raw"] and good["executable"] and not good["error_kind"]
    assert not broken_gold["gold_ok"] and broken_gold["gold_error_kind"] == "runtime"
    assert runaway["gold_ok"] and runaway["timed_out"] and runaway["error_kind"] == "timeout" and not runaway["ex"]
    assert not bad_context["gold_ok"] and bad_context["gold_error_kind"] == "schema"
    assert set(good) == set(broken_gold) == set(runaway) == set(bad_context)
