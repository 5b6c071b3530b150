"""Nothing sqltune sends can change a real database: every kind of write is refused or stopped, and a
checksum of the database's contents is the same before and after.

    pytest tests/test_db_safety.py

Each statement goes twice: through `ask` (the dialect gate refuses it, saying why) and straight
to the read-only runner with the gate skipped, so the database's own walls are tested too
(PostgreSQL's READ ONLY transaction, server-side cursor and statement_timeout; SQLite's mode=ro
and the sandbox's authorizer). PostgreSQL runs as a superuser here: the walls must hold for the
strongest role, not only for a careful one.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy", reason="the db extra is not installed: pip install 'sqltune[db]'")
from fixtures_db import file_checksum, pg_server_fixture, seed_sqlite  # noqa: F401

from sqltune import config
from sqltune.ask import answer as asking
from sqltune.db import connect
from sqltune.db.execute import open_runner

EXTRA_PG = [
    "CREATE SEQUENCE order_numbers",
    # a function with a side effect: reading it is allowed, the INSERT inside must not happen
    "CREATE FUNCTION bump() RETURNS integer LANGUAGE plpgsql AS "
    "$$ BEGIN INSERT INTO audit_log VALUES (99, 'bumped'); RETURN 1; END $$",
]


def _pg_cases(marker: Path) -> list[str]:
    return [
        "INSERT INTO audit_log VALUES (2, 'inserted')",
        "UPDATE customers SET name = 'Eve'",
        "DELETE FROM orders",
        "DROP TABLE audit_log",
        "CREATE TABLE intruder (x INTEGER)",
        "TRUNCATE order_items",
        "ALTER TABLE customers ADD COLUMN x INTEGER",
        f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
        "SELECT bump()",
        "SELECT 1; DELETE FROM audit_log",
        "SELECT nextval('order_numbers')",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        "WITH gone AS (DELETE FROM audit_log RETURNING *) SELECT * FROM gone",
        "SELECT * INTO stolen FROM customers",
        "SELECT lo_import('/etc/hostname')",
        "SELECT * FROM customers FOR UPDATE",
        "COMMIT",
        "SET TRANSACTION READ WRITE",
        "GRANT ALL ON customers TO PUBLIC",
    ]


# What a READ ONLY transaction does not stop for a superuser: a session setting (undone by the rollback)
# and lo_import, which reads a file of the server into a large object (undone too, but it read the file).
SERVER_ALLOWS = ("set_config", "lo_import")

SQLITE_CASES = [
    "INSERT INTO audit_log VALUES (2, 'inserted')",
    "REPLACE INTO customers VALUES (1, 'Eve', 'Rome')",
    "UPDATE customers SET name = 'Eve'",
    "DELETE FROM orders",
    "DROP TABLE audit_log",
    "CREATE TABLE intruder (x INTEGER)",
    "ALTER TABLE customers ADD COLUMN x INTEGER",
    "ATTACH DATABASE '{other}' AS other",
    "PRAGMA user_version = 7",
    "PRAGMA journal_mode = WAL",
    "VACUUM INTO '{other}'",
    "SELECT load_extension('/nonexistent/ext')",
    "SELECT 1; DELETE FROM audit_log",
    "WITH gone AS (SELECT 1) DELETE FROM audit_log",
    "CREATE TRIGGER t AFTER INSERT ON orders BEGIN DELETE FROM audit_log; END",
]


@pytest.fixture(scope="module")
def superuser_db(pg_server) -> str:
    from fixtures_db import SHOP_DDL

    pg_server.create_db("shop_safety", ddl=[*SHOP_DDL, *EXTRA_PG])
    return "shop_safety"


def test_no_statement_changes_postgresql(pg_server, superuser_db, tmp_path) -> None:
    url = pg_server.url(superuser_db)  # the superuser: READ ONLY must hold even for it
    marker = tmp_path / "program-ran"
    before = pg_server.checksum(superuser_db)
    cfg, _ = config.load(["--database", url, "--db-timeout", "2"], {})
    db = connect.connect(url)
    try:
        assert "superuser" in db.info["writes_allowed"]
        with open_runner(db, timeout_s=2, row_cap=100) as runner:
            for sql in _pg_cases(marker):
                gated = asking.ask(cfg, "", sql=sql, db=db)
                assert not gated.ok and gated.error, sql
                raw = runner.run(sql)  # the gate skipped: the server's walls alone
                if any(name in sql for name in SERVER_ALLOWS):
                    # READ ONLY lets these through; the rollback undoes what they did (checksum below), and
                    # the gate's deny list is why they are never sent
                    assert raw.ok, (sql, raw)
                    setting = runner.run("SELECT current_setting('default_transaction_read_only')")
                    assert setting.rows == (("on",),), setting
                else:
                    assert not raw.ok and raw.error, (sql, raw)
                assert runner.run("SELECT COUNT(*) FROM audit_log").rows == ((1,),), sql  # the session still works
            refused = asking.ask(cfg, "", sql="SELECT bump()", db=db)
            assert refused.result.error_kind == "denied" and "read-only transaction" in refused.result.error
            assert asking.ask(cfg, "", sql="DROP TABLE audit_log", db=db).error == \
                "refused (denied): not a read-only query: DROP statement"
    finally:
        db.close()
    assert not marker.exists()
    assert pg_server.checksum(superuser_db) == before


SECRET_READS = [
    "SELECT usename, passwd FROM pg_shadow",
    "SELECT rolname, rolpassword FROM pg_catalog.pg_authid",
    "SELECT name, setting FROM pg_settings",
    "SELECT * FROM pg_file_settings",
    "SELECT * FROM pg_hba_file_rules",
    "SELECT * FROM pg_hba_file_rules()",
    "SELECT * FROM pg_user_mappings",
    "SELECT current_setting('config_file')",
    "SELECT pg_catalog.current_setting('data_directory')",
    "SELECT name FROM customers WHERE name IN (SELECT usename FROM PG_SHADOW)",
    "WITH s AS (SELECT setting FROM pg_settings) SELECT * FROM s",
    "SELECT query FROM pg_stat_activity",
    "SELECT pg_read_file('PG_VERSION')",
    "SELECT * FROM pg_show_all_settings()",
]


def test_secret_catalogs_and_settings_are_refused_for_a_superuser(pg_server, superuser_db) -> None:
    """What READ ONLY lets a superuser read but the docs say is gated: password hashes, server
    settings and file paths, other sessions' queries. The server answers each (the gate skipped),
    so the gate is what keeps them out of an answer."""
    url = pg_server.url(superuser_db)
    cfg, _ = config.load(["--database", url, "--db-timeout", "2"], {})
    db = connect.connect(url)
    try:
        with open_runner(db, timeout_s=2, row_cap=100) as runner:
            assert runner.run("SELECT usename, passwd FROM pg_shadow").ok  # the danger is real
            for sql in SECRET_READS:
                gated = asking.ask(cfg, "", sql=sql, db=db)
                assert not gated.ok and "not allowed on a real database" in gated.error, (sql, gated.error)
                assert gated.result is None or not gated.result.rows, sql
        plain = asking.ask(cfg, "", sql="SELECT name FROM customers ORDER BY name", db=db)
        assert plain.ok, plain.error  # an ordinary read still runs
    finally:
        db.close()


def test_slow_queries_are_stopped_at_the_time_limit(pg_server, superuser_db) -> None:
    url = pg_server.url(superuser_db)
    cfg, _ = config.load(["--database", url, "--db-timeout", "1"], {})
    db = connect.connect(url)
    try:
        start = time.perf_counter()
        res = asking.ask(cfg, "", sql="SELECT pg_sleep(100)", db=db)
        assert res.result.error_kind == "timeout" and "statement_timeout" in res.result.error
        assert time.perf_counter() - start < 10
        with open_runner(db, timeout_s=1, row_cap=10) as runner:
            # a query that lifts its own timeout (the gate refuses set_config; skipped here) is stopped all the same
            start = time.perf_counter()
            lifted = runner.run("SELECT set_config('statement_timeout', '0', true) || pg_sleep(100)::text")
            assert lifted.error_kind == "timeout", lifted
            assert time.perf_counter() - start < 10
            huge = runner.run("SELECT generate_series(1, 100000000) AS x")  # streamed, stopped at the row cap
            assert huge.error_kind == "row_limit" and len(huge.rows) == 10
            assert runner.run("SELECT 1").ok
    finally:
        db.close()


def test_no_statement_changes_a_sqlite_file(tmp_path) -> None:
    path = seed_sqlite(tmp_path / "shop.sqlite")
    other = tmp_path / "other.sqlite"
    before = file_checksum(path)
    cfg, _ = config.load(["--database", str(path), "--db-timeout", "1"], {})
    db = connect.connect(str(path))
    try:
        with open_runner(db, timeout_s=1, row_cap=100) as runner:
            for case in SQLITE_CASES:
                sql = case.format(other=other)
                gated = asking.ask(cfg, "", sql=sql, db=db)
                assert not gated.ok and gated.error, sql
                raw = runner.run(sql)
                assert not raw.ok and raw.error_kind in ("denied", "multiple_statements"), (sql, raw)
            runaway = runner.run("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT MAX(x) FROM c")
            assert runaway.error_kind == "timeout"
            assert runner.run("SELECT COUNT(*) FROM audit_log").rows == ((1,),)
        slow = asking.ask(cfg, "", sql="WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                          "SELECT COUNT(*) FROM c", db=db)
        assert slow.result.error_kind == "timeout" and not slow.ok
    finally:
        db.close()
    assert not other.exists()
    assert file_checksum(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop.sqlite"]  # no journal, no -wal, no new file


def test_reading_a_wal_mode_sqlite_file_leaves_its_folder_as_it_was(tmp_path) -> None:
    """A WAL-mode file read with mode=ro alone gets -wal and -shm files beside it (a read-only mount
    or a shared folder then fails, or shows files nobody wrote); it is opened immutable instead."""
    import sqlite3

    path = seed_sqlite(tmp_path / "shop.sqlite")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop.sqlite"]
    before = file_checksum(path)
    cfg, _ = config.load(["--database", str(path), "--db-timeout", "1"], {})
    db = connect.connect(str(path))
    try:
        answer = asking.ask(cfg, "", sql="SELECT COUNT(*) FROM audit_log", db=db)
        assert answer.ok and answer.result.rows == ((1,),), answer.error
        assert not asking.ask(cfg, "", sql="DELETE FROM audit_log", db=db).ok
    finally:
        db.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop.sqlite"]
    assert file_checksum(path) == before
