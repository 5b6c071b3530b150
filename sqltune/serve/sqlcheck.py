"""Check generated SQL against the schema it was asked about, with sqlglot (via sqltune.sql.schema,
which reads SQL the way SQLite does): one statement, that parses, naming only tables and columns
that exist."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlglot import exp

from sqltune.sql.schema import Schema, parse_sql


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
    if not isinstance(tree, (exp.Query, exp.DML)):
        return SqlCheck(False, error=f"not a query: {tree.key.upper()} statement")
    ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    tables = sorted({t.name for t in tree.find_all(exp.Table) if t.name})
    problems = [f"unknown table `{t}`" for t in tables if t.lower() not in ctes and schema.table(t) is None]
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
        ref = _resolve(col, names, schema)
        if ref is not None:
            columns.add(f"{ref[0]}.{ref[1]}")
        elif col.name.lower() in aliases or (col.table and col.table.lower() in ctes):
            columns.add(col.name)
        else:
            columns.add(col.sql())
            problems.append(f"unknown column `{col.sql()}`")
    return SqlCheck(not problems, tables, sorted(columns), "; ".join(dict.fromkeys(problems)) or None)


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
