"""Join in the tables a query's columns come from, along the schema's foreign keys.

    complete_joins("SELECT first_name FROM candidates", schema)
    # 'SELECT T2.first_name FROM candidates JOIN people AS T2 ON candidates.candidate_id = T2.person_id'

A small model often names the right columns and the wrong table: `first_name` from `candidates` when
`first_name` is a column of `people`, or `T2.name` where T1 is the table with `name`. SQLite refuses such a
query (no such column). Spider's parsers do the same completion when they decode (IRNet, RAT-SQL: the FROM
clause follows from the columns chosen and the foreign-key graph); here it runs after the text is decoded:

- a column qualified with a table of the query that lacks it moves to the one other table of that SELECT
  that has it;
- a column no table of its SELECT has comes from the schema's table that has it and is fewest foreign keys
  away, joined in along that path (`JOIN t AS Tn ON ...` with the key's columns); every column of that
  SELECT is then qualified, so none becomes ambiguous;
- before those, a JOIN whose ON equates columns its tables lack (`a JOIN b ON a.b_id = b.b_id` where `a` has
  no `b_id`) is dropped when nothing else in the SELECT reads its table, or else joined along the foreign
  keys from the nearest earlier table of the query (moving the column instead would leave `b.b_id = b.b_id`,
  a cross join).

Only columns SQLite could not resolve are touched: a column of an enclosing SELECT (a correlated subquery),
an output alias, a derived table's column are left as written, and a SELECT that reads anything but the
schema's tables is left alone. So a query that ran before runs unchanged; one that could not run either
stays as it was or becomes one that can. Where the choice is not one table (two tables equally near with
the column, a qualifier that fits two tables, no table at all) or a join would capture a column of an
enclosing SELECT, nothing is guessed and the whole query stays as written. Contexts without FOREIGN KEY
clauses link two tables through a shared column named `*id`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

import networkx as nx
from sqlglot import exp

from sqltune.errors import DataError
from sqltune.sql.schema import DIALECT, Schema, Table, parse_schema, parse_sql


@dataclass
class _Source:
    key: str  # what qualifies its columns: the alias, else the table's name
    table: Table


def complete_joins(sql: str, schema: Schema) -> str | None:
    """`sql` with its missing joins completed, or None when it needs none or none can be found."""
    graph = _graph(schema)
    if graph.number_of_edges() == 0:
        return None
    parsed = parse_sql(sql, schema)
    if not parsed.ok or parsed.expression is None:
        return None
    tree = parsed.expression
    changed = False
    try:
        for select in list(tree.find_all(exp.Select)):
            changed = _complete(select, schema, graph) or changed
    except _NoSingleAnswer:
        return None  # the tree may be half changed: it is dropped, and the query stays as written
    return tree.sql(dialect=DIALECT) if changed else None


class _NoSingleAnswer(Exception):
    """A missing column no single table supplies, or a join that would change what another column means."""


@lru_cache(maxsize=256)
def _graph(schema: Schema) -> nx.Graph:
    """Tables as nodes; an edge per pair of tables a foreign key joins, with the column pairs to equate
    (keyed by the pair's first table, lower-case)."""
    graph = nx.Graph()
    graph.add_nodes_from(t.name.lower() for t in schema.tables)
    for link in schema.links:
        a, b = schema.table(link.table), schema.table(link.ref_table)
        if a is None or b is None or a is b or graph.has_edge(a.name.lower(), b.name.lower()):
            continue
        if all(a.column(c) for c in link.columns) and all(b.column(c) for c in link.ref_columns):
            _edge(graph, a, b, list(zip(link.columns, link.ref_columns, strict=True)))
    if not schema.links:
        for i, a in enumerate(schema.tables):
            for b in schema.tables[i + 1:]:
                shared = [c.name for c in a.columns if c.name.lower().endswith("id") and b.column(c.name)]
                if shared:
                    _edge(graph, a, b, [(shared[0], b.column(shared[0]).name)])  # type: ignore[union-attr]
    return graph


def _edge(graph: nx.Graph, a: Table, b: Table, pairs: list[tuple[str, str]]) -> None:
    graph.add_edge(a.name.lower(), b.name.lower(), on={a.name.lower(): pairs, b.name.lower(): [(y, x) for x, y in pairs]})


def _own_columns(select: exp.Select) -> Iterator[exp.Column]:
    """The column references that belong to this SELECT, not to a subquery inside it."""
    for col in select.find_all(exp.Column):
        if not isinstance(col.this, exp.Star) and col.name and col.find_ancestor(exp.Select) is select:
            yield col


def _sources(select: exp.Select, schema: Schema) -> list[_Source] | None:
    """The tables the SELECT reads, in order; None when it reads anything but the schema's tables."""
    items = [select.args.get("from_") or select.args.get("from")] + list(select.args.get("joins") or [])
    out = []
    for item in items:
        node = item.this if item is not None else None
        table = schema.table(node.name) if isinstance(node, exp.Table) and not node.args.get("db") else None
        if table is None:
            return None
        out.append(_Source(node.alias or node.name, table))
    return out


def _outer_keys(select: exp.Select, schema: Schema) -> tuple[set[str], set[str]]:
    """Qualifiers and column names the SELECTs around this one provide (a correlated subquery's)."""
    keys: set[str] = set()
    columns: set[str] = set()
    outer = select.parent.find_ancestor(exp.Select) if select.parent else None
    while outer is not None:
        for source in _sources(outer, schema) or []:
            keys.add(source.key.lower())
            columns |= {c.name.lower() for c in source.table.columns}
        outer = outer.parent.find_ancestor(exp.Select) if outer.parent else None
    return keys, columns


def _complete(select: exp.Select, schema: Schema, graph: nx.Graph) -> bool:
    sources = _sources(select, schema)
    if not sources:
        return False
    by_key = {s.key.lower(): s for s in sources}
    if len(by_key) != len(sources):
        return False  # one table twice without aliases: SQLite's own error, not a missing join
    outer_keys, outer_columns = _outer_keys(select, schema)
    aliases = {e.alias.lower() for e in select.expressions if isinstance(e, exp.Alias)}

    def unresolved(col: exp.Column) -> bool:
        """Whether SQLite finds no column for `col` (neither in this SELECT's tables nor in an enclosing one)."""
        qualifier, name = col.table.lower(), col.name
        if qualifier in by_key:
            return by_key[qualifier].table.column(name) is None
        if qualifier:
            return qualifier not in outer_keys
        return (not any(s.table.column(name) for s in sources) and name.lower() not in aliases
                and name.lower() not in outer_columns)

    outer = {col.name.lower() for col in _own_columns(select)  # unqualified names SQLite resolves outside
             if not col.table and not any(s.table.column(col.name) for s in sources)
             and col.name.lower() not in aliases and col.name.lower() in outer_columns}
    written = {id(s) for s in sources}
    mended = _mend_join_conditions(select, sources, schema, graph, unresolved)
    by_key = {s.key.lower(): s for s in sources}
    missing = [col for col in _own_columns(select) if unresolved(col)]
    if not missing and not mended:
        return False
    plan: dict[int, str] = {}  # id(column) -> the key of the source that supplies it
    for col in missing:
        key = _supplier(col.name, sources, schema, graph, select)
        if key is None:
            raise _NoSingleAnswer(col.sql())
        plan[id(col)] = key
    if any(s.table.column(name) for s in sources if id(s) not in written for name in outer):
        raise _NoSingleAnswer("a joined table would capture a column of the enclosing SELECT")
    for col in _own_columns(select):
        key = plan.get(id(col))
        if key is None and not col.table and col.name.lower() not in aliases:
            holders = [s for s in sources if s.table.column(col.name)]
            key = holders[0].key if holders else None
        if key is not None:
            col.set("table", exp.to_identifier(key))
    return True


def _mend_join_conditions(select: exp.Select, sources: list[_Source], schema: Schema, graph: nx.Graph,
                          unresolved: Callable[[exp.Column], bool]) -> bool:
    """JOINs whose ON equates a column its tables lack (`a JOIN b ON a.b_id = b.b_id` where `a` has no `b_id`).
    A joined table nothing else in the SELECT reads is dropped: the query asks nothing of it. One that is read
    is joined along the foreign keys from the nearest earlier table, through the tables between them where they
    are not linked directly. Only ON clauses made of column = column terms are mended; `sources` follows what
    was dropped or added. Whether anything changed."""
    changed = False
    for join in list(select.args.get("joins") or []):
        on = join.args.get("on")
        terms = list(on.flatten()) if isinstance(on, exp.And) else [on]
        if on is None or not all(isinstance(t, exp.EQ) and isinstance(t.this, exp.Column)
                                 and isinstance(t.expression, exp.Column) for t in terms):
            continue
        in_on = [c for t in terms for c in (t.this, t.expression)]
        if not any(unresolved(c) for c in in_on):
            continue
        index = next(i for i, s in enumerate(sources) if s.key.lower() == (join.this.alias or join.this.name).lower())
        source = sources[index]
        if not _reads(select, source, [c for c in _own_columns(select) if not any(c is o for o in in_on)], unresolved):
            join.pop()
            del sources[index]
            changed = True
            continue
        name = source.table.name.lower()
        path = nx.multi_source_dijkstra_path(graph, [s.table.name.lower() for s in sources[:index]]).get(name)
        if path is None or len(path) < 2:
            continue  # not linked to an earlier table, or the same table read twice
        key = next(s.key for s in sources[:index] if s.table.name.lower() == path[0])
        key = _join_path(select, path[:-1], key, sources, schema, graph, before=join)
        join.set("on", _on(graph, path[-2], name, key, source.key))
        changed = True
    return changed


def _reads(select: exp.Select, source: _Source, columns: list[exp.Column], unresolved: Callable[[exp.Column], bool]) -> bool:
    """Whether the SELECT reads anything from `source` through `columns` (or a star): a column qualified with
    it that it has, or an unqualified or unresolved one it could supply."""
    if any(isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star)) for e in select.expressions):
        return True
    return any(source.table.column(c.name) is not None
               and (c.table.lower() == source.key.lower() or not c.table or unresolved(c)) for c in columns)


