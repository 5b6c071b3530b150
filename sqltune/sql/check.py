"""Check generated SQL against the schema it was asked about, with sqlglot (via sqltune.sql.schema,
which reads SQL the way SQLite does).

Valid means: exactly one statement, that parses, that only reads (SELECT, WITH ... SELECT, UNION /
INTERSECT / EXCEPT of those), that reads at least one table of the schema, naming only tables and
columns that exist, and calling no function the evaluation sandbox refuses. A product shows
`valid` to a user as "safe to run", so a DELETE or a `load_extension()` must never pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlglot import exp

from sqltune.sql.sandbox import DENIED_FUNCTIONS
from sqltune.sql.schema import Schema, parse_sql

# Nodes that write, change the schema or the session, wherever they sit in the tree (a DELETE inside
# a CTE, SELECT ... INTO): one of them anywhere makes the statement not read-only.
_WRITES = (exp.DML, exp.DDL, exp.Create, exp.Drop, exp.Alter, exp.Command, exp.Into, exp.Pragma, exp.Attach,
           exp.Detach, exp.Transaction, exp.Commit, exp.Rollback, exp.Set, exp.Use, exp.Analyze, exp.Merge)


@dataclass(frozen=True)
class SqlCheck:
    valid: bool
    tables: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)  # "table.column" when resolved, else the name as written
    error: str | None = None


def check_sql(sql: str, schema: Schema) -> SqlCheck:
    parsed = parse_sql(sql, schema)
    if not parsed.ok or parsed.expression is None:
        return SqlCheck(False, error=f"does not parse: {parsed.error}")
    tree = parsed.expression
    problem = read_only_problem(tree)
    if problem:
        return SqlCheck(False, error=problem)
    tables, columns, unknown = _names(tree, schema)
    problems = [f"unknown {kind} `{name}`" for kind, name in unknown]
    denied = sorted(denied_functions(tree))
    problems += [f"function `{name}()` is not allowed (the evaluation sandbox refuses it)" for name in denied]
    if not unknown and not any(schema.table(t) for t in tables):
        problems.append("reads no table of the schema")
    return SqlCheck(not problems, tables, columns, "; ".join(dict.fromkeys(problems)) or None)


def read_only_problem(tree: exp.Expression) -> str:
    """Why a parsed statement is not one read-only query ("" when it is): the one rule that
    `check_sql` and sqltune.db apply before anything runs."""
    if not isinstance(tree, (exp.Select, exp.SetOperation, exp.Subquery)):
        return f"not a read-only query: {tree.key.upper()} statement"
    writes = next(tree.find_all(*_WRITES), None)
    if writes is not None:
        return f"not a read-only query: it contains {writes.key.upper()}"
    return ""


def denied_functions(tree: exp.Expression) -> set[str]:
    """Names of the functions a query calls that sqltune.sql.sandbox.DENIED_FUNCTIONS lists."""
    found = set()
    for func in tree.find_all(exp.Func):
        names = {func.name} if isinstance(func, exp.Anonymous) else set(type(func).sql_names())
        found |= {n.lower() for n in names if n} & DENIED_FUNCTIONS
    return found


def unknown_names(expression: exp.Expression, schema: Schema) -> list[str]:
    """Tables and columns a parsed query names that the context does not define ("table x", "column y"),
    by the same resolution as `check_sql`; the evaluation's schema-adherence metric."""
    return sorted({f"{kind} {name}" for kind, name in _names(expression, schema)[2]})


def _names(tree: exp.Expression, schema: Schema) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """(tables, columns, unknown) of a query: columns as "table.column" when resolved through the
    query's tables and aliases, else as written; unknown as (kind, name) pairs."""
    derived = {n.alias.lower() for n in tree.find_all(exp.CTE, exp.Subquery) if n.alias}
    tables = sorted({t.name for t in tree.find_all(exp.Table) if t.name})
    unknown = [("table", t) for t in tables if t.lower() not in derived and schema.table(t) is None]
    aliases = {a.alias.lower() for a in tree.find_all(exp.Alias) if a.alias}
    columns: set[str] = set()
    names = {}
    for t in tree.find_all(exp.Table):
        names[t.name.lower()] = t.name
        if t.alias:
            names[t.alias.lower()] = t.name
    for col in tree.find_all(exp.Column):
        if isinstance(col.this, exp.Star) or not col.name:
            continue
        if col.table and col.table.lower() not in names and col.table.lower() not in derived:
            unknown.append(("table", col.table))
            columns.add(col.sql())
            continue
        ref = _resolve(col, names, schema)
        if ref is not None:
            columns.add(f"{ref[0]}.{ref[1]}")
        elif col.name.lower() in aliases or (col.table and col.table.lower() in derived) or (derived and not col.table):
            columns.add(col.name)  # a derived table's column: its scope is the subquery, not the schema
        elif not col.table and unknown and schema.has_column(col.name):
            columns.add(col.name)  # the unknown table is the error; the column exists elsewhere in the schema
        else:
            columns.add(col.sql())
            unknown.append(("column", col.sql()))
    return tables, sorted(columns), list(dict.fromkeys(unknown))


def _resolve(col: exp.Column, names: dict[str, str], schema: Schema) -> tuple[str, str] | None:
    """(table, column) in the schema that a column reference names, through table aliases."""
    if col.table:
        table = schema.table(names.get(col.table.lower(), col.table))
        found = table.column(col.name) if table else None
        return (table.name, found.name) if table and found else None
    for name in dict.fromkeys(names.values()):
        table = schema.table(name)
        found = table.column(col.name) if table else None
        if table and found:
            return table.name, found.name
    return None
