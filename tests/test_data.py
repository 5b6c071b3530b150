from __future__ import annotations

import json
from pathlib import Path

import pytest

from sqltune.data import loading, synthetic
from sqltune.errors import DataError

ASSETS = Path(__file__).parent / "assets"


def test_every_bad_row_kind_is_counted_and_skipped() -> None:
    splits = loading.load_splits(str(ASSETS / "bad_rows.jsonl"), eval_fraction=0.0)
    r = splits.report
    assert r.rows_read == 16
    assert dict(r.skipped) == {
        "missing_question": 1, "missing_context": 2, "missing_answer": 1, "empty_question": 1, "empty_answer": 1,
        "non_text_question": 1, "non_text_answer": 1, "context_not_create_table": 2, "not_an_object": 1,
        "invalid_json": 1,
    }
    assert r.duplicates == 1
    assert len(splits.train) == 3 and r.train == 3
    assert {ex.question for ex in splits.train} >= {"Which cities have more than 3 stations?"}


def test_report_is_serialisable_with_totals() -> None:
    report = loading.load_splits(str(ASSETS / "bad_rows.jsonl"), eval_fraction=0.0).report.to_dict()
    assert json.loads(json.dumps(report))["skipped_total"] == 12


def test_split_is_by_question_hash_and_stable() -> None:
    rows = list(synthetic.generate(800, seed=3))
    a = loading.load_splits("synthetic:800", eval_fraction=0.2, seed=3)
    assert 0.1 < len(a.eval) / (len(a.train) + len(a.eval)) < 0.3
    # the same normalised question never sits on both sides
    norm_train = {loading.normalise_question(ex.question) for ex in a.train}
    assert not norm_train & {loading.normalise_question(ex.question) for ex in a.eval}
    # a question's side depends on its text only, not on order, limit or seed
    for ex in a.eval:
        assert loading.is_eval(ex.question.upper() + "  ", 0.2)
    b = loading.load_splits("synthetic:800", eval_fraction=0.2, limit=300, seed=3)
    side_a = {ex.question: False for ex in a.train} | {ex.question: True for ex in a.eval}
    side_b = {ex.question: False for ex in b.train} | {ex.question: True for ex in b.eval}
    assert side_b and all(side_a[q] == side for q, side in side_b.items())
    assert len(rows) == 800


def test_limit_is_a_seeded_random_subset() -> None:
    a = loading.load_splits("synthetic:500", limit=100, seed=1, eval_fraction=0.0)
    b = loading.load_splits("synthetic:500", limit=100, seed=1, eval_fraction=0.0)
    c = loading.load_splits("synthetic:500", limit=100, seed=2, eval_fraction=0.0)
    assert a.train == b.train and a.train != c.train and len(a.train) == 100
    assert a.report.limited_to == 100
    first_100 = loading.load_splits("synthetic:100", seed=1, eval_fraction=0.0).train
    assert a.train != first_100  # a sample of the whole set, not its head


def test_synthetic_is_deterministic_and_covers_the_query_shapes() -> None:
    rows = list(synthetic.generate(600, seed=7))
    assert rows == list(synthetic.generate(600, seed=7))
    assert rows != list(synthetic.generate(600, seed=8))
    answers = " ".join(r["answer"] for r in rows)
    for clause in (" WHERE ", " AND ", "COUNT(", "AVG(", " GROUP BY ", " ORDER BY ", " LIMIT ", " JOIN "):
        assert clause in answers, clause
    assert any(r["context"].count("CREATE TABLE") >= 2 for r in rows)
    for r in rows:
        assert isinstance(loading.validate(r, loading.parse_columns("")), loading.Example)


def test_synthetic_gold_sql_runs_on_its_schema() -> None:
    import sqlite3

    for r in synthetic.generate(300, seed=11):
        db = sqlite3.connect(":memory:")
        for stmt in r["context"].split(";"):
            db.execute(stmt)
        db.execute(r["answer"]).fetchall()


