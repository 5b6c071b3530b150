"""The playground page at `/` of a real `sqltune serve` (tiny model, API key on) in headless
Chromium, and the two routes it reads: /v1/sql/stream (tokens as server-sent events) and
/v1/sql/run (rows on a database synthesised from the schema, in the sandbox).

    pytest tests/test_serve_playground.py      # browser tests need: apt-get install chromium chromium-driver

The screenshot of an answered question is saved as reports/playground.png (its path is printed).
"""

from __future__ import annotations

import fnmatch
import json
import re
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from fixtures_browser import browser_fixture, by_id, result_table, shown, wait  # noqa: F401

from sqltune.serve.lint import lint
from sqltune.serve.process import ServerProcess
from sqltune.sql.schema import parse_schema

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "reports" / "playground.png"
KEY = "playground-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCHEMA = "CREATE TABLE employee (name VARCHAR, department VARCHAR, city VARCHAR, age INTEGER, salary INTEGER)"
QUESTION = "What is the average salary of employees with department Sales?"
BAD_SCHEMA = "CREATE TABLE employee (name VARCHAR,"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny-sql", "--max-model-len", "256",
            "--default-max-tokens", "48", "--max-batch-size", "4"]
    with ServerProcess(args, env={"SQLTUNE_API_KEY": KEY}) as s:
        yield s


def post(server, path: str, body: dict, auth: bool = True) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH if auth else {}, timeout=60)


def sse(response: httpx.Response) -> list[dict]:
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


# --- the page itself --------------------------------------------------------------------------------


