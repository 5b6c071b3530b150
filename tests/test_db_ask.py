"""`sqltune ask` on real databases: a PostgreSQL server (tests/fixtures_db.py) and a SQLite file.

    pytest tests/test_db_ask.py

Introspection, table selection, transpile cases checked against both engines, the CLI's table /
JSON / CSV output and exit codes, connection errors, passwords kept out of every output, and the
whole path with the tiny model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the db extra is not installed: pip install 'sqltune[db]'")
import yaml
from conftest import ASSETS, run_sqltune
from fixtures_db import READER, READER_PASS, SUPERPASS, WRITER, WRITER_PASS, cli, pg_server_fixture, seed_sqlite  # noqa: F401

from sqltune import config
from sqltune.ask import answer as asking
from sqltune.db import connect, dialect, introspect
from sqltune.db.execute import open_runner
from sqltune.errors import SqltuneError

CASES = yaml.safe_load((ASSETS / "db_transpile_cases.yaml").read_text())


@pytest.fixture(scope="module")
def shop_pg(pg_server) -> str:
    pg_server.create_db("shop_ask")
    return pg_server.url("shop_ask", READER, READER_PASS)


@pytest.fixture(scope="module")
def shop_sqlite(tmp_path_factory) -> Path:
    return seed_sqlite(tmp_path_factory.mktemp("db") / "shop.sqlite")


@pytest.fixture(params=["postgresql", "sqlite"])
def shop(request) -> str:
    """Each database in turn; the SQLite case runs where no PostgreSQL binaries are installed."""
    return request.getfixturevalue("shop_pg") if request.param == "postgresql" else str(request.getfixturevalue("shop_sqlite"))


def _ask_json(database: str, *args: str) -> tuple[int, dict]:
    rc, out, _ = cli("ask", "--database", database, "--format", "json", *args)
    return rc, json.loads(out)


def test_introspection_gives_the_create_table_context_with_keys(shop) -> None:
    db = connect.connect(shop)
    try:
        schema = introspect.introspect(db)
    finally:
        db.close()
    by_name = {t.name: t for t in schema.tables}
    assert sorted(by_name) == ["audit_log", "customers", "order_items", "orders", "products"]
    assert by_name["customers"].ddl() == "CREATE TABLE customers (id INTEGER, name VARCHAR, city VARCHAR, PRIMARY KEY (id))"
    assert by_name["products"].ddl() == "CREATE TABLE products (id INTEGER, title VARCHAR, price REAL, PRIMARY KEY (id))"
    items = by_name["order_items"]
    assert items.primary_key == ("order_id", "product_id")
    assert sorted((fk.columns, fk.table, fk.ref_columns) for fk in items.foreign_keys) == [
        (("order_id",), "orders", ("id",)), (("product_id",), "products", ("id",))]
    assert "FOREIGN KEY (customer_id) REFERENCES customers (id)" in by_name["orders"].ddl()
    # the context parses as the training data's contexts do
    assert [t.name for t in schema.to_schema().tables] == [t.name for t in schema.tables]
    assert schema.neighbours("orders") == ["customers", "order_items"]


def test_a_large_schema_gives_the_model_the_question_s_tables_and_their_neighbours(shop_sqlite) -> None:
    db = connect.connect(str(shop_sqlite))
    try:
        schema = introspect.introspect(db)
    finally:
        db.close()
    full = schema.context()
    assert introspect.select_tables(schema, "How many orders?", lambda c: True).left_out == []
    budget = len(schema.table("orders").ddl()) + len(schema.table("customers").ddl()) + 10
    chosen = introspect.select_tables(schema, "How many orders shipped in May?", lambda c: len(c) <= budget)
    # orders matches the question; customers is its foreign-key neighbour; order_items no longer fits
    assert chosen.tables == ["customers", "orders"]
    assert chosen.left_out == ["audit_log", "order_items", "products"]
    assert "foreign-key" in chosen.how and len(chosen.context) < len(full)
    none = introspect.select_tables(schema, "zzz qqq", lambda c: len(c) <= budget)
    assert none.tables and "no table matched" in none.how
    with pytest.raises(SqltuneError, match="not even one table"):
        introspect.select_tables(schema, "orders", lambda c: False)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_transpile_cases_agree_with_sqlite_on_postgres(case, shop_pg, shop_sqlite) -> None:
    pg, lite = connect.connect(shop_pg), connect.connect(str(shop_sqlite))
    try:
        schema = introspect.introspect(pg).to_schema()
        t = dialect.translate(case["sqlite"], schema, source="sqlite", target="postgres")
        if "error" in case:
            assert (t.error_kind, t.sql) == (case["error"], ""), t.error
            assert t.error
            return
        assert t.ok, t.error
        assert t.sql == case["postgres"]
        assert t.changed == (case["postgres"] != case["sqlite"])
        with open_runner(pg, timeout_s=5, row_cap=100) as a, open_runner(lite, timeout_s=5, row_cap=100) as b:
            on_pg, on_sqlite = a.run(t.sql), b.run(case["sqlite"])
        assert on_pg.ok and on_sqlite.ok, (on_pg.error, on_sqlite.error)
        assert sorted(on_pg.rows, key=repr) == sorted(on_sqlite.rows, key=repr)
    finally:
        pg.close()
        lite.close()


def test_ask_prints_the_sql_and_an_aligned_table(shop_pg, shop_sqlite) -> None:
    sql = 'SELECT name, id FROM customers WHERE city = "Oslo" ORDER BY name'
    lite = cli("ask", "--database", str(shop_sqlite), "--sql", sql)[1]
    assert lite.splitlines() == [sql, "", "name | id", "-----+---", "Ann  |  1", "Cleo |  3", "", lite.splitlines()[-1]]
    assert lite.splitlines()[-1].startswith("(2 rows, ")
    pg = run_sqltune("ask", "--database", shop_pg, "--sql", sql).stdout.splitlines()  # once as a real process
    # the dialects differ, so both texts are shown: the model's and the one PostgreSQL ran
    assert pg[0] == f"-- SQL as the model wrote it (given): {sql}"
    assert pg[2] == "SELECT name, id FROM customers WHERE city = 'Oslo' ORDER BY name NULLS FIRST"
    assert pg[4:8] == ["name | id", "-----+---", "Ann  |  1", "Cleo |  3"]


def test_ask_json_and_csv_for_scripts(shop) -> None:
    rc, out = _ask_json(shop, "--sql", "SELECT status, COUNT(*) AS n FROM orders GROUP BY status ORDER BY n DESC, status")
    assert rc == 0 and out["ok"] and out["error"] == ""
    assert out["columns"] == ["status", "n"]
    assert out["rows"] == [["shipped", 3], ["cancelled", 1], ["pending", 1]]
    assert out["database"]["engine"] in ("postgresql", "sqlite")
    assert out["schema"]["left_out"] == []
    rc, out, err = cli("ask", "--database", shop, "--format", "csv", "--sql", "SELECT name, city FROM customers ORDER BY id")
    assert (rc, out) == (0, "name,city\nAnn,Oslo\nBob,Lima\nCleo,Oslo\nDan,\n")
    assert "-- SELECT name, city FROM customers ORDER BY id" in err  # the SQL goes to stderr, beside the logs


def test_ask_cuts_at_the_row_cap_and_says_so(shop) -> None:
    rc, out = _ask_json(shop, "--db-row-cap", "2", "--sql", "SELECT order_id FROM order_items ORDER BY order_id, product_id")
    assert rc == 0 and out["truncated"] and out["rows"] == [[1], [1]]
    text = cli("ask", "--database", shop, "--db-row-cap", "2", "--sql", "SELECT id FROM customers")[1]
    assert "raise --db-row-cap" in text


@pytest.mark.parametrize("sql, kind", [("SELECT nope FROM customers", "runtime"), ("SELEC x", "syntax"),
                                       ("DELETE FROM customers", "denied"), ("", "empty")])
def test_invalid_or_failing_sql_exits_1_with_the_reason(shop, sql, kind) -> None:
    rc, out = _ask_json(shop, "--sql", sql)
    assert rc == 1 and not out["ok"]
    assert out["error_kind"] == kind and out["error"]
    rc, out, _ = cli("ask", "--database", shop, "--sql", sql)
    assert rc == 1 and "error: " in out


def test_schema_only_prints_the_context(shop) -> None:
    out = cli("ask", "--database", shop, "--schema-only")[1].splitlines()
    assert out[0].startswith("-- ") and "5 tables and views" in out[0]
    assert "CREATE TABLE customers (id INTEGER, name VARCHAR, city VARCHAR, PRIMARY KEY (id));" in out


def test_connection_errors_are_one_line_naming_the_fix(pg_server, shop_pg, tmp_path) -> None:
    not_sqlite = tmp_path / "notes.db"
    not_sqlite.write_text("hello")
    cases = [
        (pg_server.url("shop_ask", READER, "wrong-secret-pw"), "wrong or missing password", "PGPASSWORD"),
        (f"postgresql://{READER}:{READER_PASS}@127.0.0.1:1/shop", "cannot reach PostgreSQL at 127.0.0.1:1",
         "start the server"),
        (pg_server.url("no_such_db", READER, READER_PASS), "database 'no_such_db' does not exist", "database name"),
        (pg_server.url("shop_ask", "ghost", "ghost-pw"), "refused user 'ghost'", "user and password"),
        ("mysql://ann:mysql-secret@localhost/shop", "mysql databases are not supported", "postgresql://"),
        (str(tmp_path / "missing.sqlite"), "does not exist", "existing SQLite"),
        (str(not_sqlite), "is not a SQLite database file", "SQLite file"),
        ("not a url", "neither a database URL nor an existing SQLite file", "postgresql://user@host"),
    ]
    for n, (url, problem, fix) in enumerate(cases):
        if n == 0:  # once as a real process: what a user's shell shows
            proc = run_sqltune("ask", "--database", url, "--sql", "SELECT 1", check=False, timeout=60)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        else:
            rc, out, err = cli("ask", "--database", url, "--sql", "SELECT 1")
        assert rc == 2, (url, err)
        lines = [line for line in err.splitlines() if line.startswith("sqltune: error:")]
        assert len(lines) == 1 and problem in lines[0], (url, err)
        assert fix in err
        assert "Traceback" not in err
        for secret in ("wrong-secret-pw", "ghost-pw", "mysql-secret", READER_PASS):
            assert secret not in err + out


def test_a_role_that_can_write_gets_a_warning_and_no_password_is_shown(pg_server, shop_pg) -> None:
    for user, password, warned in ((WRITER, WRITER_PASS, True), ("sqltune_admin", SUPERPASS, True),
                                   (READER, READER_PASS, False)):
        url = pg_server.url("shop_ask", user, password)
        rc, stdout, stderr = cli("ask", "--database", url, "--sql", "SELECT COUNT(*) FROM customers", "--format", "json")
        out = json.loads(stdout)
        assert bool(out["warnings"]) == warned, out["warnings"]
        if warned:
            assert f"user {user} is not a read-only role" in out["warnings"][0]
            assert "GRANT SELECT" in out["warnings"][0]
        assert out["database"]["database"] == pg_server.url("shop_ask", user, "***")
        assert rc == 0 and password not in stdout + stderr
        assert ("database role can write" in stderr) == warned  # and a structured log line says so
        table = cli("ask", "--database", url, "--sql", "SELECT 1 AS one")[1]
        assert ("not a read-only role" in table) == warned
    cfg, _ = config.load(["--database", pg_server.url("shop_ask", WRITER, WRITER_PASS)], {})
    assert WRITER_PASS not in config.render(cfg, {}) and WRITER_PASS not in json.dumps(cfg.to_dict())


def test_ask_end_to_end_with_the_tiny_model(tiny_model_dir, shop_pg, shop_sqlite) -> None:
    """The whole path: schema read from the database, the model's prompt, its SQL, translated, gated, run."""
    args = ("--model", str(tiny_model_dir), "--format", "json", "How many customers are there?")
    proc = run_sqltune("ask", "--database", str(shop_sqlite), *args, check=False, timeout=300)  # a real process
    runs = [(proc.returncode, proc.stdout, proc.stderr), cli("ask", "--database", shop_pg, *args)]
    for rc, stdout, stderr in runs:
        assert rc in (0, 1), stderr[-2000:]
        out = json.loads(stdout)
        assert out["source"] == "model" and out["model_sql"], out
        assert out["ok"] == (rc == 0)
        assert out["ok"] or out["error"]  # the tiny model's SQL may name tables it never saw: said, not hidden
        assert out["schema"]["tables"] and out["timing"]["generate_s"] > 0
        assert READER_PASS not in stdout + stderr
    assert json.loads(runs[1][1])["database"]["engine"] == "postgresql"


