"""`sqltune eval --database`: gold and predicted SQL scored on a real database.

    pytest tests/test_db_eval.py

The agreement test puts the very rows the synthesised-database evaluation scores each question
on (one database per question, sqltune.evaluate.score's own seed) into a SQLite file and a
PostgreSQL database, then scores the same predictions three ways. On the SQLite file the result
must be the synthesised one exactly (same engine, same rows); on PostgreSQL it must agree on the
questions where both apply (the gold runs on both), whatever sqlglot had to translate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the db extra is not installed: pip install 'sqltune[db]'")
from fixtures_db import READER, READER_PASS, build_from_examples, build_postgres_db, cli, pg_server_fixture, seed_sqlite  # noqa: F401

SEED = 7


def _mutate(i: int, gold: str) -> str:
    """Predictions that are right, too broad, or the wrong column, in turn."""
    if i % 3 == 1:
        return re.split(r"\s+WHERE\s+", gold, maxsplit=1, flags=re.I)[0]
    if i % 3 == 2:
        return re.sub(r"^SELECT\s+.+?\s+FROM\s", "SELECT COUNT(*) FROM ", gold, count=1, flags=re.I | re.S)
    return gold


def _records(folder: Path) -> dict[str, dict]:
    return {r["question"]: r for r in map(json.loads, (folder / "predictions.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def agreement(shared_data, pg_server, tmp_path_factory) -> dict[str, dict[str, dict]]:
    tmp = tmp_path_factory.mktemp("agree")
    built = build_from_examples(shared_data, 90, SEED)
    assert len(built.lines) >= 60
    lite = tmp / "questions.sqlite"
    seed_sqlite(lite, built.ddl, built.rows)
    build_postgres_db(pg_server, "questions", built)
    preds = tmp / "preds.jsonl"
    preds.write_text("".join(json.dumps({**line, "predicted": _mutate(i, line["gold"])}) + "\n"
                             for i, line in enumerate(built.lines)))
    common = ("eval", "--predictions", str(preds), "--seed", str(SEED), "--eval-workers", "1")
    runs = {"synth": ("--eval-databases", "1"), "sqlite": ("--database", str(lite)),
            "postgresql": ("--database", pg_server.url("questions", READER, READER_PASS))}
    out = {}
    for name, extra in runs.items():
        rc, stdout, stderr = cli(*common, *extra, "--report-dir", str(tmp / name))
        assert rc == 0, stderr[-2000:]
        assert READER_PASS not in stdout + stderr + (tmp / name / "report.json").read_text()
        out[name] = _records(tmp / name)
        out[name]["__report__"] = json.loads((tmp / name / "report.json").read_text())
    return out


def test_eval_on_the_sqlite_file_is_the_synthesised_eval(agreement) -> None:
    synth, lite = agreement["synth"], agreement["sqlite"]
    questions = [q for q in synth if q != "__report__"]
    assert sorted(questions) == sorted(q for q in lite if q != "__report__")
    scored = [q for q in questions if synth[q]["gold_ok"]]
    assert len(scored) >= 50
    assert [lite[q]["ex"] for q in scored] == [synth[q]["ex"] for q in scored]
    assert [lite[q]["gold_ok"] for q in scored] == [True] * len(scored)
    ex = [synth[q]["ex"] for q in scored]
    assert 0 < sum(ex) < len(ex)  # the predictions tell right from wrong, so agreeing means something


def test_eval_on_postgresql_agrees_where_both_apply(agreement) -> None:
    synth, pg = agreement["synth"], agreement["postgresql"]
    both = [q for q in synth if q != "__report__" and synth[q]["gold_ok"] and pg[q]["gold_ok"]]
    assert len(both) >= 40, f"only {len(both)} questions ran on both"
    disagree = [(q, pg[q]["sql_run"], pg[q]["error"]) for q in both if synth[q]["ex"] != pg[q]["ex"]]
    assert len(disagree) <= 0.05 * len(both), disagree[:5]
    report = agreement["postgresql"]["__report__"]
    assert report["database"]["database"].endswith("/questions") and "***" in report["database"]["database"]
    print(f"postgresql vs synthesised: {len(both)} of {len(synth) - 1} questions ran on both, "
          f"{len(disagree)} disagree; EX {sum(pg[q]['ex'] for q in both)}/{len(both)} vs "
          f"{sum(synth[q]['ex'] for q in both)}/{len(both)}")
    assert report["results"]["by_source"] == {"postgresql": report["results"]["by_source"]["postgresql"]}


def test_eval_report_names_the_database(agreement) -> None:
    for engine in ("sqlite", "postgresql"):
        report = agreement[engine]["__report__"]
        assert report["database"]["engine"] == engine
        assert report["database"]["server_version"].startswith("SQLite " if engine == "sqlite" else "PostgreSQL ")
        assert report["dataset"]["context"] == "read from the database"
    assert "databases" not in agreement["synth"]["__report__"].get("database", {})


def test_eval_with_the_tiny_model_on_a_database(tiny_model_dir, tmp_path) -> None:

    db = seed_sqlite(tmp_path / "shop.sqlite")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in [
        {"question": "How many customers are there?", "answer": "SELECT COUNT(*) FROM customers"},
        {"question": "Names of customers in Oslo", "answer": 'SELECT name FROM customers WHERE city = "Oslo"'},
        {"question": "No gold here"}]))
    rc, out, err = cli("eval", "--model", str(tiny_model_dir), "--dataset", str(questions), "--database", str(db),
                       "--report-dir", str(tmp_path / "rep"))
    assert rc == 0, err[-2000:]
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["dataset"]["examples"] == 2 and report["dataset"]["skipped"] == {"missing_question_or_answer": 1}
    assert report["results"]["gold_check"]["dataset_errors"] == 0
    assert f"on the real sqlite database {db.resolve()}" in out
    records = _records(tmp_path / "rep")
    assert "CREATE TABLE customers" in records["How many customers are there?"]["context"]
