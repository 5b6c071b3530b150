"""`sqltune eval --candidates K` on a predictions file whose lines carry their candidates: the answer is
voted by execution (synthesised databases, or a real SQLite file with --database), scored, and the report
sets it against the greedy answer.

    pytest tests/test_evaluate_candidates.py
"""

from __future__ import annotations

import json
from pathlib import Path

from fixtures_db import cli, seed_sqlite

HEAD = "CREATE TABLE head (name VARCHAR, born_state VARCHAR, age INTEGER)"
STADIUM = "CREATE TABLE stadium (name VARCHAR, city VARCHAR, capacity INTEGER)"
LINES = [
    # the greedy answer is off by one; two samples agree on the right one
    {"question": "Which heads are older than 56?", "context": HEAD, "gold": "SELECT name FROM head WHERE age > 56",
     "candidates": ["SELECT name FROM head WHERE age >= 56", "SELECT name FROM head WHERE age > 56",
                    "SELECT name FROM head WHERE 56 < age", "SELECT born_state FROM head"]},
    # the greedy answer names a column that does not exist; the only sample that runs is right
    {"question": "What is the capacity of the stadium in Guiyang?", "context": STADIUM,
     "gold": "SELECT capacity FROM stadium WHERE city = 'Guiyang'",
     "candidates": ["SELECT size FROM stadium WHERE city = 'Guiyang'", "SELECT capacity FROM stadium WHERE",
                    "SELECT capacity FROM stadium WHERE city = 'Guiyang'"]},
    # all agree: nothing changes
    {"question": "How many heads are there?", "context": HEAD, "gold": "SELECT COUNT(*) FROM head",
     "candidates": ["SELECT COUNT(*) FROM head", "SELECT count(*) FROM head", "SELECT COUNT(name) FROM head"]},
    # the greedy answer is right and the samples outvote it: choosing can lose too, and the report says so
    {"question": "How many distinct states were heads born in?", "context": HEAD,
     "gold": "SELECT COUNT(DISTINCT born_state) FROM head",
     "candidates": ["SELECT COUNT(DISTINCT born_state) FROM head", "SELECT COUNT(born_state) FROM head",
                    "SELECT COUNT(born_state) FROM head"]},
    # nothing runs: the greedy answer stands
    {"question": "What is the oldest age?", "context": HEAD, "gold": "SELECT MAX(age) FROM head",
     "candidates": ["SELECT MAX(agee) FROM head", "SELECT MAX(age FROM head"]},
]


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps({**ln, "predicted": ln["candidates"][0]}) + "\n" for ln in lines))
    return path


def _report(folder: Path) -> tuple[dict, dict[str, dict]]:
    report = json.loads((folder / "report.json").read_text())
    records = {r["question"]: r for r in map(json.loads, (folder / "predictions.jsonl").read_text().splitlines())}
    return report, records


def test_eval_scores_the_voted_answer_and_sets_it_against_the_greedy_one(tmp_path: Path) -> None:
    preds = _write(tmp_path / "preds.jsonl", LINES)
    common = ("eval", "--predictions", str(preds), "--eval-workers", "1")
    rc, out, err = cli(*common, "--candidates", "4", "--report-dir", str(tmp_path / "voted"))
    assert rc == 0, err[-2000:]
    rc, _, err = cli(*common, "--report-dir", str(tmp_path / "greedy"))
    assert rc == 0, err[-2000:]
    voted, records = _report(tmp_path / "voted")
    greedy, _ = _report(tmp_path / "greedy")
    assert voted["settings"]["candidates"] == 4 and greedy["settings"]["candidates"] == 1
    assert greedy["results"]["metrics"]["ex"]["count"] == 2  # greedy: rows 3 and 4
    assert voted["results"]["metrics"]["ex"]["count"] == 3  # voted: rows 1, 2, 3
    votes = voted["results"]["candidates"]
    assert (votes["changed"], votes["gained"], votes["lost"], votes["fallback"]) == (3, 2, 1, 1)
    assert votes["ex_greedy"] == greedy["results"]["metrics"]["ex"]
    assert "Answers chosen among 4 candidates by execution" in out

    first = records["Which heads are older than 56?"]
    assert first["predicted"] == "SELECT name FROM head WHERE age > 56" and first["ex"] and not first["ex_greedy"]
    assert (first["candidates"]["ran"], first["candidates"]["agreed"], first["candidates"]["chosen"]) == (4, 2, 1)
    second = records["What is the capacity of the stadium in Guiyang?"]
    assert [r["failure"] for r in second["candidates"]["runs"]] == ["invalid", "invalid", ""]
    last = records["What is the oldest age?"]
    assert last["candidates"]["fallback"] and last["predicted"] == "SELECT MAX(agee) FROM head"


