"""Connect to a real database: a PostgreSQL URL or a SQLite file, read-only from the first byte.

    db = connect("postgresql://reader@localhost/shop")      # password from the URL or PGPASSWORD
    db = connect("./chinook.sqlite")                         # opened mode=ro, never created

Every connection is read-only before any query is sent: PostgreSQL sessions start with
`default_transaction_read_only=on` (and each query runs in its own READ ONLY transaction,
sqltune.db.execute), a SQLite file is opened with `mode=ro`. Failing to connect is one line that
names the fix (bad URL, missing driver, refused, wrong password, unknown database); the password
is never part of a message, a log line or a report: `display` is the URL without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.config import redact_url
from sqltune.errors import SqltuneError
from sqltune.sql.sandbox import read_only_uri

log = logs.get("db")
SUPPORTED = ("postgresql", "sqlite")
SQLGLOT_DIALECT = {"postgresql": "postgres", "sqlite": "sqlite"}
SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db", ".db3")
CONNECT_TIMEOUT_S = 10


class DatabaseError(SqltuneError):
    """A database that cannot be reached or used (bad URL, driver, server, credentials)."""


@dataclass
class Database:
    """A connected database: `kind` is postgresql or sqlite; `engine` (SQLAlchemy) serves introspection."""

    kind: str
    display: str  # the URL or path without any password
    engine: Any
    path: Path | None = None  # the SQLite file
    schema: str = ""  # the PostgreSQL schema read; "" = the connection's default
    info: dict[str, Any] = field(default_factory=dict)  # server version, user, database name

    @property
    def dialect(self) -> str:
        """The sqlglot dialect of the database."""
        return SQLGLOT_DIALECT[self.kind]

    def describe(self) -> dict[str, Any]:
        return {"engine": self.kind, "database": self.display, **self.info}

    def close(self) -> None:
        self.engine.dispose()


def _scrub(text: str, password: str | None) -> str:
    text = redact_url(text)
    return text.replace(password, "***") if password else text


def _is_sqlite_path(spec: str) -> bool:
    if spec.startswith("sqlite:"):
        return False
    return "://" not in spec and (spec.lower().endswith(SQLITE_SUFFIXES) or Path(spec).is_file())


def connect(spec: str, *, schema: str = "") -> Database:
    """A read-only connection to `spec` (URL or SQLite file), checked by one round trip."""
    if not spec.strip():
        raise DatabaseError("no database given", "pass --database postgresql://user@host/db or a SQLite file path")
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise DatabaseError("real databases need SQLAlchemy, which is not installed",
                            "pip install 'sqltune[db]'") from None
    if _is_sqlite_path(spec) or spec.startswith("sqlite:"):
        return _connect_sqlite(spec)
    return _connect_postgres(spec, schema)


def _sqlite_file(spec: str) -> Path:
    if spec.startswith("sqlite:"):
        m = re.fullmatch(r"sqlite:///(.+?)(\?.*)?", spec)
        if not m:
            raise DatabaseError(f"{spec!r} names no SQLite file", "use sqlite:///path/to/file.sqlite or just the path")
        spec = m.group(1)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DatabaseError(f"SQLite file {path} does not exist (it is opened read-only, never created)",
                            "pass the path of an existing SQLite database file")
    with path.open("rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            raise DatabaseError(f"{path} is not a SQLite database file", "pass a SQLite file or a postgresql:// URL")
    return path.resolve()


def _connect_sqlite(spec: str) -> Database:
    import sqlalchemy as sa

    path = _sqlite_file(spec)
    # mode=ro: SQLite itself refuses every write on this connection, below sqltune's authorizer
    url = f"sqlite:///{read_only_uri(path)}&uri=true"  # immutable when WAL: no -wal/-shm beside it
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            version = conn.exec_driver_sql("SELECT sqlite_version()").scalar()
            conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar()
    except sa.exc.DBAPIError as e:
        raise DatabaseError(f"cannot read SQLite file {path}: {e.orig}",
                            "check that the file is a SQLite database you may read") from None
    return Database("sqlite", str(path), engine, path=path, info={"server_version": f"SQLite {version}"})


def _connect_postgres(spec: str, schema: str) -> Database:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    try:
        url = make_url(spec)
    except sa.exc.ArgumentError:
        raise DatabaseError(f"--database {redact_url(spec)!r} is neither a database URL nor an existing SQLite file",
                            "pass postgresql://user@host:5432/dbname or the path of a SQLite file") from None
    except ValueError:  # SQLAlchemy's int() of a port that is not a number (`host:notaport`, `[::1:5432`)
        raise DatabaseError(f"--database {redact_url(spec)!r}: the port is not a number (or an IPv6 address "
                            "lacks its closing `]`)", "write host:5432, or [::1]:5432 for an IPv6 address") from None
    password = url.password if isinstance(url.password, str) else None
    display = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    if backend not in SUPPORTED:
        raise DatabaseError(f"{backend} databases are not supported yet (got {display})",
                            "use a postgresql:// URL or a SQLite file")
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if not url.database:
        raise DatabaseError(f"{display} names no database", "add the database name: postgresql://user@host/dbname")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise DatabaseError("PostgreSQL needs the psycopg driver, which is not installed",
                            "pip install 'sqltune[db]' (psycopg[binary])") from None
    options = "-c default_transaction_read_only=on"
    try:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={
            "options": options, "connect_timeout": CONNECT_TIMEOUT_S, "application_name": "sqltune"})
    except (ImportError, sa.exc.NoSuchModuleError) as e:
        raise DatabaseError(f"no driver for {url.drivername}: {e}",
                            "use postgresql:// (psycopg, from pip install 'sqltune[db]')") from None
    try:
        with engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT current_setting('server_version'), current_user, current_database(), current_schema()").one()
            info = {"server_version": f"PostgreSQL {row[0]}", "user": row[1], "database_name": row[2]}
            chosen = schema or row[3] or "public"
            found = conn.exec_driver_sql("SELECT 1 FROM pg_namespace WHERE nspname = %(s)s", {"s": chosen}).first()
            if found is None:
                raise DatabaseError(f"schema {chosen!r} does not exist in {display}",
                                    "pass --db-schema with an existing schema (default: public)")
            info["writes_allowed"] = _write_privileges(conn, chosen)
    except sa.exc.DBAPIError as e:
        raise _connect_error(e, display, url, password) from None
    db = Database("postgresql", display, engine, schema=chosen, info={**info, "schema": chosen})
    return db


def _write_privileges(conn: Any, schema: str) -> list[str]:
    """Why this role could write if a transaction let it: superuser, table privileges, CREATE on the schema."""
    why = []
    if conn.exec_driver_sql("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").scalar():
        why.append("superuser")
    tables = conn.exec_driver_sql(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %(s)s AND c.relkind IN ('r', 'p') "
        "AND has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE, TRUNCATE') ORDER BY 1", {"s": schema}).scalars().all()
    if tables:
        why.append(f"may write {len(tables)} tables (e.g. {tables[0]})")
    if conn.exec_driver_sql("SELECT has_schema_privilege(%(s)s, 'CREATE')", {"s": schema}).scalar():
        why.append(f"may create objects in schema {schema}")
    return why


def _connect_error(e: Any, display: str, url: Any, password: str | None) -> DatabaseError:
    text = _scrub(str(getattr(e, "orig", e)).strip().splitlines()[0] if str(getattr(e, "orig", e)).strip() else
                  type(e).__name__, password)
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    low = text.lower()
    if "password authentication failed" in low or "no password supplied" in low:
        return DatabaseError(f"PostgreSQL at {where} refused user {url.username!r}: wrong or missing password",
                             "check the user and password (in the URL or PGPASSWORD)")
    if "does not exist" in low and "database" in low:
        return DatabaseError(f"database {url.database!r} does not exist on {where}",
                             "check the database name at the end of the URL")
    if "role" in low and "does not exist" in low:
        return DatabaseError(f"user {url.username!r} does not exist on {where}", "check the user name in the URL")
    if "connection refused" in low or "could not connect" in low or "timeout expired" in low or "no route" in low:
        return DatabaseError(f"cannot reach PostgreSQL at {where}: {text}",
                             "start the server, or fix the host and port in the URL")
    if "could not translate host name" in low or "name or service not known" in low:
        return DatabaseError(f"unknown host {url.host!r} in {display}", "fix the host name in the URL")
    return DatabaseError(f"cannot connect to {display}: {text}", "check the URL, the server and your credentials")


def warn_if_writable(db: Database) -> str:
    """A warning (logged, and returned for the caller to print) when the role could write."""
    why = db.info.get("writes_allowed") or []
    if not why:
        return ""
    user = db.info.get("user", "?")
    message = (f"user {user} is not a read-only role ({'; '.join(why)}). sqltune runs each query in a READ ONLY "
               f"transaction, but a role with only SELECT is the safe way: "
               f"GRANT SELECT ON ALL TABLES IN SCHEMA {db.schema} TO a login role without other grants")
    logs.event(log, "database role can write", level=30, database=db.display, user=user, reasons=why)
    return message
