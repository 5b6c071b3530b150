"""Completing a query's joins along the schema's foreign keys (sqltune.sql.joins), checked by running the
queries on real SQLite databases: the completed query returns the gold rows, and a query that runs is never
changed (every gold query of Spider's training databases, when ../shared holds them)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sqltune.db import introspect
from sqltune.db.connect import connect
from sqltune.evaluate.sources import Prediction, with_joins
from sqltune.sql.joins import complete_joins
from sqltune.sql.schema import Link, parse_schema
from sqltune.sql.vote import Candidate

SPIDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "spider-train"

DDL = """
CREATE TABLE people (person_id INTEGER PRIMARY KEY, first_name TEXT, last_name TEXT);
CREATE TABLE candidates (candidate_id INTEGER PRIMARY KEY REFERENCES people (person_id), details TEXT);
CREATE TABLE addresses (address_id INTEGER PRIMARY KEY, city TEXT);
CREATE TABLE people_addresses (person_id INTEGER REFERENCES people (person_id),
                               address_id INTEGER REFERENCES addresses (address_id));
CREATE TABLE courses (course_id INTEGER PRIMARY KEY, course_name TEXT);
CREATE TABLE registrations (student_id INTEGER REFERENCES people (person_id),
                            course_id INTEGER REFERENCES courses (course_id));
INSERT INTO people VALUES (1, 'Ann', 'Lee'), (2, 'Bo', 'Ng'), (3, 'Cy', 'Ito');
INSERT INTO candidates VALUES (1, 'x'), (3, 'y');
INSERT INTO addresses VALUES (10, 'Oslo'), (11, 'Lima');
INSERT INTO people_addresses VALUES (1, 10), (2, 11), (3, 10);
INSERT INTO courses VALUES (5, 'English'), (6, 'Math');
INSERT INTO registrations VALUES (1, 5), (2, 5), (3, 6);
"""


@pytest.fixture(scope="module")
def school(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real database, and its context as `sqltune ask` writes it (keys included)."""
    path = tmp_path_factory.mktemp("school") / "school.sqlite"
    with sqlite3.connect(path) as con:
        con.executescript(DDL)
    db = connect(str(path))
    try:
        context = introspect.introspect(db).context()
    finally:
        db.close()
    return path, context