def test_column_mapping_and_other_formats(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame([{"q": "How many heads?", "schema": "CREATE TABLE head (age INTEGER)",
                           "sql": "SELECT COUNT(*) FROM head"},
                          {"q": "Oldest?", "schema": "CREATE TABLE head (age INTEGER)", "sql": "SELECT MAX(age) FROM head"}])
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(frame.to_json(orient="records"))
    for name in ("d.csv", "d.parquet", "d.json"):
        splits = loading.load_splits(str(tmp_path / name), columns="question=q,context=schema,answer=sql", eval_fraction=0.0)
        assert [ex.answer for ex in splits.train] == ["SELECT COUNT(*) FROM head", "SELECT MAX(age) FROM head"], name
    with pytest.raises(DataError, match="no usable rows"):
        loading.load_splits(str(tmp_path / "d.csv"), eval_fraction=0.0)
    with pytest.raises(DataError, match="field=column"):
        loading.parse_columns("question")


def test_missing_file_and_bad_synthetic_spec(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        loading.load_splits(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="positive integer"):
        loading.load_splits("synthetic:lots")


def test_shared_sql_create_context_loads_cleanly(shared_data: Path) -> None:
    splits = loading.load_splits(str(shared_data), eval_fraction=0.05, seed=0)
    assert splits.report.rows_read == 9710
    assert sum(splits.report.skipped.values()) == 0
    assert 0.03 < len(splits.eval) / 9710 < 0.07


def _literal_cases() -> list[dict]:
    return [json.loads(line) for line in (ASSETS / "literal_case.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("row", _literal_cases(), ids=lambda r: r["case"])
def test_answer_literals_take_the_question_spelling(row):
    from sqltune.data.literals import question_case

    fixed, changed = question_case(row["question"], row["answer"], row["context"])
    assert fixed == row["expected"]
    assert (changed > 0) == (row["answer"] != row["expected"])


def test_literal_case_is_applied_at_load_counted_and_can_be_turned_off(tmp_path):
    rows = _literal_cases()
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("question", "context", "answer")}) + "\n" for r in rows))
    on = loading.load_splits(str(path), eval_fraction=0.0)
    assert [ex.answer for ex in on.train] == [r["expected"] for r in rows]
    changed_rows = sum(r["answer"] != r["expected"] for r in rows)
    assert on.report.to_dict()["literal_case_rows"] == changed_rows == 4
    assert on.report.to_dict()["literal_case_literals"] == 5
    off = loading.load_splits(str(path), eval_fraction=0.0, keep_literal_case=True)
    assert [ex.answer for ex in off.train] == [r["answer"] for r in rows]
    assert off.report.to_dict()["literal_case_rows"] is None


def test_keep_literal_case_is_a_config_field():
    from sqltune import config

    cfg, _ = config.load(["--keep-literal-case"], {})
    assert cfg.keep_literal_case is True
    assert config.load([], {})[0].keep_literal_case is False


def test_multi_table_rows_are_repeated_and_single_table_rows_are_not():
    single = loading.Example("How many?", "CREATE TABLE t (a VARCHAR)", "SELECT COUNT(*) FROM t")
    by_context = loading.Example("Which a?", "CREATE TABLE t (a VARCHAR); CREATE TABLE u (a VARCHAR)",
                                 "SELECT a FROM t EXCEPT SELECT a FROM u")
    by_join = loading.Example("Which b?", "CREATE TABLE t (a VARCHAR, b VARCHAR)",
                              "SELECT T1.b FROM t AS T1 JOIN t AS T2 ON T1.a = T2.a")
    rows, added = loading.repeat_multi_table([single, by_context, by_join], 3)
    assert added == 4
    assert rows.count(single) == 1 and rows.count(by_context) == 3 and rows.count(by_join) == 3
    assert loading.repeat_multi_table([single, by_context], 1) == ([single, by_context], 0)


def test_multi_table_repeat_is_a_config_field_with_a_floor():
    from sqltune import config
    from sqltune.errors import ConfigError

    assert config.load(["--multi-table-repeat", "3"], {})[0].multi_table_repeat == 3
    assert config.load([], {})[0].multi_table_repeat == 1
    with pytest.raises(ConfigError, match="--multi-table-repeat: 0 is below the minimum 1"):
        config.load(["--multi-table-repeat", "0"], {})


def test_non_utf8_bytes_in_a_dataset_are_a_skipped_row_not_a_traceback(tmp_path: Path) -> None:
    from tests.conftest import run_sqltune

    path = tmp_path / "mixed.jsonl"
    good = b'{"question": "How many heads?", "context": "CREATE TABLE head (age INTEGER)", "answer": "SELECT count(*) FROM head"}\n'
    path.write_bytes(good + b'{"question": "caf\xe9?", "context": "CREATE TABLE t (a INTEGER)", "answer": "SELECT a FROM t"}\n')
    splits = loading.load_splits(str(path), eval_fraction=0.0)
    assert len(splits.train) == 1 and splits.report.skipped == {"not_utf8": 1}
    done = run_sqltune("eval", "--self-check", "--dataset", str(path), "--report-dir", str(tmp_path / "r"), check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    array = tmp_path / "array.json"
    array.write_bytes(b'[{"question": "caf\xe9?"}]')
    with pytest.raises(DataError, match="not UTF-8 text"):
        loading.load_splits(str(array))
