"""`sqltune ask --candidates K` has one deadline per question: the candidates share --db-timeout, a
candidate that timed out is never run again as the fallback answer, and the output names the
candidates that timed out. On a real SQLite file, with candidates that would run for hours.

    pytest tests/test_ask_deadline.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the db extra is not installed: pip install 'sqltune[db]'")
from fixtures_db import file_checksum, seed_sqlite

from sqltune import config
from sqltune.ask import answer as asking
from sqltune.db import connect, introspect
from sqltune.sql.vote import Candidate

FAST = "SELECT name FROM customers WHERE city = 'Oslo'"


def slow(copies: int) -> str:
    """4^copies rows to count (4 customers): hours of work that only the time limit stops."""
    tables = ", ".join(f"customers AS c{i}" for i in range(copies))
    return f"SELECT COUNT(*) FROM {tables}"


@pytest.fixture()
def shop(tmp_path: Path) -> Path:
    return seed_sqlite(tmp_path / "shop.sqlite")


def _answer(shop: Path, timeout: str, candidates: list[Candidate]):
    cfg, _ = config.load(["--database", str(shop), "--db-timeout", timeout], {})
    db = connect.connect(str(shop))
    try:
        schema = introspect.introspect(db).to_schema()
        started = time.monotonic()
        out = asking.answer_candidates(cfg, db, schema, candidates)
        return (*out, time.monotonic() - started, introspect.Selection("", ["customers"], how="test"), db.describe())
    finally:
        db.close()


def test_slow_candidates_share_one_deadline_and_the_timed_out_fallback_is_not_rerun(shop: Path) -> None:
    before = file_checksum(shop)
    k = 6
    chosen, translation, result, seconds, _, _ = _answer(shop, "1", [Candidate(slow(16 + i)) for i in range(k)])
    assert chosen.fallback and chosen.ran == 0 and chosen.timed_out == list(range(k))
    # the answer is the greedy candidate's own result from the vote: the same object, not a second run
    assert result is chosen.runs[0].results[0] and result.timed_out
    assert all(r.results[0].timed_out for r in chosen.runs)
    # each run was stopped at its share of the one second, never at a second of its own: the old code's K
    # candidates and a rerun took K + 1 seconds by construction
    assert seconds < k, seconds
    assert translation.ok and file_checksum(shop) == before


def test_a_slow_candidate_does_not_starve_the_fast_ones_after_it(shop: Path) -> None:
    candidates = [Candidate(FAST, -0.5), Candidate(slow(16), -0.1), Candidate(FAST + " ORDER BY name", -0.9),
                  Candidate(slow(17), -0.2)]
    chosen, translation, result, _, _, _ = _answer(shop, "2", candidates)
    assert chosen.timed_out == [1, 3]  # the fast ones ran: a slow one only had its share of what was left
    assert (chosen.ran, chosen.agreed, chosen.chosen) == (2, 2, 0)
    assert result.ok and sorted(result.rows) == [("Ann",), ("Cleo",)]
    assert "aborted" in chosen.runs[1].error


def test_the_output_names_the_candidates_that_timed_out(shop: Path) -> None:
    candidates = [Candidate(FAST), Candidate(slow(16)), Candidate(slow(17))]
    chosen, translation, result, _, selection, database = _answer(shop, "1", candidates)
    res = asking.AskResult("Who lives in Oslo?", database, selection, translation, result, "model",
                           vote=chosen.to_dict())
    text = asking.render_table(res)
    assert "-- timed out: candidates 1, 2 (the question's --db-timeout is shared by its candidates" in text, text
    body = json.loads(asking.render_json(res))
    assert body["candidates"]["timed_out"] == [1, 2]
    assert [r["timed_out"] for r in body["candidates"]["runs"]] == [False, True, True]
