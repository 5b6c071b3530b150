"""Choosing among candidate queries by executing them: the executed majority wins, failing and
unknown-name candidates are dropped, ties go to the more likely candidate, nothing running falls back
to the greedy answer.

    pytest tests/test_sql_vote.py
"""

from __future__ import annotations

from sqltune.sql import vote
from sqltune.sql.sandbox import Sandbox
from sqltune.sql.schema import parse_schema
from sqltune.sql.vote import Candidate

HEAD = parse_schema("CREATE TABLE head (name VARCHAR, born_state VARCHAR, age INTEGER)")
QUESTION = "Which heads are older than 56?"


def _choose(*candidates: Candidate, question: str = QUESTION) -> vote.Vote:
    return vote.choose(list(candidates), HEAD, vote.on_synthesised(HEAD, question))


def test_the_executed_majority_wins_over_the_most_likely_candidate() -> None:
    result = _choose(
        Candidate("SELECT name FROM head WHERE age >= 56", logprob=-0.5),  # most likely, alone in its result
        Candidate("SELECT name FROM head WHERE age > 56", logprob=-1.0),
        Candidate("select name from head where 56 < age", logprob=-3.0),  # other text, same answer
    )
    assert (result.chosen, result.sql) == (1, "SELECT name FROM head WHERE age > 56")
    assert (result.candidates, result.ran, result.agreed, result.fallback) == (3, 3, 2, False)
    assert result.runs[1].group == result.runs[2].group != result.runs[0].group


def test_failing_and_unknown_column_candidates_are_dropped() -> None:
    result = _choose(
        Candidate("SELECT nme FROM head WHERE age > 56", logprob=-0.1),  # unknown column
        Candidate("SELECT name FROM head WHERE", logprob=-0.2),  # does not parse
        Candidate("DELETE FROM head", logprob=-0.3),  # not read-only
        Candidate("SELECT name FROM head UNION SELECT name, age FROM head", logprob=-0.4),  # SQLite refuses it
        Candidate("", error="engine failed: out of memory"),
        Candidate("SELECT name FROM head WHERE age > 56", logprob=-5.0),
    )
    assert (result.chosen, result.ran, result.agreed) == (5, 1, 1)
    failures = [(r.failure, r.ran) for r in result.runs]
    assert failures == [(vote.INVALID, False), (vote.INVALID, False), (vote.INVALID, False),
                        (vote.EXECUTION, False), (vote.GENERATION, False), ("", True)]
    assert "unknown column" in result.runs[0].error and "nme" in result.runs[0].error
    assert "same number of result columns" in result.runs[3].error


def test_a_tie_goes_to_the_more_likely_candidate() -> None:
    two = (Candidate("SELECT name FROM head WHERE age > 56", logprob=-2.0),
           Candidate("SELECT born_state FROM head WHERE age > 56", logprob=-1.0))
    assert _choose(*two).chosen == 1
    assert _choose(Candidate(two[0].sql, -0.5), two[1]).chosen == 0
    # no likelihoods (an engine that gives none): the earliest, i.e. the greedy answer
    assert _choose(Candidate(two[0].sql), Candidate(two[1].sql)).chosen == 0
    # within the winning group, its most likely member is returned
    tied = _choose(Candidate("SELECT name FROM head WHERE age > 56", -4.0),
                   Candidate("SELECT born_state FROM head", -0.1),
                   Candidate("SELECT name FROM head WHERE 56 < age", -2.0))
    assert (tied.chosen, tied.agreed) == (2, 2)


def test_columns_in_another_order_are_the_same_answer() -> None:
    result = _choose(Candidate("SELECT name, age FROM head WHERE age > 56"),
                     Candidate("SELECT age, name FROM head WHERE age > 56"),
                     Candidate("SELECT name FROM head"))
    assert (result.chosen, result.agreed) == (0, 2)


def test_nothing_runs_so_the_greedy_answer_comes_back_unchecked() -> None:
    result = _choose(Candidate("SELECT nme FROM head"), Candidate("SELECT FROM WHERE"))
    assert (result.sql, result.chosen, result.ran, result.agreed, result.fallback) == (
        "SELECT nme FROM head", 0, 0, 0, True)
    assert result.to_dict(runs=False) == {"candidates": 2, "ran": 0, "agreed": 0, "chosen": 0, "fallback": True}


def test_a_literal_in_another_letter_case_is_another_answer() -> None:
    schema = parse_schema("CREATE TABLE stadium (name VARCHAR, city VARCHAR)")
    question = "Which stadium is in Guiyang?"
    result = vote.choose([Candidate("SELECT name FROM stadium WHERE city = 'guiyang'", -0.1),
                          Candidate("SELECT name FROM stadium WHERE city = 'Guiyang'", -0.9),
                          Candidate("SELECT name FROM stadium WHERE city = \"Guiyang\"", -1.2)],
                         schema, vote.on_synthesised(schema, question))
    assert (result.chosen, result.agreed, result.ran) == (1, 2, 3)


def test_on_runner_runs_each_distinct_query_once_on_a_real_file(tmp_path) -> None:
    import sqlite3

    path = tmp_path / "heads.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE head (name VARCHAR, born_state VARCHAR, age INTEGER)")
        conn.executemany("INSERT INTO head VALUES (?, ?, ?)", [("Ann", "Ohio", 60), ("Bo", "Utah", 56), ("Cy", "Iowa", 70)])
    seen: list[str] = []
    with Sandbox([], database=str(path)) as box:
        def run(sql: str):
            seen.append(sql)
            return box.run(sql)

        result = vote.choose([Candidate("SELECT name FROM head WHERE age >= 56"),
                              Candidate("SELECT name FROM head WHERE age > 56"),
                              Candidate("SELECT name FROM head WHERE age > 56"),
                              Candidate("SELECT name FROM head WHERE age > 57")], HEAD, vote.on_runner(run))
    # > 56 and > 57 select the same rows on this database: three agree
    assert (result.chosen, result.ran, result.agreed) == (1, 4, 3)
    assert len(seen) == 3 and sorted(result.runs[1].results[0].rows) == [("Ann",), ("Cy",)]