def test_the_page_is_served_without_the_key_and_loads_nothing_from_elsewhere(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    print(f"playground page: {len(r.content)} bytes")
    assert len(r.content) < 60_000, "one small page, no bundled framework"
    assert not re.findall(r"""(?:src|href|url)\s*[=(]\s*["']?\s*(?:https?:)?//""", html, re.I), "an external resource"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", csp), csp
    # the key still guards everything else
    assert httpx.get(server.url + "/v1/models").status_code == 401


# --- /v1/sql/run -------------------------------------------------------------------------------------


def test_run_returns_rows_that_sqlite_gets_on_the_same_database(server):
    sql = "SELECT name, salary FROM employee WHERE department = 'Sales' AND age > 40 ORDER BY salary"
    r = post(server, "/v1/sql/run", {"context": SCHEMA, "sql": sql, "question": QUESTION, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["valid"] is True and body["error"] is None and body["tables"] == ["employee"]
    result = body["result"]
    assert result["ok"] and result["columns"] == ["name", "salary"]
    assert result["rows"], "the query is the plan, so some synthesised row satisfies its WHERE"
    (table,) = body["database"]
    assert table["name"] == "employee" and table["columns"] == ["name", "department", "city", "age", "salary"]
    # the database the server says it used, rebuilt in plain SQLite, gives the same rows
    db = sqlite3.connect(":memory:")
    db.execute(SCHEMA)
    db.executemany("INSERT INTO employee VALUES (?, ?, ?, ?, ?)", table["rows"])
    assert [list(row) for row in db.execute(sql)] == result["rows"]
    assert len(table["rows"]) > len(result["rows"]), "rows that just miss the WHERE are there too"
    again = post(server, "/v1/sql/run", {"context": SCHEMA, "sql": sql, "question": QUESTION, "seed": 3}).json()
    assert again["database"] == body["database"], "same seed, same database"


def test_run_reports_what_the_sandbox_refused_or_stopped(server):
    def run(sql: str, **extra) -> dict:
        r = post(server, "/v1/sql/run", {"context": SCHEMA, "sql": sql, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    deleted = run("DELETE FROM employee")
    assert deleted["valid"] is False and "not a read-only query" in deleted["error"]
    assert deleted["result"]["ok"] is False and deleted["result"]["error_kind"] == "denied"

    started = time.perf_counter()
    runaway = run("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n")
    assert runaway["result"]["timed_out"] is True and runaway["result"]["error_kind"] == "timeout"
    assert time.perf_counter() - started < 5

    many = run("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 50) SELECT i FROM n", max_rows=7)
    assert many["result"]["truncated"] is True and many["result"]["rows"] == [[i] for i in range(1, 8)]

    odd = run("SELECT x'00ff', 1e999, -1e999, zeroblob(2), printf('%.2000c', 'a') FROM employee LIMIT 1")
    assert odd["result"]["rows"][0][:4] == ["x'00ff'", "inf", "-inf", "x'0000'"]
    assert odd["result"]["cells_cut"] is True and len(odd["result"]["rows"][0][4]) == 1001


@pytest.mark.parametrize(("body", "status", "param", "needle"), [
    ({"sql": "SELECT 1"}, 400, "body", "give `context`"),
    ({"context": SCHEMA}, 400, "sql", "Field required"),
    ({"context": SCHEMA, "sql": " ; "}, 400, "body", "sql is blank"),
    ({"context": BAD_SCHEMA, "sql": "SELECT name FROM employee"}, 400, "context", "not valid CREATE TABLE"),
    ({"context": "SELECT 1", "sql": "SELECT 1"}, 400, "context", "not CREATE TABLE"),
    ({"context": SCHEMA, "sql": "SELECT 1", "max_rows": 0}, 400, "max_rows", "greater than or equal to 1"),
    ({"context": SCHEMA, "sql": "x" * 20_001}, 400, "sql", "at most 20000 characters"),
])
def test_run_refuses_bad_input_with_a_json_error_naming_it(server, body, status, param, needle):
    r = post(server, "/v1/sql/run", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error


@pytest.mark.parametrize("path", ["/v1/sql/run", "/v1/sql/stream"])
def test_both_routes_need_the_key(server, path):
    r = post(server, path, {"context": SCHEMA, "sql": "SELECT name FROM employee", "question": QUESTION}, auth=False)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_an_installed_package_carries_the_page():
    """setuptools ships only the data files pyproject names: every file of static/ must match them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    static = sorted(p.relative_to(ROOT / "sqltune" / "serve").as_posix()
                    for p in (ROOT / "sqltune" / "serve" / "static").iterdir())
    assert "static/playground.html" in static
    assert [f for f in static if not any(fnmatch.fnmatch(f, pat) for pat in patterns["sqltune.serve"])] == []


# --- /v1/sql/stream ----------------------------------------------------------------------------------


def test_stream_sends_tokens_as_they_come_then_the_same_answer_as_v1_sql(server):
    whole = post(server, "/v1/sql", {"context": SCHEMA, "question": QUESTION}).json()
    events = sse(post(server, "/v1/sql/stream", {"context": SCHEMA, "question": QUESTION}))
    tokens, (answer,) = events[:-1], events[-1:]
    assert len(tokens) > 3 and all(set(e) == {"text"} for e in tokens), "one event per token, not one lump"
    assert answer.pop("done") is True
    hints = answer.pop("lint")
    assert hints == (lint(whole["sql"], parse_schema(SCHEMA), QUESTION) if whole["valid"] else [])
    assert answer == whole
    completion = whole["usage"]["completion_tokens"]  # the EOS token has no text, so one event fewer
    assert completion - 1 <= len(tokens) <= completion
    assert whole["sql"] in " ".join("".join(e["text"] for e in tokens).split())


def test_stream_refuses_a_bad_schema_before_it_starts(server):
    r = post(server, "/v1/sql/stream", {"context": BAD_SCHEMA, "question": QUESTION})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "invalid_schema"


# --- in headless Chromium ----------------------------------------------------------------------------


def _ask(browser, asked_before: int) -> None:
    by_id(browser, "ask").click()
    wait(browser, lambda b: by_id(b, "key-form").is_displayed() or
          b.find_element("tag name", "body").get_attribute("data-asked") == str(asked_before + 1))


def test_the_page_asks_for_the_key_once_then_streams_the_sql_its_check_and_its_rows(server, browser):
    started = time.perf_counter()
    browser.get(server.url + "/")
    # the page's first request gets a 401: it asks for the key; a wrong one is refused with the reason
    wait(browser, lambda b: by_id(b, "key-form").is_displayed())
    by_id(browser, "key").send_keys("not-the-key")
    by_id(browser, "key-save").click()
    wait(browser, lambda b: "wrong API key" in by_id(b, "key-note").text)
    by_id(browser, "key").send_keys(KEY)
    by_id(browser, "key-save").click()
    wait(browser, lambda b: by_id(b, "model").text == "model: tiny-sql")
    assert not by_id(browser, "key-form").is_displayed()

    # the first example is filled in; ask it: the page shows what /v1/sql and /v1/sql/run say, streamed
    assert by_id(browser, "schema").get_attribute("value") == SCHEMA
    assert by_id(browser, "question").get_attribute("value") == QUESTION
    _ask(browser, 0)
    assert not by_id(browser, "error").is_displayed(), by_id(browser, "error").text
    expected = post(server, "/v1/sql", {"context": SCHEMA, "question": QUESTION}).json()
    sql = by_id(browser, "sql")
    assert sql.text == expected["sql"] != ""
    completion = expected["usage"]["completion_tokens"]  # the EOS token has no text, so one event fewer
    assert completion - 1 <= int(sql.get_attribute("data-tokens")) <= completion and completion > 3, "streamed"
    assert sql.find_elements("css selector", "span.kw"), "highlighted"
    badge = by_id(browser, "valid-badge").text
    hints = lint(expected["sql"], parse_schema(SCHEMA), QUESTION) if expected["valid"] else []
    warned = f" · {len(hints)} warning{'s' if len(hints) > 1 else ''}" if hints else ""
    assert badge == ("runs safely on this schema" + warned if expected["valid"] else f"refused: {expected['error']}")
    assert [li.text for li in browser.find_elements("css selector", "#lint li")] == hints
    run = post(server, "/v1/sql/run", {"context": SCHEMA, "sql": expected["sql"], "question": QUESTION,
                                       "max_rows": 100}).json()["result"]
    if run["ok"]:
        assert result_table(browser) == (run["columns"], shown(run["rows"]))
    else:  # the tiny model's SQL often does not run: the page says why, as the sandbox did
        assert by_id(browser, "result-note").text == f"It did not run ({run['error_kind']}): {run['error']}"

    # edit the SQL and run it: its check and its rows on the synthesised database
    by_id(browser, "edit").click()
    editor = by_id(browser, "sql-edit")
    assert editor.get_attribute("value") == expected["sql"]
    mine = "SELECT name, salary FROM employee WHERE department = 'Sales' ORDER BY salary DESC"
    editor.clear()
    editor.send_keys(mine)
    by_id(browser, "run").click()
    wait(browser, lambda b: b.find_element("tag name", "body").get_attribute("data-ran") == "1")
    assert not by_id(browser, "error").is_displayed(), by_id(browser, "error").text
    assert [s.text for s in sql.find_elements("css selector", "span.kw")] == ["SELECT", "FROM", "WHERE", "ORDER", "BY",
                                                                             "DESC"]
    assert sql.find_element("css selector", "span.str").text == "'Sales'"
    assert by_id(browser, "valid-badge").text == "runs safely on this schema"
    assert "ok" in by_id(browser, "valid-badge").get_attribute("class")
    ran = post(server, "/v1/sql/run", {"context": SCHEMA, "sql": mine, "question": QUESTION, "max_rows": 100}).json()
    assert ran["result"]["rows"], ran
    assert result_table(browser) == (["name", "salary"], shown(ran["result"]["rows"]))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    print(f"screenshot: {SCREENSHOT} ({SCREENSHOT.stat().st_size} bytes); "
          f"load, key, ask, edit and run took {time.perf_counter() - started:.1f}s")
    assert SCREENSHOT.stat().st_size > 10_000

    # a reload keeps the key for this tab: no second prompt
    browser.refresh()
    wait(browser, lambda b: by_id(b, "model").text == "model: tiny-sql")
    assert not by_id(browser, "key-form").is_displayed()
    problems = [e["message"] for e in browser.get_log("browser")
                if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]]
    assert problems == []


def test_a_bad_schema_shows_the_servers_error_on_the_page(server, browser):
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.setItem('sqltune.apiKey', arguments[0])", KEY)  # as the form keeps it
    browser.refresh()
    wait(browser, lambda b: by_id(b, "model").text == "model: tiny-sql")
    schema = by_id(browser, "schema")
    schema.clear()
    schema.send_keys(BAD_SCHEMA)
    assert by_id(browser, "example").get_attribute("value") == "own"
    _ask(browser, 0)
    error = by_id(browser, "error")
    assert error.is_displayed() and "context is not valid CREATE TABLE SQL" in error.text, error.text
    assert by_id(browser, "sql").text == "" and by_id(browser, "rows").text == ""

    # and an empty question is refused on the page, before any request
    from selenium.webdriver.support.ui import Select

    Select(by_id(browser, "example")).select_by_index(1)  # picking an example fills both fields again
    assert "CREATE TABLE player" in by_id(browser, "schema").get_attribute("value")
    by_id(browser, "question").clear()
    _ask(browser, 1)
    assert by_id(browser, "error").text == "Type a question."


def test_the_highlighter_tokenizes_sql_without_losing_a_character(server, browser):
    browser.get(server.url + "/")
    sql = "SELECT count(*), \"odd col\" FROM t -- note\nWHERE name = 'O''Brien' AND x >= 1.5e3 /* c */"
    got = browser.execute_script("return window.sqltunePlayground.tokens(arguments[0])", sql)
    assert "".join(text for _, text in got) == sql
    kinds = {text: kind for kind, text in got if kind}
    assert kinds["SELECT"] == kinds["WHERE"] == kinds["AND"] == "kw"
    assert kinds["count"] == "fn" and kinds['"odd col"'] == "ident" and kinds["'O''Brien'"] == "str"
    assert kinds["1.5e3"] == "num" and kinds["-- note"] == "com" and kinds["/* c */"] == "com"
    assert ("", "name") in [tuple(t) for t in got]  # a plain column name is left as it is


ELECTION = ("CREATE TABLE people (people_id INTEGER, first_name VARCHAR, last_name VARCHAR); "
            "CREATE TABLE candidates (candidate_id INTEGER, people_id INTEGER, support_rate REAL)")


def test_the_badge_says_what_was_checked_and_warnings_stand_apart(server, browser):
    """A wrong answer that runs (a bare column under GROUP BY, the question's table never read) gets
    "runs safely" with warnings beside it, never a green badge a person reads as "correct"."""
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.setItem('sqltune.apiKey', arguments[0])", KEY)
    browser.refresh()
    wait(browser, lambda b: by_id(b, "model").text == "model: tiny-sql")
    schema = by_id(browser, "schema")
    schema.clear()
    schema.send_keys(ELECTION)
    question = by_id(browser, "question")
    question.clear()
    question.send_keys("Show the first and last names of people who are candidates")

    def run(sql: str, n: int) -> None:
        if not by_id(browser, "sql-edit").is_displayed():
            by_id(browser, "edit").click()
        by_id(browser, "sql-edit").clear()
        by_id(browser, "sql-edit").send_keys(sql)
        by_id(browser, "run").click()
        wait(browser, lambda b: b.find_element("tag name", "body").get_attribute("data-ran") == str(n))

    run("SELECT first_name, last_name FROM people GROUP BY first_name", 1)
    badge = by_id(browser, "valid-badge")
    assert badge.text == "runs safely on this schema · 2 warnings"
    assert "warn" in badge.get_attribute("class") and "ok" not in badge.get_attribute("class").split()
    assert "does not say the SQL answers the question" in badge.get_attribute("title")
    warnings = [li.text for li in browser.find_elements("css selector", "#lint li")]
    assert warnings == [
        "`last_name` is neither grouped nor aggregated (under GROUP BY): SQLite takes a value from an "
        "arbitrary row of each group, PostgreSQL refuses the query",
        "the question names `candidates` but the SQL never reads that table"]

    run("SELECT p.first_name, p.last_name FROM people AS p JOIN candidates AS c ON p.people_id = c.people_id", 2)
    assert by_id(browser, "valid-badge").text == "runs safely on this schema"
    assert "ok" in by_id(browser, "valid-badge").get_attribute("class").split()
    assert browser.find_elements("css selector", "#lint li") == []

    run("DELETE FROM people", 3)
    assert by_id(browser, "valid-badge").text.startswith("refused: not a read-only query")
