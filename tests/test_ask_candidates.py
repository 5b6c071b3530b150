"""`sqltune ask --candidates K` on a real SQLite file: candidates run read-only on the database, the one
whose rows most of them return is the answer, and the output says how many ran and agreed.

    pytest tests/test_ask_candidates.py
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the db extra is not installed: pip install 'sqltune[db]'")
from fixtures_db import cli, file_checksum, seed_sqlite

from sqltune import config
from sqltune.ask import answer as asking
from sqltune.db import connect, introspect
from sqltune.sql.vote import INVALID, Candidate


@pytest.fixture()
def shop(tmp_path: Path) -> Path:
    return seed_sqlite(tmp_path / "shop.sqlite")


def test_the_rows_most_candidates_return_on_the_database_win(shop: Path) -> None:
    cfg, _ = config.load(["--database", str(shop)], {})
    db = connect.connect(str(shop))
    before = file_checksum(shop)
    try:
        schema = introspect.introspect(db).to_schema()
        chosen = asking.choose_on_database(cfg, db, schema, [
            Candidate("SELECT name FROM customers WHERE city = 'oslo'", -0.1),  # lowercased: no rows here
            Candidate("SELECT name FROM customers WHERE city = 'Oslo'", -0.9),
            Candidate("SELECT c.name FROM customers AS c WHERE c.city = 'Oslo' ORDER BY c.id", -1.5),
            Candidate("DELETE FROM customers", -0.01),  # refused before it could run
            Candidate("SELECT name FROM clients", -0.2)])  # no such table
    finally:
        db.close()
    assert (chosen.chosen, chosen.ran, chosen.agreed) == (1, 3, 2)
    assert sorted(chosen.runs[1].results[0].rows) == [("Ann",), ("Cleo",)]
    assert [r.failure for r in chosen.runs[3:]] == [INVALID, INVALID]
    assert file_checksum(shop) == before  # nothing was written


def test_ask_with_the_tiny_model_says_how_many_candidates_ran_and_agreed(tiny_model_dir, shop: Path) -> None:
    question = "How many customers are there?"
    rc, out, err = cli("ask", "--model", str(tiny_model_dir), "--database", str(shop), "--candidates", "4",
                       "--candidate-temperature", "0.8", "--format", "json", question)
    assert rc in (0, 1), err[-2000:]
    body = json.loads(out)
    vote = body["candidates"]
    assert vote["candidates"] == 4 and len(vote["runs"]) == 4 and 0 <= vote["agreed"] <= vote["ran"] <= 4
    assert body["model_sql"] == vote["runs"][vote["chosen"]]["sql"]
    if body["ok"]:  # the answer's rows are what SQLite itself returns for that SQL
        with sqlite3.connect(shop) as conn:
            assert [list(r) for r in conn.execute(body["sql"]).fetchall()] == body["rows"]
    # the greedy candidate is what ask without --candidates writes
    rc, out, _ = cli("ask", "--model", str(tiny_model_dir), "--database", str(shop), "--format", "json", question)
    assert json.loads(out)["model_sql"] == vote["runs"][0]["sql"]
    rc, table, _ = cli("ask", "--model", str(tiny_model_dir), "--database", str(shop), "--candidates", "4", question)
    assert "-- chosen among 4 candidates" in table or "-- none of 4 candidates ran" in table
