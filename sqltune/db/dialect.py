"""From the SQL the model writes to the one statement the database runs.

    t = translate('SELECT name FROM Customers WHERE city = "Oslo"', schema, source="sqlite", target="postgres")
    t.sql      # SELECT name FROM customers WHERE city = 'Oslo'
    t.changed  # True: show both

The model writes the dialect it was trained on (SQLite-like for sql-create-context), so its SQL is
read the way SQLite reads it (sqltune.sql.schema.parse_sql: a double-quoted "Oslo" that names no
column is a string) and written out in the database's dialect by sqlglot, which raises rather
than guess where it cannot translate. Table and column names are spelt as the database spells
them (SQLite ignores case; PostgreSQL folds bare names to lower case, so a table created as
"Artist" must be quoted). Then the gate: exactly one SELECT / WITH / set operation, nothing that
writes or locks, no function on the deny list; the text sent is parsed once more in the target
dialect, so what passed the gate is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, SqlglotError

from sqltune.sql import sandbox
from sqltune.sql.check import read_only_problem
from sqltune.sql.schema import Schema, column_of, parse_sql, table_scope

# PostgreSQL functions a read-only transaction does not stop: server files, large objects, other
# sessions, server settings and signals, advisory locks, notifications, and ways to run a string
# of SQL past the gate. Functions that write (nextval, a user's INSERTing function) fail inside
# READ ONLY; slow ones (pg_sleep) are stopped by statement_timeout.
PG_DENIED_FUNCTIONS = frozenset("""
pg_read_file pg_read_binary_file pg_ls_dir pg_stat_file pg_ls_logdir pg_ls_waldir pg_ls_tmpdir pg_ls_archive_statusdir
lo_import lo_export lo_unlink lo_create lo_creat lo_open lo_put lo_from_bytea lowrite lo_truncate
pg_terminate_backend pg_cancel_backend pg_reload_conf pg_rotate_logfile pg_promote pg_switch_wal
pg_create_restore_point pg_backup_start pg_backup_stop pg_log_backend_memory_contexts set_config
pg_advisory_lock pg_advisory_lock_shared pg_advisory_xact_lock pg_advisory_xact_lock_shared pg_try_advisory_lock
pg_try_advisory_lock_shared pg_try_advisory_xact_lock pg_try_advisory_xact_lock_shared pg_notify
dblink dblink_exec dblink_connect dblink_connect_u dblink_send_query pg_file_write pg_file_rename pg_file_unlink
query_to_xml query_to_xmlschema query_to_xml_and_xmlschema cursor_to_xml cursor_to_xmlschema
pg_logical_emit_message pg_replication_origin_create pg_create_logical_replication_slot
pg_create_physical_replication_slot pg_drop_replication_slot
current_setting pg_show_all_settings pg_show_all_file_settings pg_hba_file_rules pg_ident_file_mappings pg_config
pg_settings_get_flags pg_current_logfile pg_stat_get_activity pg_stat_statements lo_get""".split())
# Catalogs and views that hold secrets or the server's configuration rather than the database's data:
# password hashes (pg_shadow, pg_authid), settings (file paths, keys, conninfo strings), other
# sessions' queries, user mappings and subscriptions with their passwords, large objects read from
# server files. A superuser reads them all inside READ ONLY, so the gate refuses them by name.
PG_DENIED_RELATIONS = frozenset("""
pg_shadow pg_authid pg_user_mapping pg_user_mappings user_mapping_options pg_settings pg_file_settings
pg_hba_file_rules pg_ident_file_mappings pg_db_role_setting pg_config pg_stat_activity pg_stat_statements
pg_stat_replication pg_stat_wal_receiver pg_stat_subscription pg_subscription pg_foreign_server
foreign_server_options pg_largeobject pg_statistic""".split())
# PostgreSQL functions with a side effect on the server that READ ONLY lets through and the rollback
# does not undo: txid_current() assigns the transaction a real id (each call consumes one, and enough
# of them force an anti-wraparound vacuum), statistics resets wipe what monitoring reads, WAL records,
# replication slots and origins move, collations are imported into the catalog, locks are released.
PG_SIDE_EFFECT_FUNCTIONS = frozenset("""
txid_current pg_current_xact_id pg_export_snapshot pg_log_standby_snapshot
pg_stat_reset pg_stat_reset_shared pg_stat_reset_single_table_counters pg_stat_reset_single_function_counters
pg_stat_reset_slru pg_stat_reset_replication_slot pg_stat_reset_subscription_stats pg_stat_reset_backend_stats
pg_stat_statements_reset pg_stat_force_next_flush
pg_logical_slot_get_changes pg_logical_slot_get_binary_changes pg_replication_slot_advance
pg_copy_logical_replication_slot pg_copy_physical_replication_slot pg_sync_replication_slots
pg_replication_origin_advance pg_replication_origin_drop pg_replication_origin_session_setup
pg_replication_origin_session_reset pg_replication_origin_xact_setup pg_replication_origin_xact_reset
pg_wal_replay_pause pg_wal_replay_resume pg_start_backup pg_stop_backup pg_import_system_collations
pg_advisory_unlock pg_advisory_unlock_shared pg_advisory_unlock_all pg_file_sync pg_prewarm
setval nextval""".split())
DENIED = {"postgres": PG_DENIED_FUNCTIONS | PG_SIDE_EFFECT_FUNCTIONS, "sqlite": sandbox.DENIED_FUNCTIONS}
# SQLite functions sqlglot passes through unchanged although no other engine has them: a clear
# transpile error beats the server's "function julianday(text) does not exist".
SQLITE_ONLY_FUNCTIONS = frozenset({"julianday", "total", "randomblob", "zeroblob", "typeof", "changes", "total_changes",
                                   "last_insert_rowid", "likelihood", "likely", "unlikely", "sqlite_version", "printf",
                                   "unixepoch", "glob", "sqlite_compileoption_used", "quote", "soundex"})
TRANSPILE = "transpile"  # an error kind beside sandbox.ERROR_KINDS: sqlglot cannot write it in the target dialect


@dataclass(frozen=True)
class Translation:
    model_sql: str  # as the model wrote it
    sql: str = ""  # what runs on the database; "" when refused
    error_kind: str = ""  # "" | syntax | denied | multiple_statements | empty | transpile
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error_kind

    @property
    def changed(self) -> bool:
        return bool(self.sql) and " ".join(self.sql.split()) != " ".join(self.model_sql.strip().rstrip(";").split())

    def to_dict(self) -> dict[str, object]:
        return {"model_sql": self.model_sql, "sql": self.sql, "changed": self.changed,
                "error_kind": self.error_kind, "error": self.error}


def _function_names(tree: exp.Expression) -> set[str]:
    found = set()
    for func in tree.find_all(exp.Func):
        names = {func.name} if isinstance(func, exp.Anonymous) else set(type(func).sql_names())
        found |= {n.lower() for n in names if n}
    return found


def gate(tree: exp.Expression, dialect: str) -> str:
    """Why this statement may not run ("" when it may): one read-only query, no locks, no denied function."""
    problem = read_only_problem(tree)
    if problem:
        return problem
    if tree.find(exp.Lock) is not None:
        return "not a read-only query: SELECT ... FOR UPDATE / FOR SHARE takes locks"
    denied = sorted(_function_names(tree) & DENIED.get(dialect, frozenset()))
    if denied:
        why = ("it changes the server's state, which a rollback does not undo" if denied[0] in PG_SIDE_EFFECT_FUNCTIONS
               else "it reaches beyond reading the tables")
        return f"function {denied[0]}() is not allowed on a real database ({why})"
    if dialect == "postgres":
        # lower case: an unquoted name is folded to it, and a quoted "PG_SHADOW" is refused all the same
        secret = sorted({t.name.lower() for t in tree.find_all(exp.Table)} & PG_DENIED_RELATIONS)
        if secret:
            return (f"{secret[0]} is not allowed on a real database (it holds passwords, server settings or "
                    "other sessions' queries, not the database's data)")
    return ""


def _parse_one(sql: str, dialect: str, schema: Schema) -> tuple[exp.Expression | None, str, str]:
    """(tree, error_kind, error) of one statement read as `dialect` would read it."""
    text = sql.strip().rstrip(";").strip()
    if not text:
        return None, sandbox.EMPTY, "empty query"
    if dialect == "sqlite":
        parsed = parse_sql(text, schema)
        if not parsed.ok or parsed.expression is None:
            kind = sandbox.MULTIPLE if "statements; expected" in parsed.error else sandbox.SYNTAX
            if kind == sandbox.MULTIPLE:
                return None, kind, f"{parsed.error.split(';')[0]}: only one SELECT is ever sent"
            return None, kind, f"cannot read the SQL as {dialect}: {parsed.error}"
        return parsed.expression, "", ""
    try:
        statements = [s for s in sqlglot.parse(text, read=dialect) if s is not None]
    except (SqlglotError, RecursionError, ValueError) as e:
        return None, sandbox.SYNTAX, f"cannot read the SQL as {dialect}: {str(e).splitlines()[0][:200]}"
    if len(statements) != 1:
        return None, sandbox.MULTIPLE, f"{len(statements)} statements; only one SELECT is ever sent"
    return statements[0], "", ""


def match_names(tree: exp.Expression, schema: Schema) -> None:
    """Spell tables and columns as the database does, quoting names that are not all lower case. A column
    is looked up in the tables its query reads (through aliases), as SQLite resolves it."""
    scope = table_scope(tree)
    for col in list(tree.find_all(exp.Column)):
        if not col.name or not isinstance(col.this, exp.Identifier):
            continue
        ref = column_of(col, scope, schema)
        table = schema.table(ref[0]) if ref else None
        found = table.column(ref[1]) if table and ref else None
        if found is not None:
            col.set("this", exp.to_identifier(found.name, quoted=found.name != found.name.lower()))
    for t in tree.find_all(exp.Table):
        table = schema.table(t.name) if t.name else None
        if table is not None and not t.args.get("db"):
            t.set("this", exp.to_identifier(table.name, quoted=table.name != table.name.lower()))


def translate(sql: str, schema: Schema, *, source: str = "sqlite", target: str = "sqlite") -> Translation:
    """The statement to run on a `target` database for SQL written in `source`, or why there is none."""
    tree, kind, error = _parse_one(sql, source, schema)
    if tree is None:
        return Translation(sql, error_kind=kind, error=error)
    if isinstance(tree, (exp.Condition, exp.Alias, exp.Identifier, exp.Star)):
        # sqlglot reads "SELEC x" as the expression `SELEC AS x`; the database would call it a syntax error
        return Translation(sql, error_kind=sandbox.SYNTAX,
                           error=f"not a SQL statement: {sql.strip().split()[0][:40]!r} starts no SELECT")
    problem = gate(tree, source)
    if problem:
        return Translation(sql, error_kind=sandbox.DENIED, error=problem)
    if target != source or target != "sqlite":
        match_names(tree, schema)
    if target == "postgres":
        _alias_subqueries(tree)
    if source == "sqlite" and target != "sqlite":
        _text_affinity(tree, schema)
    try:
        out = tree.sql(dialect=target, unsupported_level=ErrorLevel.RAISE)
    except SqlglotError as e:
        return Translation(sql, error_kind=TRANSPILE,
                           error=f"sqlglot cannot write this {source} SQL as {target}: {str(e).splitlines()[0][:200]}")
    if target == source == "sqlite" and not _rewritten(sql, tree, schema):
        out = sql.strip().rstrip(";").strip()  # SQLite reads the model's own text: run exactly that
    if source == "sqlite" and target != "sqlite":
        left = _sqlite_only(tree)
        if left:
            return Translation(sql, error_kind=TRANSPILE,
                               error=f"sqlglot has no {target} form for SQLite's {left}; rephrase the question "
                                     f"or pass --db-dialect {target} with a model that writes {target}")
    again, kind, error = _parse_one(out, target, schema) if target != "sqlite" else (tree, "", "")
    if again is None:
        return Translation(sql, error_kind=TRANSPILE, error=f"the {target} SQL does not read back: {error}")
    problem = gate(again, target)
    if problem:
        return Translation(sql, error_kind=sandbox.DENIED, error=problem)
    return Translation(sql, out)


_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)


def _text_affinity(tree: exp.Expression, schema: Schema) -> None:
    """SQLite compares a text column with a number as text: the number takes the column's TEXT affinity
    (https://sqlite.org/datatype3.html#type_conversions_prior_to_comparison). Written as a string literal,
    PostgreSQL compares the same way, where it would refuse `varchar = integer`."""
    scope = table_scope(tree)

    def text_column(node: exp.Expression) -> bool:
        if not isinstance(node, exp.Column):
            return False
        ref = column_of(node, scope, schema)
        table = schema.table(ref[0]) if ref else None
        column = table.column(ref[1]) if table and ref else None
        return column is not None and column.affinity == "TEXT"

    def as_text(node: exp.Expression) -> None:
        if isinstance(node, exp.Literal) and not node.is_string:
            node.replace(exp.Literal.string(node.this))
        elif isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
            node.replace(exp.Literal.string(f"-{node.this.this}"))

    for cmp in list(tree.find_all(*_COMPARISONS)):
        if text_column(cmp.this):
            as_text(cmp.expression)
        elif text_column(cmp.expression):
            as_text(cmp.this)
    for among in list(tree.find_all(exp.In)):
        if text_column(among.this):
            for item in list(among.expressions):
                as_text(item)


def _alias_subqueries(tree: exp.Expression) -> None:
    """PostgreSQL before 16 refuses a subquery in FROM without an alias; SQLite does not need one."""
    n = 0
    for sub in list(tree.find_all(exp.Subquery)):
        if not sub.alias and isinstance(sub.parent, (exp.From, exp.Join)):
            n += 1
            sub.set("alias", exp.TableAlias(this=exp.to_identifier(f"_q{n}")))


def _sqlite_only(tree: exp.Expression) -> str:
    """The first SQLite-only construct left in a tree sqlglot wrote for another engine ("" if none)."""
    if tree.find(exp.Glob) is not None:
        return "GLOB operator"
    for func in tree.find_all(exp.Anonymous):
        if func.name.lower() in SQLITE_ONLY_FUNCTIONS:
            return f"{func.name.lower()}() function"
    for collate in tree.find_all(exp.Collate):
        if collate.expression.name.lower() in ("nocase", "rtrim", "binary"):
            return f"COLLATE {collate.expression.name.upper()}"
    return ""


def _rewritten(sql: str, tree: exp.Expression, schema: Schema) -> bool:
    """Whether parse_sql changed what the statement means (a number for a "73,405" string)."""
    return parse_sql(sql, schema).rewritten