def _on(graph: nx.Graph, prev: str, node: str, key: str, alias: str) -> exp.Expression:
    """The ON condition joining table `node` (as `alias`) to table `prev` (as `key`) along their foreign key."""
    return exp.and_(*(exp.EQ(this=exp.column(x, table=key), expression=exp.column(y, table=alias))
                      for x, y in graph.edges[prev, node]["on"][prev]))


def _aliased(table: Table, alias: str) -> exp.Table:
    return exp.Table(this=exp.to_identifier(table.name), alias=exp.TableAlias(this=exp.to_identifier(alias)))


def _supplier(name: str, sources: list[_Source], schema: Schema, graph: nx.Graph, select: exp.Select) -> str | None:
    """The key of the source that has column `name`: one the SELECT reads already, else a table joined in
    (appended to `sources` and to the SELECT). None when no single table is the answer."""
    holders = [s for s in sources if s.table.column(name)]
    if holders:
        return holders[0].key if len(holders) == 1 else None
    reach = nx.multi_source_dijkstra_path(graph, [s.table.name.lower() for s in sources])  # in the order read: ties alike in every run
    paths = [reach[t.name.lower()] for t in schema.tables_with(name) if t.name.lower() in reach]
    shortest = min(map(len, paths), default=0)
    nearest = [p for p in paths if len(p) == shortest]
    if len(nearest) != 1:
        return None
    path = nearest[0]
    key = next(s.key for s in sources if s.table.name.lower() == path[0])
    return _join_path(select, path, key, sources, schema, graph)


