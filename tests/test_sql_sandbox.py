"""The SQLite sandbox against an adversarial corpus (tests/assets/sandbox_corpus.yaml): every
query gets its explicit outcome, nothing reaches the disk, and the data survives."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sqltune.sql.sandbox import ERROR_KINDS, ExecResult, Sandbox

CORPUS = yaml.safe_load((Path(__file__).parent / "assets" / "sandbox_corpus.yaml").read_text())
DDL = ["CREATE TABLE t (a INTEGER, b VARCHAR)"]
ROWS = {"t": [(i, f"v{i}") for i in range(10)]}


@pytest.fixture
def box():
    with Sandbox(DDL, ROWS, time_budget_s=2.0) as sandbox:
        yield sandbox


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_corpus_outcome(case: dict, box: Sandbox, tmp_path: Path) -> None:
    result = box.run(case["sql"].replace("{tmp}", str(tmp_path)))
    assert isinstance(result, ExecResult)
    assert result.error_kind == case["kind"], result.error
    assert result.ok == (case["kind"] == "")
    assert result.timed_out == (case["kind"] == "timeout")
    assert result.error_kind in ("", *ERROR_KINDS)
    if not result.ok:
        assert result.error, "a failure must say why"
    if "rows" in case:
        assert len(result.rows) == case["rows"]
    assert list(tmp_path.iterdir()) == [], "the sandbox wrote to disk"
    # whatever was attempted, the data is intact and the sandbox still answers
    after = box.run("SELECT count(*), sum(a) FROM t")
    assert after.ok and after.rows == ((10, 45),)


def test_corpus_covers_the_attacks_named_in_the_issue() -> None:
    text = " ".join(c["sql"].upper() for c in CORPUS)
    for attack in ("ATTACH", "PRAGMA", "INSERT", "DELETE", "DROP", "LOAD_EXTENSION", "WITH RECURSIVE", "T A, T B"):
        assert attack in text


def test_time_budget_aborts_and_says_so() -> None:
    with Sandbox(DDL, ROWS, time_budget_s=0.2, instruction_budget=10**12) as box:
        result = box.run("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c")
    assert result.timed_out and result.error_kind == "timeout"
    assert "time budget" in result.error
    assert result.elapsed_ms < 5000  # aborted near the 0.2 s budget, not left to run


def test_instruction_budget_aborts_and_says_so() -> None:
    with Sandbox(DDL, ROWS, time_budget_s=60, instruction_budget=100_000) as box:
        result = box.run("SELECT count(*) FROM t a, t b, t c, t d, t e")
    assert result.timed_out and "instruction budget" in result.error


def test_row_cap_keeps_the_first_rows_and_flags_truncation() -> None:
    with Sandbox(DDL, ROWS, row_cap=5) as box:
        capped = box.run("SELECT a FROM t ORDER BY a")
        exact = box.run("SELECT a FROM t WHERE a < 5")
    assert not capped.ok and capped.truncated and capped.error_kind == "row_limit"
    assert [r[0] for r in capped.rows] == [0, 1, 2, 3, 4]
    assert exact.ok and not exact.truncated and len(exact.rows) == 5


def test_results_carry_columns_and_values() -> None:
    with Sandbox(DDL, ROWS) as box:
        result = box.run("SELECT b AS name, a * 2 FROM t WHERE a = 3")
    assert result.ok and result.columns == ("name", "a * 2") and result.rows == (("v3", 6),)
    assert result.to_dict()["rows"] == [["v3", 6]]


def test_a_budget_abort_leaves_the_sandbox_usable() -> None:
    with Sandbox(DDL, ROWS, instruction_budget=100_000) as box:
        assert box.run("SELECT count(*) FROM t a, t b, t c, t d, t e, t f").timed_out
        again = box.run("SELECT count(*) FROM t")
    assert again.ok and again.rows == ((10,),)


def test_double_quoted_strings_follow_sqlite() -> None:
    # sql-create-context quotes strings with double quotes; SQLite reads an unknown "x" as a string
    with Sandbox(["CREATE TABLE p (grid VARCHAR, name VARCHAR)"], {"p": [("9", "ann")]}) as box:
        assert box.run('SELECT name FROM p WHERE grid = "9"').rows == (("ann",),)
        assert box.run("SELECT name FROM p WHERE grid = 9").rows == (("ann",),)
