"""`sqltune serve --database`: POST /v1/ask and GET /v1/database on a real SQLite file (and a real
PostgreSQL server where its binaries are installed), and the playground page on that database in
headless Chromium: ask, see rows and a chart, edit and rerun, a refused write.

    pytest tests/test_serve_ask.py      # browser tests need: apt-get install chromium chromium-driver

The screenshot of the page on a database is saved as reports/playground-database.png (its path is printed).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("sqlalchemy", reason="the db extra is not installed: pip install 'sqltune[db]'")
from fixtures_browser import browser_fixture, by_id, result_table, shown, wait  # noqa: F401
from fixtures_db import READER, READER_PASS, SUPERPASS, cli, file_checksum, pg_server_fixture  # noqa: F401

from sqltune.serve.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "reports" / "playground-database.png"
KEY = "ask-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CITIES = ["Oslo", "Lima", "Rome", "Oslo", "Kyiv", "Lima", "Oslo"]
ORDERS = 1200  # more than the row cap below
ROW_CAP = 1000
BY_CITY = "SELECT city, COUNT(*) AS customers FROM customers GROUP BY city ORDER BY city"
BY_MONTH = ("SELECT substr(order_date, 1, 7) AS month, SUM(total) AS revenue, COUNT(*) AS orders FROM orders "
            "GROUP BY month ORDER BY month")


def shop(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR(40), city VARCHAR(40));
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers (id),
                             order_date DATE, total REAL, status VARCHAR(12));""")
    conn.executemany("INSERT INTO customers VALUES (?, ?, ?)",
                     [(i + 1, f"customer {i + 1}", city) for i, city in enumerate(CITIES)])
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)",
                     [(i, 1 + i % len(CITIES), f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}", round(5 + (i * 37) % 200, 2),
                       "shipped" if i % 3 else "pending") for i in range(1, ORDERS + 1)])
    conn.commit()
    conn.close()
    return path


@pytest.fixture(scope="module")
def shop_file(tmp_path_factory) -> Path:
    return shop(tmp_path_factory.mktemp("shop") / "shop.sqlite")


@pytest.fixture(scope="module")
def server(tiny_model_dir, shop_file):
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny-sql", "--max-model-len", "256",
            "--max-batch-size", "4", "--database", str(shop_file), "--db-timeout", "1",
            "--db-row-cap", str(ROW_CAP)]
    with ServerProcess(args, env={"SQLTUNE_API_KEY": KEY}) as s:
        yield s


def ask(server, body: dict, auth: bool = True) -> httpx.Response:
    return httpx.post(server.url + "/v1/ask", json=body, headers=AUTH if auth else {}, timeout=120)


def rows_of(path: Path, sql: str) -> tuple[list[str], list[list]]:
    conn = sqlite3.connect(path)
    cur = conn.execute(sql)
    return [d[0] for d in cur.description], [list(r) for r in cur.fetchall()]


# --- the API -----------------------------------------------------------------------------------------


