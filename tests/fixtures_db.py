"""Real databases for the `sqltune ask` / `eval --database` tests: a PostgreSQL server started from
Debian's binaries in a temporary data directory, and SQLite files.

    pytest tests/test_db_ask.py        # test modules import pg_server_fixture (the `pg_server` fixture)

The server starts once per session on a free port of 127.0.0.1 with password authentication, so
the tests connect as a user would (postgresql://user:password@127.0.0.1:PORT/db). initdb and
pg_ctl refuse to run as root, so as root they run as the `postgres` account (Debian's package
creates it). Without the binaries the tests skip, naming the package; CI installs it (.ci/run).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER, SUPERPASS = "sqltune_admin", "admin-pass-never-logged"
READER, READER_PASS = "reader", "reader-pass-never-logged"
WRITER, WRITER_PASS = "writer", "writer-pass-never-logged"

# A small shop with foreign keys: customers <- orders <- order_items -> products, and an unrelated table.
SHOP_DDL = [
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR(50) NOT NULL, city VARCHAR(50))",
    "CREATE TABLE products (id INTEGER PRIMARY KEY, title VARCHAR(80), price REAL)",
    "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers (id), "
    "status VARCHAR(20), shipped_month INTEGER)",
    "CREATE TABLE order_items (order_id INTEGER REFERENCES orders (id), product_id INTEGER REFERENCES products (id), "
    "quantity INTEGER, PRIMARY KEY (order_id, product_id))",
    "CREATE TABLE audit_log (id INTEGER, note VARCHAR(80))",
]
SHOP_ROWS = {
    "customers": [(1, "Ann", "Oslo"), (2, "Bob", "Lima"), (3, "Cleo", "Oslo"), (4, "Dan", None)],
    "products": [(1, "Lamp", 20.5), (2, "Desk", 120.0), (3, "Chair", 45.25)],
    "orders": [(1, 1, "shipped", 5), (2, 1, "shipped", 6), (3, 2, "pending", None), (4, 3, "shipped", 5),
               (5, 4, "cancelled", None)],
    "order_items": [(1, 1, 2), (1, 3, 1), (2, 2, 1), (3, 1, 4), (4, 3, 2), (5, 2, 1)],
    "audit_log": [(1, "created")],
}


def cli(*args: str) -> tuple[int, str, str]:
    """`sqltune ARGS` in this process (no interpreter start per call): exit code, stdout, stderr with the logs."""
    from sqltune.cli import main

    root = logging.getLogger("sqltune")
    saved = root.handlers[:]
    root.handlers.clear()  # logs.setup binds a fresh handler to the stderr captured here
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        root.handlers[:] = saved
    return rc, out.getvalue(), err.getvalue()


def seed_sqlite(path: Path, ddl: list[str] = SHOP_DDL, rows: dict[str, list[tuple]] = SHOP_ROWS) -> Path:
    conn = sqlite3.connect(path)
    for statement in ddl:
        conn.execute(statement)
    for table, table_rows in rows.items():
        if table_rows:
            conn.executemany(f'INSERT INTO "{table}" VALUES ({",".join("?" * len(table_rows[0]))})', table_rows)
    conn.commit()
    conn.close()
    return path


def file_checksum(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(glob.glob(f"{path}*")):  # the file and any -wal / -journal beside it
        h.update(Path(p).name.encode() + Path(p).read_bytes())
    return h.hexdigest()


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgServer:
    host: str
    port: int
    bindir: Path

    def url(self, db: str, user: str = SUPERUSER, password: str = SUPERPASS) -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{db}"

    def admin(self, db: str = "postgres") -> object:
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=SUPERUSER, password=SUPERPASS, dbname=db,
                               autocommit=True)

    def create_db(self, name: str, ddl: list[str] = SHOP_DDL, rows: dict[str, list[tuple]] = SHOP_ROWS) -> str:
        """A fresh database seeded with `ddl` and `rows`; SELECT granted to the read-only role, all to the writer."""
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        with self.admin(name) as conn:
            for statement in ddl:
                conn.execute(statement)
            for table, table_rows in rows.items():
                if table_rows:
                    marks = ",".join(["%s"] * len(table_rows[0]))
                    with conn.cursor() as cur:
                        cur.executemany(f'INSERT INTO "{table}" VALUES ({marks})', table_rows)
            conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {READER}")
            conn.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {WRITER}")
            conn.execute(f"GRANT CREATE ON SCHEMA public TO {WRITER}")
        return name

    def checksum(self, db: str) -> str:
        """Every table's rows (sorted), the relations, functions and large objects of `db`."""
        h = hashlib.sha256()
        with self.admin(db) as conn:
            rels = conn.execute("SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n "
                                "ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
                                "AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2").fetchall()
            h.update(repr(rels).encode())
            h.update(repr(conn.execute("SELECT proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                                       "WHERE n.nspname = 'public' ORDER BY 1").fetchall()).encode())
            h.update(repr(conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchall()).encode())
            for schema, name, kind in rels:
                if kind == "r":
                    rows = conn.execute(f'SELECT * FROM "{schema}"."{name}"').fetchall()
                    h.update(name.encode() + repr(sorted(rows, key=repr)).encode())
        return h.hexdigest()


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def start_pg_server(root: Path) -> tuple[PgServer, Path]:
    """initdb + pg_ctl start under `root` (as `postgres` when root); returns the server and its data dir."""
    pytest.importorskip("psycopg", reason="psycopg is not installed: pip install 'sqltune[db]'")
    bindir = _pg_bin()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql; .ci/run installs it)")
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        pytest.skip("running as root and there is no `postgres` account for initdb (apt-get install postgresql)")
    data, sock, pwfile = root / "data", root / "sock", root / "pw"
    sock.mkdir()
    pwfile.write_text(SUPERPASS + "\n")
    if os.geteuid() == 0:
        for p in (root, sock, pwfile):
            shutil.chown(p, "postgres")
    port = _free_port()
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, f"--pwfile={pwfile}",
                                 "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True, timeout=120)
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=40"
    started = subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"),
                                           "-o", opts, "-w", "-t", "60", "start"]),
                             capture_output=True, text=True, timeout=90)
    if started.returncode != 0:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        raise RuntimeError(f"pg_ctl start failed: {started.stderr}\n{log[-2000:]}")
    server = PgServer("127.0.0.1", port, bindir)
    with server.admin() as conn:
        conn.execute(f"CREATE ROLE {READER} LOGIN PASSWORD '{READER_PASS}'")
        conn.execute(f"CREATE ROLE {WRITER} LOGIN PASSWORD '{WRITER_PASS}'")
    return server, data