def rows(path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(path) as con:
        return sorted(con.execute(sql).fetchall())


def runs(path: Path, sql: str) -> bool:
    try:
        rows(path, sql)
    except sqlite3.Error:
        return False
    return True


def test_a_broken_join_whose_condition_is_more_than_keys_is_not_rewritten(school: tuple[Path, str]) -> None:
    """An ON with a filter in it says more than which rows pair up: it is not replaced by the foreign key."""
    sql = "SELECT T1.city FROM addresses AS T1 JOIN courses AS T2 ON T1.course_id = T2.course_id AND T2.course_name = 'Math'"
    completed = complete_joins(sql, parse_schema(school[1]))
    assert completed is not None and "T2.course_name = 'Math'" in completed and "JOIN courses AS T2" in completed


@pytest.mark.parametrize(("predicted", "gold"), [
    # the tutorial's question: the model names people's columns on candidates
    ("SELECT first_name, last_name FROM candidates",
     "SELECT T2.first_name, T2.last_name FROM candidates AS T1 JOIN people AS T2 ON T1.candidate_id = T2.person_id"),
    # two foreign keys away, through the linking table
    ("SELECT DISTINCT city FROM people WHERE first_name = 'Ann'",
     "SELECT DISTINCT T3.city FROM people AS T1 JOIN people_addresses AS T2 ON T1.person_id = T2.person_id "
     "JOIN addresses AS T3 ON T2.address_id = T3.address_id WHERE T1.first_name = 'Ann'"),
    # GROUP BY and ORDER BY on the joined table's column; count(*) stays as it is
    ("SELECT course_name FROM registrations GROUP BY course_name ORDER BY count(*) DESC LIMIT 1",
     "SELECT T2.course_name FROM registrations AS T1 JOIN courses AS T2 ON T1.course_id = T2.course_id "
     "GROUP BY T1.course_id ORDER BY count(*) DESC LIMIT 1"),
    # a qualifier on the wrong table of the query moves to the one that has the column
    ("SELECT T2.first_name FROM people AS T1 JOIN candidates AS T2 ON T1.person_id = T2.candidate_id",
     "SELECT T1.first_name FROM people AS T1 JOIN candidates AS T2 ON T1.person_id = T2.candidate_id"),
    # a count of a joined table's rows under a condition on it
    ("SELECT count(*) FROM registrations WHERE course_name = 'English'",
     "SELECT count(*) FROM courses AS T1 JOIN registrations AS T2 ON T1.course_id = T2.course_id "
     "WHERE T1.course_name = 'English'"),
    # joined on a key neither table has, and nothing else read from it: the join goes (a cross join would
    # repeat every city once per course)
    ("SELECT T1.city FROM addresses AS T1 JOIN courses AS T2 ON T1.address_id = T2.address_id",
     "SELECT city FROM addresses"),
    ("SELECT T1.city FROM addresses AS T1 JOIN courses AS T2 ON T1.course_id = T2.course_id ORDER BY T1.city",
     "SELECT city FROM addresses"),
    # the joined table is read: it gets the foreign key that links it
    ("SELECT T2.course_name FROM registrations AS T1 JOIN courses AS T2 ON T1.student_id = T2.student_id",
     "SELECT T2.course_name FROM registrations AS T1 JOIN courses AS T2 ON T1.course_id = T2.course_id"),
    # not linked directly: through the linking table, which the query did not name
    ("SELECT T2.city FROM people AS T1 JOIN addresses AS T2 ON T1.address_id = T2.address_id WHERE T1.first_name = 'Ann'",
     "SELECT T3.city FROM people AS T1 JOIN people_addresses AS T2 ON T1.person_id = T2.person_id "
     "JOIN addresses AS T3 ON T2.address_id = T3.address_id WHERE T1.first_name = 'Ann'"),
    # a column on the wrong side of a broken join, then a column no table of the query has
    ("SELECT T1.course_name FROM registrations AS T1 JOIN courses AS T2 ON T1.person_id = T2.course_id "
     "WHERE first_name = 'Bo'",
     "SELECT T2.course_name FROM registrations AS T1 JOIN courses AS T2 ON T1.course_id = T2.course_id "
     "JOIN people AS T3 ON T1.student_id = T3.person_id WHERE T3.first_name = 'Bo'"),
])
def test_a_query_that_cannot_run_gets_the_join_its_columns_need(school: tuple[Path, str], predicted: str, gold: str) -> None:
    path, context = school
    assert not runs(path, predicted)
    completed = complete_joins(predicted, parse_schema(context))
    assert completed is not None
    assert rows(path, completed) == rows(path, gold), completed


@pytest.mark.parametrize("sql", [
    "SELECT first_name FROM people",  # nothing missing
    "SELECT T1.first_name FROM people AS T1 JOIN candidates AS T2 ON T1.person_id = T2.candidate_id",
    # a correlated subquery's column comes from the query around it
    "SELECT first_name FROM people WHERE EXISTS (SELECT 1 FROM candidates WHERE candidate_id = person_id)",
    # an output alias in ORDER BY
    "SELECT first_name, count(*) AS n FROM people GROUP BY first_name ORDER BY n",
    # a derived table: its columns are not the schema's
    "SELECT n FROM (SELECT count(*) AS n FROM people)",
    "SELECT first_name FROM people UNION SELECT city FROM addresses",
])
def test_a_query_that_runs_is_left_as_it_is(school: tuple[Path, str], sql: str) -> None:
    path, context = school
    assert runs(path, sql)
    assert complete_joins(sql, parse_schema(context)) is None


@pytest.mark.parametrize("sql", [
    "SELECT salary FROM people",  # no table has it
    "SELECT first_name FROM nowhere",  # a table the schema lacks
    "SELECT first_name FROM",  # does not parse
])
def test_nothing_is_guessed_where_no_table_supplies_the_column(school: tuple[Path, str], sql: str) -> None:
    assert complete_joins(sql, parse_schema(school[1])) is None


def test_two_tables_equally_near_with_the_column_are_not_chosen_between() -> None:
    schema = parse_schema("CREATE TABLE hub (id INTEGER, a_id INTEGER REFERENCES a (id), b_id INTEGER REFERENCES b (id)); "
                          "CREATE TABLE a (id INTEGER, name TEXT); CREATE TABLE b (id INTEGER, name TEXT)")
    assert complete_joins("SELECT name FROM hub", schema) is None
    assert complete_joins("SELECT name FROM a", schema) is None  # a has it: runs as written


def test_a_join_that_would_capture_a_correlated_column_or_complete_half_a_query_is_not_made() -> None:
    schema = parse_schema("CREATE TABLE people (person_id INTEGER, name TEXT, city_id INTEGER REFERENCES cities (id)); "
                          "CREATE TABLE cities (id INTEGER, city TEXT); "
                          "CREATE TABLE pets (pet_id INTEGER, owner_id INTEGER REFERENCES people (person_id))")
    # `person_id` in the subquery is the outer query's; joining people in for `city` would make it the subquery's
    assert complete_joins("SELECT name FROM people WHERE EXISTS (SELECT 1 FROM pets WHERE owner_id = person_id "
                          "AND city = 'Oslo')", schema) is None
    # `city` could be joined in, `salary` cannot: the query is left as the model wrote it, not half done
    assert complete_joins("SELECT city, salary FROM people", schema) is None
    assert complete_joins("SELECT city FROM people", schema) is not None


def test_contexts_without_keys_link_tables_through_a_shared_id_column(tmp_path: Path) -> None:
    """sql-create-context's contexts carry no keys: `head_id` in both tables is the link."""
    context = ("CREATE TABLE head (head_id INTEGER, name VARCHAR, age INTEGER); "
               "CREATE TABLE management (department_id INTEGER, head_id INTEGER, temporary_acting VARCHAR)")
    path = tmp_path / "d.sqlite"
    with sqlite3.connect(path) as con:
        con.executescript(context + "; INSERT INTO head VALUES (1, 'Ann', 60), (2, 'Bo', 40);"
                          "INSERT INTO management VALUES (7, 1, 'Yes'), (8, 2, 'No');")
    completed = complete_joins("SELECT name FROM management WHERE temporary_acting = 'Yes'", parse_schema(context))
    assert completed is not None and rows(path, completed) == [("Ann",)]


def test_foreign_keys_are_read_from_the_context_and_from_the_database(school: tuple[Path, str]) -> None:
    path, context = school
    link = Link("candidates", ("candidate_id",), "people", ("person_id",))
    assert link in parse_schema(context).links  # table-level FOREIGN KEY clauses, as ask writes them
    assert link in parse_schema(DDL.split(";")[1]).links  # a column's own REFERENCES
    db = connect(str(path))
    try:
        assert link in introspect.introspect(db).to_schema().links
    finally:
        db.close()


def test_eval_keeps_the_models_own_sql_beside_the_completed_one(school: tuple[Path, str]) -> None:
    _, context = school
    raw = "SELECT first_name FROM candidates"
    p = with_joins(Prediction(raw, candidates=(Candidate(raw), Candidate("SELECT city FROM addresses"))), context)
    assert p.model_sql == raw and "JOIN people" in p.sql
    assert p.candidates[0].sql == p.sql and p.candidates[1].sql == "SELECT city FROM addresses"
    assert p.model_candidates == (raw, "")  # the vote's chosen candidate names its own SQL in the report
    same = with_joins(Prediction("SELECT city FROM addresses"), context)
    assert same.sql == "SELECT city FROM addresses" and same.model_sql == ""


@pytest.mark.skipif(not SPIDER.is_dir(), reason="../shared/data/spider-train is not here")
def test_no_gold_query_of_spider_train_is_changed() -> None:
    """Every gold query that runs on its database, with the context training and ask build for it: a
    completion that fired on any of them would change a query that runs."""
    from sqltune.data.databases import read_layout

    examples, _ = read_layout(f"spider:{SPIDER}", context_chars=1000)
    assert len(examples) > 6000
    changed = [ex.answer for ex in examples if complete_joins(ex.answer, parse_schema(ex.context))]
    assert changed == []


def test_eval_summary_gives_ex_with_and_without_completion(school: tuple[Path, str]) -> None:
    from sqltune.evaluate import report
    from sqltune.evaluate.score import Item, Settings, score_example

    _, context = school
    gold = "SELECT T2.first_name FROM candidates AS T1 JOIN people AS T2 ON T1.candidate_id = T2.person_id"
    own = "SELECT first_name FROM candidates"
    completed = complete_joins(own, parse_schema(context))
    records = [score_example(Item(0, "Names of the candidates?", context, gold, completed), Settings()),
               score_example(Item(1, "Names of the people?", context, "SELECT first_name FROM people",
                                  "SELECT last_name FROM people"), Settings())]
    assert [r["ex"] for r in records] == [True, False]
    records[0]["model_sql"] = own
    results = report.aggregate(records)
    assert results["joins_completed"] == {"answers": 1, "right": 1, "ex_model_sql": report.rate(0, 2)}
    text = report.markdown({"results": results, "settings": {"databases": 3}})
    assert "Joins completed from the foreign keys in 1 answers, 1 of them now right: EX 50.0% (1/2) against 0.0% (0/2)" in text
    records[0].update(candidates={"candidates": 2, "chosen": 1, "ran": 2, "agreed": 1, "fallback": False}, ex_greedy=False)
    assert report.aggregate(records)["joins_completed"]["ex_model_sql"] is None  # a vote could have gone another way
