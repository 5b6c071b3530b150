"""The playground page at `/` of a real `sqltune serve` (tiny model, API key on) in headless
Chromium, and the two routes it reads: /v1/sql/stream (tokens as server-sent events) and
/v1/sql/run (rows on a database synthesised from the schema, in the sandbox).

    pytest tests/test_serve_playground.py      # browser tests need: apt-get install chromium chromium-driver

The screenshot of an answered question is saved as reports/playground.png (its path is printed).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path

import httpx
import pytest

from sqltune.serve.process import ServerProcess

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
    assert len(r.content) < 40_000, "one small page, no bundled framework"
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
    assert answer == whole
    completion = whole["usage"]["completion_tokens"]  # the EOS token has no text, so one event fewer
    assert completion - 1 <= len(tokens) <= completion
    assert whole["sql"] in " ".join("".join(e["text"] for e in tokens).split())


def test_stream_refuses_a_bad_schema_before_it_starts(server):
    r = post(server, "/v1/sql/stream", {"context": BAD_SCHEMA, "question": QUESTION})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "invalid_schema"


# --- in headless Chromium ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        why = "needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(why + " (.ci/run installs them)")
        pytest.skip(why)
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,960",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox on
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the Service path skips Selenium Manager, which would try to download a driver
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    chrome.set_page_load_timeout(30)
    yield chrome
    chrome.quit()


def _wait(browser, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(condition)


def _by_id(browser, name: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, name)


def _ask(browser, asked_before: int) -> None:
    _by_id(browser, "ask").click()
    _wait(browser, lambda b: _by_id(b, "key-form").is_displayed() or
          b.find_element("tag name", "body").get_attribute("data-asked") == str(asked_before + 1))


def _result_table(browser) -> tuple[list[str], list[list[str]]]:
    table = _by_id(browser, "result")
    header = [th.text for th in table.find_elements("css selector", "thead th")]
    rows = [[td.text for td in tr.find_elements("css selector", "td")]
            for tr in table.find_elements("css selector", "tbody tr")]
    return header, rows


def _shown(rows: list[list]) -> list[list[str]]:
    return [["NULL" if v is None else str(v) for v in row] for row in rows]


def test_the_page_asks_for_the_key_once_then_streams_the_sql_its_check_and_its_rows(server, browser):
    started = time.perf_counter()
    browser.get(server.url + "/")
    # the page's first request gets a 401: it asks for the key; a wrong one is refused with the reason
    _wait(browser, lambda b: _by_id(b, "key-form").is_displayed())
    _by_id(browser, "key").send_keys("not-the-key")
    _by_id(browser, "key-save").click()
    _wait(browser, lambda b: "wrong API key" in _by_id(b, "key-note").text)
    _by_id(browser, "key").send_keys(KEY)
    _by_id(browser, "key-save").click()
    _wait(browser, lambda b: _by_id(b, "model").text == "model: tiny-sql")
    assert not _by_id(browser, "key-form").is_displayed()

    # the first example is filled in; ask it: the page shows what /v1/sql and /v1/sql/run say, streamed
    assert _by_id(browser, "schema").get_attribute("value") == SCHEMA
    assert _by_id(browser, "question").get_attribute("value") == QUESTION
    _ask(browser, 0)
    assert not _by_id(browser, "error").is_displayed(), _by_id(browser, "error").text
    expected = post(server, "/v1/sql", {"context": SCHEMA, "question": QUESTION}).json()
    sql = _by_id(browser, "sql")
    assert sql.text == expected["sql"] != ""
    completion = expected["usage"]["completion_tokens"]  # the EOS token has no text, so one event fewer
    assert completion - 1 <= int(sql.get_attribute("data-tokens")) <= completion and completion > 3, "streamed"
    assert sql.find_elements("css selector", "span.kw"), "highlighted"
    badge = _by_id(browser, "valid-badge").text
    assert badge == ("valid against the schema" if expected["valid"] else f"not valid: {expected['error']}")
    run = post(server, "/v1/sql/run", {"context": SCHEMA, "sql": expected["sql"], "question": QUESTION,
                                       "max_rows": 100}).json()["result"]
    if run["ok"]:
        assert _result_table(browser) == (run["columns"], _shown(run["rows"]))
    else:  # the tiny model's SQL often does not run: the page says why, as the sandbox did
        assert _by_id(browser, "result-note").text == f"It did not run ({run['error_kind']}): {run['error']}"

    # edit the SQL and run it: its check and its rows on the synthesised database
    _by_id(browser, "edit").click()
    editor = _by_id(browser, "sql-edit")
    assert editor.get_attribute("value") == expected["sql"]
    mine = "SELECT name, salary FROM employee WHERE department = 'Sales' ORDER BY salary DESC"
    editor.clear()
    editor.send_keys(mine)
    _by_id(browser, "run").click()
    _wait(browser, lambda b: b.find_element("tag name", "body").get_attribute("data-ran") == "1")
    assert not _by_id(browser, "error").is_displayed(), _by_id(browser, "error").text
    assert [s.text for s in sql.find_elements("css selector", "span.kw")] == ["SELECT", "FROM", "WHERE", "ORDER", "BY",
                                                                             "DESC"]
    assert sql.find_element("css selector", "span.str").text == "'Sales'"
    assert _by_id(browser, "valid-badge").text == "valid against the schema"
    ran = post(server, "/v1/sql/run", {"context": SCHEMA, "sql": mine, "question": QUESTION, "max_rows": 100}).json()
    assert ran["result"]["rows"], ran
    assert _result_table(browser) == (["name", "salary"], _shown(ran["result"]["rows"]))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    print(f"screenshot: {SCREENSHOT} ({SCREENSHOT.stat().st_size} bytes); "
          f"load, key, ask, edit and run took {time.perf_counter() - started:.1f}s")
    assert SCREENSHOT.stat().st_size > 10_000

    # a reload keeps the key for this tab: no second prompt
    browser.refresh()
    _wait(browser, lambda b: _by_id(b, "model").text == "model: tiny-sql")
    assert not _by_id(browser, "key-form").is_displayed()
    problems = [e["message"] for e in browser.get_log("browser")
                if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]]
    assert problems == []


def test_a_bad_schema_shows_the_servers_error_on_the_page(server, browser):
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.setItem('sqltune.apiKey', arguments[0])", KEY)  # as the form keeps it
    browser.refresh()
    _wait(browser, lambda b: _by_id(b, "model").text == "model: tiny-sql")
    schema = _by_id(browser, "schema")
    schema.clear()
    schema.send_keys(BAD_SCHEMA)
    assert _by_id(browser, "example").get_attribute("value") == "own"
    _ask(browser, 0)
    error = _by_id(browser, "error")
    assert error.is_displayed() and "context is not valid CREATE TABLE SQL" in error.text, error.text
    assert _by_id(browser, "sql").text == "" and _by_id(browser, "rows").text == ""

    # and an empty question is refused on the page, before any request
    from selenium.webdriver.support.ui import Select

    Select(_by_id(browser, "example")).select_by_index(1)  # picking an example fills both fields again
    assert "CREATE TABLE player" in _by_id(browser, "schema").get_attribute("value")
    _by_id(browser, "question").clear()
    _ask(browser, 1)
    assert _by_id(browser, "error").text == "Type a question."


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