def stop_pg_server(server: PgServer, data: Path) -> None:
    subprocess.run(_as_postgres([str(server.bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                   capture_output=True, timeout=60)


@pytest.fixture(scope="session", name="pg_server")
def pg_server_fixture() -> Iterator[PgServer]:
    root = Path(tempfile.mkdtemp(prefix="sqltune-pg-"))
    try:
        server, data = start_pg_server(root)
        try:
            yield server
        finally:
            stop_pg_server(server, data)
            time.sleep(0.2)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Built:
    """Questions of the shared data with the database the synthesised evaluation would build for each,
    all in one schema: `ddl` and `rows` seed a real database, `lines` are predictions-file rows."""

    ddl: list[str]
    rows: dict[str, list[tuple]]
    lines: list[dict]


def build_from_examples(path: Path, n: int, seed: int, scan: int = 4000) -> Built:
    """Up to `n` single-table examples with distinct tables and questions, each with the rows that
    `sqltune eval --eval-databases 1 --seed SEED` scores it on (sqltune.evaluate.score's own choice of seed)."""
    import json

    import sqlglot

    from sqltune.evaluate import metrics, score
    from sqltune.sql.schema import parse_schema, parse_sql
    from sqltune.sql.synth_db import make_plan

    settings = score.Settings(databases=1, seed=seed)
    ddl, rows, lines = [], {}, []
    seen_tables, seen_questions = set(), set()
    with path.open() as fh:
        for k, line in enumerate(fh):
            if len(lines) >= n or k >= scan:
                break
            ex = json.loads(line)
            try:
                schema = parse_schema(ex["context"])
            except Exception:
                continue
            if len(schema.tables) != 1:
                continue
            table = schema.tables[0]
            if table.name.lower() in seen_tables or ex["question"] in seen_questions:
                continue
            statement = schema.ddl()[0]
            try:  # the same table must be creatable on PostgreSQL too
                sqlglot.transpile(statement, read="sqlite", write="postgres")
            except Exception:
                continue
            item = score.Item(len(lines), ex["question"], ex["context"], ex["answer"], ex["answer"])
            gold = parse_sql(ex["answer"], schema)
            gold_expr = gold.expression if gold.ok else None
            plan = make_plan(schema, gold_expr, ex["question"])
            boxes, failed, _ = score._gold_databases(item, schema, gold.sql(ex["answer"]), plan, settings,
                                                     metrics.is_ordered(ex["answer"], gold_expr))
            if failed is not None:
                continue
            box = boxes[0][0]
            data = box.run(f'SELECT * FROM "{table.name}"')
            for b, _ in boxes:
                b.close()
            if not data.ok:
                continue
            seen_tables.add(table.name.lower())
            seen_questions.add(ex["question"])
            ddl.append(statement)
            rows[table.name] = list(data.rows)
            lines.append({"question": ex["question"], "context": ex["context"], "gold": ex["answer"]})
    return Built(ddl, rows, lines)


def build_postgres_db(server: PgServer, name: str, built: Built) -> str:
    """`built` as a PostgreSQL database (tables transpiled from the SQLite DDL, values as stored)."""
    import sqlglot

    ddl = [sqlglot.transpile(s, read="sqlite", write="postgres")[0] for s in built.ddl]
    rows = {t: [tuple(None if v is None else str(v) if isinstance(v, str) else v for v in r) for r in rs]
            for t, rs in built.rows.items()}
    server.create_db(name, ddl=ddl, rows=rows)
    return name
