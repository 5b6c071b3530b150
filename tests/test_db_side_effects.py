"""Functions with a side effect on a PostgreSQL server are refused by the gate, although a READ ONLY
transaction runs them: `txid_current()` consumes a transaction id on every call (the rollback does
not give it back), statistics resets wipe what monitoring reads.

    pytest tests/test_db_side_effects.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("sqlalchemy", reason="the db extra is not installed: pip install 'sqltune[db]'")
from fixtures_db import pg_server_fixture  # noqa: F401

from sqltune import config
from sqltune.ask import answer as asking
from sqltune.db import connect
from sqltune.db.execute import open_runner

SIDE_EFFECTS = [
    ("SELECT txid_current()", "txid_current"),
    ("SELECT pg_catalog.txid_current()", "txid_current"),
    ("SELECT * FROM txid_current()", "txid_current"),
    ("SELECT name FROM customers WHERE txid_current() > 0", "txid_current"),
    ("WITH t AS (SELECT txid_current() AS x) SELECT x FROM t", "txid_current"),
    ("SELECT pg_current_xact_id()", "pg_current_xact_id"),
    ("SELECT pg_stat_reset()", "pg_stat_reset"),
    ("SELECT pg_stat_reset_shared('bgwriter')", "pg_stat_reset_shared"),
    ("SELECT pg_stat_reset_single_table_counters('customers'::regclass)", "pg_stat_reset_single_table_counters"),
    ("SELECT pg_export_snapshot()", "pg_export_snapshot"),
    ("SELECT pg_advisory_unlock_all()", "pg_advisory_unlock_all"),
]


def _next_xid(runner) -> int:
    """The next transaction id the server will assign; reading it assigns none."""
    res = runner.run("SELECT txid_snapshot_xmax(txid_current_snapshot())")
    assert res.ok, res
    return int(res.rows[0][0])


def test_txid_current_and_statistics_resets_are_refused(pg_server) -> None:
    pg_server.create_db("shop_side_effects")
    url = pg_server.url("shop_side_effects")  # the superuser: what READ ONLY lets it do is what matters
    cfg, _ = config.load(["--database", url, "--db-timeout", "2"], {})
    db = connect.connect(url)
    try:
        with open_runner(db, timeout_s=2, row_cap=10) as runner:
            before = _next_xid(runner)
            assert runner.run("SELECT txid_current()").ok  # the gate skipped: READ ONLY runs it ...
            assert runner.run("SELECT pg_stat_reset()").ok
            assert _next_xid(runner) == before + 1  # ... and the id it took is gone, rolled back or not
            for sql, name in SIDE_EFFECTS:
                gated = asking.ask(cfg, "", sql=sql, db=db)
                assert not gated.ok and gated.translation.error_kind == "denied", (sql, gated.error)
                assert f"function {name}()" in gated.error and "changes the server's state" in gated.error, gated.error
            assert _next_xid(runner) == before + 1  # no question consumed a transaction id
        plain = asking.ask(cfg, "", sql="SELECT txid_current_if_assigned() IS NULL AS fresh", db=db)
        assert plain.ok and plain.result.rows == ((True,),), plain.error  # reading about ids still runs
    finally:
        db.close()
