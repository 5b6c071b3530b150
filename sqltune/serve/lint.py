"""What a SQL statement that passes the checker may still get wrong: warnings shown beside the answer.

    lint("SELECT first_name, last_name FROM people GROUP BY first_name", schema, "... people and candidates ...")
    # ["`last_name` is neither grouped nor aggregated: ...", "the question names `candidates` but the SQL never reads it"]

`sqltune.sql.check` says whether a statement is safe to run on a schema; it says nothing of whether it
answers the question, and a person reads a green "valid" as "correct". These are the mistakes a
reader can see without running anything:

- a bare column under GROUP BY (or beside an aggregate without GROUP BY): SQLite takes its value
  from an arbitrary row of the group, PostgreSQL refuses the query (SQLSTATE 42803);
- a table of the schema that the question names (its name, singular or plural, as in
  sqltune.db.introspect's table selection) but the SQL never reads.

Each is a hint, never a refusal: the query may still be what was meant.
"""

from __future__ import annotations

from sqlglot import exp

from sqltune.db.introspect import _stems
from sqltune.sql.schema import Schema, parse_sql, table_scope


def lint(sql: str, schema: Schema, question: str = "") -> list[str]:
    """Warnings for one statement (none when it does not parse: the checker already says why)."""
    parsed = parse_sql(sql, schema)
    if not parsed.ok or parsed.expression is None:
        return []
    tree = parsed.expression
    warnings = []
    for select in tree.find_all(exp.Select):
        warnings += _bare_columns(select)
    if question:
        warnings += _unread_tables(tree, schema, question)
    return list(dict.fromkeys(warnings))


def _own_nodes(node: exp.Expression) -> list[exp.Expression]:
    """`node` and what it contains, without descending into nested queries (they are linted on their own)."""
    out, stack = [], [node]
    while stack:
        current = stack.pop()
        out.append(current)
        for child in current.iter_expressions():
            if not isinstance(child, (exp.Select, exp.Subquery, exp.SetOperation)):
                stack.append(child)
    return out


def _aggregated(node: exp.Expression, top: exp.Expression) -> bool:
    """Whether `node` sits inside an aggregate (not a window) below `top`."""
    parent = node.parent
    while parent is not None:
        if isinstance(parent, exp.AggFunc) and not isinstance(parent.parent, exp.Window):
            return True
        if parent is top:
            return False
        parent = parent.parent
    return False


def _bare_columns(select: exp.Select) -> list[str]:
    projections = select.expressions
    group = select.args.get("group")
    grouped_exprs = list(group.expressions) if group else []
    has_aggregate = any(isinstance(n, exp.AggFunc) and not isinstance(n.parent, exp.Window)
                        for p in projections for n in _own_nodes(p))
    if not grouped_exprs and not has_aggregate:
        return []
    aliases = {p.alias.lower(): p for p in projections if isinstance(p, exp.Alias) and p.alias}
    grouped_sql, grouped_cols = set(), set()
    for g in grouped_exprs:
        if isinstance(g, exp.Literal) and g.is_int and 0 < int(g.this) <= len(projections):
            g = projections[int(g.this) - 1]  # GROUP BY 2: the second output column
        elif isinstance(g, exp.Column) and not g.table and g.name.lower() in aliases:
            g = aliases[g.name.lower()]  # GROUP BY an output alias
        g = g.this if isinstance(g, exp.Alias) else g
        grouped_sql.add(g.sql().lower())
        if isinstance(g, exp.Column):
            grouped_cols.add((g.table.lower(), g.name.lower()))

    def grouped(col: exp.Column) -> bool:
        name, table = col.name.lower(), col.table.lower()
        return any(n == name and (not t or not table or t == table) for t, n in grouped_cols)

    def bare_in(part: exp.Expression) -> list[str]:
        inner = part.this if isinstance(part, exp.Alias) else part
        if inner.sql().lower() in grouped_sql:
            return []
        return [c.sql() for c in _own_nodes(inner) if isinstance(c, exp.Column) and c.name
                and not isinstance(c.this, exp.Star) and not _aggregated(c, part) and not grouped(c)]

    bare = []
    for p in projections:
        bare += bare_in(p)
    having = select.args.get("having")
    if having is not None:
        bare += bare_in(having.this)
    order = select.args.get("order")
    for o in order.expressions if order else []:
        key = o.this
        if isinstance(key, exp.Column) and not key.table and key.name.lower() in aliases:
            continue  # ORDER BY an output column
        bare += bare_in(key)
    if not bare:
        return []
    names = ", ".join(f"`{b}`" for b in dict.fromkeys(bare))
    where = "under GROUP BY" if grouped_exprs else "beside an aggregate without GROUP BY"
    return [f"{names} {'is' if len(set(bare)) == 1 else 'are'} neither grouped nor aggregated ({where}): "
            "SQLite takes a value from an arbitrary row of each group, PostgreSQL refuses the query"]


def _unread_tables(tree: exp.Expression, schema: Schema, question: str) -> list[str]:
    read = {name.lower() for name in table_scope(tree).values()}
    if not read or len(schema.tables) < 2:
        return []
    words = _stems(question)
    read_tables = [t for t in schema.tables if t.name.lower() in read]
    # a word that is a column of a table the SQL reads is answered by that column ("Which candidate ...?")
    column_words = set().union(*(_stems(c.name) for t in read_tables for c in t.columns))
    out = []
    for table in schema.tables:
        if table.name.lower() in read:
            continue
        stems = _stems(table.name)
        if stems and stems <= words and not stems <= column_words:
            out.append(f"the question names `{table.name}` but the SQL never reads that table")
    return out