def test_candidates_are_voted_on_the_real_database_with_database(tmp_path: Path) -> None:
    db = seed_sqlite(tmp_path / "shop.sqlite")
    lines = [{"question": "Which customers live in Oslo?", "gold": "SELECT name FROM customers WHERE city = 'Oslo'",
              "candidates": ["SELECT name FROM customers WHERE city = 'oslo'",  # lowercased: no rows on the real data
                             "SELECT name FROM customers WHERE city = 'Oslo'",
                             "SELECT name FROM customers WHERE city LIKE 'Oslo'"]},
             {"question": "How many products are there?", "gold": "SELECT COUNT(*) FROM products",
              "candidates": ["SELECT COUNT(*) FROM product", "SELECT COUNT(id) FROM products"]}]
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({**ln, "predicted": ln["candidates"][0]}) + "\n" for ln in lines))
    rc, out, err = cli("eval", "--predictions", str(preds), "--database", str(db), "--candidates", "3",
                       "--report-dir", str(tmp_path / "rep"))
    assert rc == 0, err[-2000:]
    report, records = _report(tmp_path / "rep")
    assert report["results"]["metrics"]["ex"]["count"] == 2
    assert report["results"]["candidates"]["ex_greedy"]["count"] == 0
    oslo = records["Which customers live in Oslo?"]
    assert (oslo["candidates"]["ran"], oslo["candidates"]["agreed"]) == (3, 2)
    assert "real sqlite database" in out


def test_candidates_without_any_in_the_file_is_a_clear_error(tmp_path: Path) -> None:
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"question": "q", "context": HEAD, "gold": "SELECT 1 FROM head",
                                 "predicted": "SELECT 1 FROM head"}) + "\n")
    rc, _, err = cli("eval", "--predictions", str(preds), "--candidates", "4", "--report-dir", str(tmp_path / "r"))
    assert rc == 2 and "--candidates 4" in err and "candidates" in err
    rc, _, err = cli("eval", "--predictions", str(preds), "--candidates", "17", "--report-dir", str(tmp_path / "r"))
    assert rc == 2 and "--candidates: 17 is above the maximum 16" in err


def test_eval_with_the_tiny_model_votes_among_its_own_candidates(tiny_model_dir, tmp_path: Path) -> None:
    common = ("eval", "--model", str(tiny_model_dir), "--dataset", "synthetic:300", "--limit", "8",
              "--eval-workers", "1", "--candidate-temperature", "0.8")
    rc, out, err = cli(*common, "--candidates", "3", "--report-dir", str(tmp_path / "voted"))
    assert rc == 0, err[-2000:]
    rc, _, err = cli(*common, "--report-dir", str(tmp_path / "greedy"))
    assert rc == 0, err[-2000:]
    voted, records = _report(tmp_path / "voted")
    _, greedy = _report(tmp_path / "greedy")
    assert voted["results"]["candidates"]["k"] == 3 and voted["settings"]["greedy"] is False
    for question, r in records.items():
        runs = r["candidates"]["runs"]
        assert len(runs) == 3 and r["predicted"] == runs[r["candidates"]["chosen"]]["sql"]
        # the first candidate is the greedy answer a run without --candidates scores
        assert runs[0]["sql"] == r["greedy"] == greedy[question]["predicted"]
        assert all(x["logprob"] is None or x["logprob"] <= 0 for x in runs)
    assert any(len({x["sql"] for x in r["candidates"]["runs"]}) > 1 for r in records.values()), "samples differ"