def test_ask_api_reuses_an_open_database(shop_sqlite) -> None:
    cfg, _ = config.load(["--database", str(shop_sqlite)], {})
    db = connect.connect(str(shop_sqlite))
    try:
        first = asking.ask(cfg, "", sql="SELECT COUNT(*) FROM products", db=db)
        second = asking.ask(cfg, "", sql="SELECT MAX(price) FROM products", db=db)
    finally:
        db.close()
    assert first.result.rows == ((3,),) and second.result.rows == ((120.0,),)
    assert asking.table_text(("a", "bb"), ((1, None), (22, "x" * 100))).splitlines()[2:] == [
        " 1 | NULL", "22 | " + "x" * 59 + "…"]


def test_ask_through_a_running_server_sends_the_database_s_schema(shop_sqlite) -> None:
    """--endpoint: a real HTTP server on 127.0.0.1 gets the question and the introspected context, and its SQL runs."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            seen.append(body)
            raw = json.dumps({"sql": 'SELECT name FROM customers WHERE city = "Lima"', "model": "srv"}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        rc, out = _ask_json(str(shop_sqlite), "--endpoint", url, "--db-context-chars", "200",
                            "Which customers live in Lima?")
        rc2, text, _ = cli("ask", "--database", str(shop_sqlite), "--endpoint", url, "--db-context-chars", "200",
                           "Which customers live in Lima?")
    finally:
        server.shutdown()
        server.server_close()
    assert rc == 0 and out["source"] == "endpoint" and out["rows"] == [["Bob"]]
    assert seen[-1]["question"] == "Which customers live in Lima?"
    assert seen[-1]["context"].startswith("CREATE TABLE customers (id INTEGER, name VARCHAR, city VARCHAR")
    assert out["schema"]["tables"] == ["customers"]  # orders, its neighbour, would not fit in 200 characters
    assert out["schema"]["left_out"] == ["audit_log", "order_items", "orders", "products"]
    assert rc2 == 0 and "-- schema: 1 of 5 tables given to the model (customers); left out: audit_log, " \
        "order_items, orders, products" in text


def test_no_db_keys_gives_the_bare_columns(shop_sqlite) -> None:
    rc, out, _ = cli("ask", "--database", str(shop_sqlite), "--schema-only", "--no-db-keys")
    assert rc == 0 and "CREATE TABLE orders (id INTEGER, customer_id INTEGER, status VARCHAR, shipped_month INTEGER);" in out
    assert "KEY" not in out


def test_a_missing_driver_is_one_line_naming_the_install(shop_pg, monkeypatch) -> None:
    url = shop_pg.replace("postgresql://", "postgresql+psycopg2://")
    rc, _, err = cli("ask", "--database", url, "--sql", "SELECT 1")
    assert rc == 2 and "no driver for postgresql+psycopg2" in err and READER_PASS not in err
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    rc, _, err = cli("ask", "--database", shop_pg, "--sql", "SELECT 1")
    assert rc == 2 and "psycopg driver, which is not installed" in err and "pip install 'sqltune[db]'" in err