def _join_path(select: exp.Select, path: list[str], key: str, sources: list[_Source], schema: Schema, graph: nx.Graph,
               before: exp.Join | None = None) -> str:
    """Join in each table of `path` after its first (read as `key`), along the foreign key from the one before it,
    as a new T{n}: before the JOIN `before`, else at the end, with their sources at the same place in `sources`
    (the FROM's, then one per JOIN). The key of the path's last table. A shortest path from the tables a SELECT
    reads passes through none of them, so every table after the first is new."""
    joins = list(select.args.get("joins") or [])
    at = len(joins) if before is None else next(i for i, j in enumerate(joins) if j is before)
    added: list[exp.Join] = []
    for prev, node in pairwise(path):
        table = schema.table(node)
        assert table is not None
        alias = _new_alias(sources)
        added.append(exp.Join(this=_aliased(table, alias), on=_on(graph, prev, node, key, alias)))
        sources.insert(at + len(added), _Source(alias, table))
        key = alias
    if added:
        select.set("joins", joins[:at] + added + joins[at:])
    return key


def _new_alias(sources: list[_Source]) -> str:
    used = {s.key.lower() for s in sources}
    n = len(sources) + 1
    while f"t{n}" in used:
        n += 1
    return f"T{n}"


def with_joins(sql: str, context: str) -> str:
    """`sql` completed against the CREATE TABLE context the model was given; as it was when the context
    does not read as a schema or nothing needs completing."""
    if not sql:
        return sql
    try:
        schema = parse_schema(context)
    except DataError:
        return sql
    return complete_joins(sql, schema) or sql
