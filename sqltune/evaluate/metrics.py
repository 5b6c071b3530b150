"""Compare a predicted query with the gold one: results, text, names, features.

Results are compared as multisets of rows (order only when the gold query has a top-level ORDER
BY), allowing the columns to come in another order, as test-suite accuracy does: a user who
asked for name and age gets the same answer either way. Floats are rounded to 6 places, so
AVG's 2.0 equals SUM's 2. Exact match comes raw (trimmed) and normalised by sqlglot: keyword
case, whitespace, quoting, identifier case (SQLite's identifiers ignore case), table aliases
(T1/T2 replaced by the table names when that is unambiguous) and the order of AND-ed conditions.
"""

from __future__ import annotations

import re
from typing import Any

from sqlglot import exp

from sqltune.sql.results import is_ordered as is_ordered  # re-exported: the evaluator's one comparison
from sqltune.sql.results import same_result as same_result
from sqltune.sql.schema import DIALECT, Schema

_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)
_WIKISQL_TABLE = re.compile(r"^table_(name_)?\d+(_\d+)?$", re.IGNORECASE)
AGGREGATES = (exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max)


def strip_sql(sql: str) -> str:
    return sql.strip().rstrip(";").strip()


def exact_match_raw(gold: str, pred: str) -> bool:
    return strip_sql(gold) == strip_sql(pred)


def normalise(expression: exp.Expression, *, copy: bool = True) -> str:
    """A canonical text for exact match after normalisation (copy=False rewrites in place)."""
    tree = expression.copy() if copy else expression
    wheres = []
    for node in tree.walk():
        if isinstance(node, exp.Identifier):
            node.set("this", node.name.lower())
            node.set("quoted", False)
        elif isinstance(node, exp.Where):
            wheres.append(node)
    _drop_aliases(tree)
    for where in wheres:
        conjuncts = list(where.this.flatten()) if isinstance(where.this, exp.And) else [where.this]
        if len(conjuncts) > 1:
            ordered = sorted(conjuncts, key=lambda c: c.sql(dialect=DIALECT))
            where.set("this", exp.and_(*ordered, copy=False))
    return " ".join(tree.sql(dialect=DIALECT).split())


def _drop_aliases(tree: exp.Expression) -> None:
    """Replace table aliases by table names when every alias names one table and every table
    has one alias (a self-join or reused alias keeps its aliases: renaming would be unsafe)."""
    by_alias: dict[str, set[str]] = {}
    by_table: dict[str, set[str]] = {}
    for t in tree.find_all(exp.Table):
        if t.alias:
            by_alias.setdefault(t.alias, set()).add(t.name)
            by_table.setdefault(t.name, set()).add(t.alias)
    if any(len(v) > 1 for v in (*by_alias.values(), *by_table.values())):
        return
    if set(by_alias) & {t.name for t in tree.find_all(exp.Table)} - set(by_table):
        return
    mapping = {alias: next(iter(names)) for alias, names in by_alias.items()}
    for t in tree.find_all(exp.Table):
        if t.alias:
            t.set("alias", None)
    for col in tree.find_all(exp.Column):
        if col.table in mapping:
            col.set("table", exp.to_identifier(mapping[col.table]))
    tables = {t.name for t in tree.find_all(exp.Table)}
    if len(tables) == 1 and not tree.find(exp.Subquery):
        for col in tree.find_all(exp.Column):
            col.set("table", None)


def exact_match_norm(gold: exp.Expression | None, pred: exp.Expression | None, *, gold_sql: str = "",
                     pred_sql: str = "", copy: bool = True) -> bool:
    if gold_sql and " ".join(strip_sql(gold_sql).split()) == " ".join(strip_sql(pred_sql).split()):
        return True  # the same text normalises to the same text
    if gold is None or pred is None:
        return False
    return normalise(gold, copy=copy) == normalise(pred, copy=copy)


_CONDITIONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Like, exp.ILike, exp.In, exp.Between, exp.Is)


def features(expression: exp.Expression | None, sql: str = "") -> dict[str, Any]:
    """What kind of query the gold is, for the breakdown (one walk over the tree)."""
    if expression is None:
        return {"aggregate": False, "where_conditions": 0, "group_by": False, "order_by": bool(_ORDER_BY.search(sql)),
                "join": bool(re.search(r"\bjoin\b", sql, re.I)), "nested": sql.lower().count("select") > 1}
    found = {"aggregate": False, "where_conditions": 0, "group_by": False, "order_by": False, "join": False,
             "nested": isinstance(expression, exp.SetOperation)}
    for node in expression.walk():
        if isinstance(node, AGGREGATES):
            found["aggregate"] = True
        elif isinstance(node, exp.Group):
            found["group_by"] = True
        elif isinstance(node, exp.Order):
            found["order_by"] = True
        elif isinstance(node, exp.Join):
            found["join"] = True
        elif isinstance(node, exp.Select) and node is not expression:
            found["nested"] = True
        elif isinstance(node, _CONDITIONS) and node.find_ancestor(exp.Where) is not None:
            found["where_conditions"] += 1
    return found


def categories(feats: dict[str, Any]) -> list[str]:
    """The breakdown rows an example counts in (one example can be in several)."""
    cats = [name for name in ("aggregate", "group_by", "order_by", "join", "nested") if feats[name]]
    n = feats["where_conditions"]
    cats.append(f"where={n}" if n < 3 else "where=3+")
    if not any(feats[k] for k in ("aggregate", "group_by", "order_by", "join", "nested")):
        cats.append("plain_select")
    return cats


def source_of(schema: Schema) -> str:
    """wikisql_like (one generic `table_name_N` table) or spider_like (named, often several tables)."""
    if len(schema.tables) == 1 and _WIKISQL_TABLE.match(schema.tables[0].name):
        return "wikisql_like"
    return "spider_like"
