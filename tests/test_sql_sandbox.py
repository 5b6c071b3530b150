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


BUDGET = 0.5
LONG = "printf('%.*c', 99990, 'a')"  # a value near the 100 kB length limit
NEEDLE = "printf('%.*c', 40000, 'a') || 'b'"  # almost matches LONG everywhere: the worst case of a search
MANY_ROWS = "FROM t a, t b, t c, t d"  # 10 000 rows


@pytest.mark.parametrize(("sql", "kind"), [
    ("SELECT printf('%.*c', 1e9, 'x')", "too_big"),  # 8.5 s in one call before: a loop per character
    ("SELECT format('%.*c', 1000000000, 'x')", "too_big"),
    ("SELECT printf(CAST('%.*c' AS BLOB), '1000000000', 'x')", "too_big"),
    ("SELECT printf('%.*c%.*c', 60000, 'x', 60000, 'y')", "too_big"),  # widths add up
    (f"SELECT count(printf('%.*c', 90000 + a.a, 'x')) {MANY_ROWS}", "timeout"),
    (f"SELECT count(replace({LONG} || a.a, {NEEDLE}, 'x')) {MANY_ROWS}", "timeout"),  # 0.1 s a row
    (f"SELECT count(instr({LONG} || a.a, {NEEDLE})) {MANY_ROWS}", "timeout"),
    (f"SELECT {LONG} LIKE '%' || {NEEDLE}", "too_big"),  # 3.7 s in one call with SQLite's default limit
    (f"SELECT {LONG} GLOB '*' || {NEEDLE}", "too_big"),
    ("SELECT zeroblob(1000000000)", "too_big"),
    ("SELECT randomblob(1000000000)", "too_big"),
    ("SELECT group_concat(randomblob(99999)) FROM t a, t b", "too_big"),
    ("SELECT hex(randomblob(99999))", "too_big"),
    (f"SELECT {LONG} || {LONG}", "too_big"),
    (f"SELECT count(substr({LONG} || a.a, 2)) {MANY_ROWS}, t e", "timeout"),
    (f"SELECT count(upper(char(a.a + 65) || {LONG})) {MANY_ROWS}, t e", "timeout"),
])
def test_a_costly_function_stays_within_the_time_budget(sql: str, kind: str) -> None:
    with Sandbox(DDL, ROWS, time_budget_s=BUDGET, instruction_budget=10**12) as box:
        result = box.run(sql)
        assert result.error_kind == kind, result
        assert not result.ok and result.error
        assert result.elapsed_ms < 2 * BUDGET * 1000, result
        assert box.run("SELECT count(*) FROM t").rows == ((10,),)  # and the next query is not interrupted


def test_printf_keeps_sqlites_meaning_within_the_limit() -> None:
    with Sandbox(DDL, ROWS) as box:
        got = box.run("SELECT printf('%d|%5s|%-3d|%.2f|%%|%.*c|%s', a, b, a, 2.5, 3, 'z', NULL) FROM t WHERE a = 7")
        assert got.rows == (("7|   v7|7  |2.50|%|zzz|",),)
        assert box.run("SELECT format('%x', 255), printf(NULL), printf('%s')").rows == (("ff", None, ""),)