def test_the_database_route_shows_the_tables_and_the_context_ask_builds(server, shop_file):
    r = httpx.get(server.url + "/v1/database", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["database"]["engine"] == "sqlite" and body["database"]["database"] == str(shop_file.resolve())
    assert [t["name"] for t in body["tables"]] == ["customers", "orders"]
    assert [c["name"] for c in body["tables"][1]["columns"]] == ["id", "customer_id", "order_date", "total", "status"]
    rc, context, _ = cli("ask", "--database", str(shop_file), "--schema-only")
    assert rc == 0
    assert [line.rstrip(";") for line in context.splitlines()[1:]] == body["context"].split("; ")
    for path in ("/v1/database", "/v1/ask"):
        assert httpx.post(server.url + path, json={"question": "x"}).status_code in (401, 405)
        assert httpx.request("GET" if path == "/v1/database" else "POST", server.url + path,
                             json={"question": "x"}).status_code == 401


def test_a_question_gets_what_sqltune_ask_prints_for_it(server, shop_file, tiny_model_dir):
    question = "How many orders are shipped?"
    body = ask(server, {"question": question}).json()
    rc, out, _ = cli("ask", "--model", str(tiny_model_dir), "--database", str(shop_file), "--db-row-cap",
                     str(ROW_CAP), "--format", "json", question)
    expected = json.loads(out)
    assert rc == (0 if expected["ok"] else 1)
    for field in ("model_sql", "sql", "ok", "error", "error_kind", "columns", "rows", "truncated", "schema"):
        assert body[field] == expected[field], field
    assert body["source"] == "model" and body["model"] == "tiny-sql" and body["usage"]["completion_tokens"] > 0
    assert body["candidates"] is None and isinstance(body["lint"], list)


def test_given_sql_runs_read_only_and_returns_the_rows_sqlite_returns(server, shop_file):
    body = ask(server, {"question": "Customers per city", "sql": BY_CITY}).json()
    assert body["ok"] and body["source"] == "given" and body["sql"] == BY_CITY and body["lint"] == []
    assert (body["columns"], body["rows"]) == rows_of(shop_file, BY_CITY)
    assert body["row_count"] == 4 and body["truncated"] is False

    every = ask(server, {"question": "All orders", "sql": "SELECT id, total FROM orders ORDER BY id"}).json()
    assert every["truncated"] is True and every["row_count"] == ROW_CAP == len(every["rows"])
    assert every["rows"] == rows_of(shop_file, f"SELECT id, total FROM orders ORDER BY id LIMIT {ROW_CAP}")[1]


def test_writes_are_refused_and_the_file_is_unchanged(server, shop_file):
    before = file_checksum(shop_file)
    for sql in ["DELETE FROM orders", "UPDATE customers SET city = 'x'", "DROP TABLE orders",
                "INSERT INTO customers VALUES (99, 'x', 'y')", "SELECT 1; DELETE FROM orders",
                "ATTACH DATABASE '/tmp/x.sqlite' AS x", "PRAGMA writable_schema = 1"]:
        body = ask(server, {"question": "q", "sql": sql}).json()
        assert body["ok"] is False and body["sql"] == "" and body["rows"] == [], sql
        assert body["error"].startswith("refused ("), (sql, body["error"])
    assert file_checksum(shop_file) == before


def test_a_runaway_query_stops_at_the_db_timeout(server):
    started = time.perf_counter()
    body = ask(server, {"question": "q", "sql": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                                                "SELECT count(*) FROM n"}).json()
    assert body["ok"] is False and body["error_kind"] == "timeout", body
    assert time.perf_counter() - started < 10


def test_lint_warns_where_postgresql_would_refuse(server):
    body = ask(server, {"question": "Names of customers with orders",
                        "sql": "SELECT city, name FROM customers GROUP BY city"}).json()
    assert body["ok"] is True, "SQLite runs it"
    assert body["lint"][0].startswith("`name` is neither grouped nor aggregated (under GROUP BY)")
    assert "the question names `orders` but the SQL never reads that table" in body["lint"]


def test_the_stream_sends_tokens_then_the_same_answer(server):
    question = "How many customers live in Oslo?"
    whole = ask(server, {"question": question}).json()
    r = ask(server, {"question": question, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    *tokens, answer = [json.loads(e) for e in events[:-1]]
    assert len(tokens) > 3 and all(set(t) == {"text"} for t in tokens)
    assert answer.pop("done") is True
    for d in (answer, whole):
        d.pop("timing")
    assert answer == whole


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({}, "question", "Field required"),
    ({"question": ""}, "question", "at least 1 character"),
    ({"question": "q", "sql": " ; "}, "sql", "sql is blank"),
    ({"question": "q", "candidates": 17}, "candidates", "less than or equal to 16"),
])
def test_bad_requests_name_the_field(server, body, param, needle):
    r = ask(server, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error


def test_a_database_that_cannot_be_opened_stops_the_server_at_start(tiny_model_dir, tmp_path):
    missing = tmp_path / "nope.sqlite"
    done = subprocess.run([sys.executable, "-m", "sqltune", "serve", "--model", str(tiny_model_dir), "--database",
                           str(missing), "--port", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"SQLite file {missing} does not exist" in done.stderr and "Traceback" not in done.stderr


def test_on_postgresql_the_password_is_never_shown(pg_server, tiny_model_dir):
    pg_server.create_db("shop_serve")
    url = pg_server.url("shop_serve", READER, READER_PASS)
    with ServerProcess(["--model", str(tiny_model_dir), "--max-model-len", "256", "--database", url]) as s:
        info = httpx.get(s.url + "/v1/database").text
        assert READER_PASS not in info and json.loads(info)["database"]["engine"] == "postgresql"
        body = httpx.post(s.url + "/v1/ask", json={"question": "q", "sql": 'SELECT name FROM customers WHERE '
                                                   'city = "Oslo" ORDER BY name'}, timeout=60).json()
        assert body["ok"] and body["sql_changed"] and body["rows"] == [["Ann"], ["Cleo"]], body
        refused = httpx.post(s.url + "/v1/ask", json={"question": "q", "sql": "SELECT pg_read_file('/etc/passwd')"},
                             timeout=60).json()
        assert refused["ok"] is False and refused["error_kind"] == "denied"
        written = httpx.post(s.url + "/v1/ask", json={"question": "q", "sql": "SELECT nextval('x')"}, timeout=60).json()
        assert written["ok"] is False
        assert READER_PASS not in json.dumps([body, refused, written])
        log = s.log()
    assert READER_PASS not in log and SUPERPASS not in log
    assert '"database attached"' in log or "database attached" in log


# --- the page, in headless Chromium ------------------------------------------------------------------


def _asked(b, n: int) -> bool:
    return b.find_element("tag name", "body").get_attribute("data-asked") == str(n)


def _run(browser, sql: str, ran_before: int) -> None:
    editor = by_id(browser, "sql-edit")
    if not editor.is_displayed():
        by_id(browser, "edit").click()
    editor.clear()
    editor.send_keys(sql)
    by_id(browser, "run").click()
    wait(browser, lambda b: b.find_element("tag name", "body").get_attribute("data-ran") == str(ran_before + 1))


def test_the_page_asks_the_database_shows_rows_and_a_chart_and_refuses_a_write(server, browser, shop_file):
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.setItem('sqltune.apiKey', arguments[0])", KEY)
    browser.refresh()
    wait(browser, lambda b: b.find_element("tag name", "body").get_attribute("data-mode") == "database")
    assert not by_id(browser, "schema").is_displayed(), "no pasted schema on a database"
    assert by_id(browser, "db-name").text.startswith(f"sqlite · {shop_file.resolve()} · SQLite ")
    assert [s.text for s in browser.find_elements("css selector", "#db-tables-list summary")] == [
        "customers · 3 columns", "orders · 5 columns"]

    # ask: the page shows what /v1/ask answers for the question, streamed
    question = "How many orders are shipped?"
    by_id(browser, "question").clear()  # the page opens with its first example's question in the box
    by_id(browser, "question").send_keys(question)
    by_id(browser, "ask").click()
    wait(browser, lambda b: _asked(b, 1))
    assert not by_id(browser, "error").is_displayed(), by_id(browser, "error").text
    expected = ask(server, {"question": question}).json()
    assert by_id(browser, "sql").text == (expected["sql"] or expected["model_sql"]) != ""
    assert int(by_id(browser, "sql").get_attribute("data-tokens")) > 3, "streamed"
    badge = by_id(browser, "valid-badge")
    if expected["ok"]:
        assert result_table(browser) == (expected["columns"], shown(expected["rows"][:100]))
    else:  # the tiny model's SQL seldom runs: the page says why, as the server did
        assert badge.text == expected["error"] and "bad" in badge.get_attribute("class")
    assert by_id(browser, "sql-edit").get_attribute("value") == expected["model_sql"]

    # edit and rerun: rows as a table and a bar chart, one bar per row
    by_id(browser, "question").clear()
    by_id(browser, "question").send_keys("How many customers live in each city?")
    _run(browser, BY_CITY, 0)
    assert not by_id(browser, "error").is_displayed(), by_id(browser, "error").text
    columns, rows = rows_of(shop_file, BY_CITY)
    assert result_table(browser) == (columns, shown(rows))
    assert by_id(browser, "valid-badge").text == "ran read-only on sqlite"
    assert "ok" in by_id(browser, "valid-badge").get_attribute("class")
    chart = by_id(browser, "chart")
    assert chart.get_attribute("data-kind") == "bar"
    bars = chart.find_elements("css selector", "rect.bar")
    assert [(b.get_attribute("data-label"), float(b.get_attribute("data-value"))) for b in bars] == [
        (city, float(n)) for city, n in rows]
    assert by_id(browser, "result-note").text.startswith("4 rows ·")

    # a month and two numbers: a line chart, one line per number column
    by_id(browser, "question").clear()
    by_id(browser, "question").send_keys("Revenue and orders per month")
    _run(browser, BY_MONTH, 1)
    columns, rows = rows_of(shop_file, BY_MONTH)
    chart = by_id(browser, "chart")
    assert chart.get_attribute("data-kind") == "line"
    lines = chart.find_elements("css selector", "polyline.series")
    assert [int(p.get_attribute("data-points")) for p in lines] == [12, 12] and len(rows) == 12
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    print(f"screenshot: {SCREENSHOT} ({SCREENSHOT.stat().st_size} bytes)")
    assert SCREENSHOT.stat().st_size > 10_000

    # more rows than the page shows: the first 100, and the count the server returned
    _run(browser, "SELECT id, status FROM orders ORDER BY id", 2)
    assert len(result_table(browser)[1]) == 100
    assert by_id(browser, "result-note").text.startswith(f"{ROW_CAP} rows (the query returns more")
    assert browser.find_elements("id", "chart") == [], "labels that repeat are no categories: no chart"

    # a write is refused, says why, and the file is unchanged
    before = file_checksum(shop_file)
    _run(browser, "DELETE FROM orders", 3)
    badge = by_id(browser, "valid-badge")
    assert badge.text == "refused (denied): not a read-only query: DELETE statement"
    assert "bad" in badge.get_attribute("class") and by_id(browser, "rows").text == ""
    assert file_checksum(shop_file) == before

    # a bare column under GROUP BY runs on SQLite, but gets a warning, not a green badge
    by_id(browser, "question").clear()
    by_id(browser, "question").send_keys("Name a customer in each city")
    _run(browser, "SELECT city, name FROM customers GROUP BY city", 4)
    badge = by_id(browser, "valid-badge")
    assert badge.text == "ran read-only on sqlite · 1 warning" and "warn" in badge.get_attribute("class")
    (warning,) = [li.text for li in browser.find_elements("css selector", "#lint li")]
    assert "`name` is neither grouped nor aggregated" in warning and "PostgreSQL refuses the query" in warning
    problems = [e["message"] for e in browser.get_log("browser")
                if "Content Security Policy" in e["message"] or "Uncaught" in e["message"]]
    assert problems == []
