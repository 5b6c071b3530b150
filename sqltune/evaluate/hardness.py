"""Spider's hardness levels of a gold query: easy, medium, hard, extra (Yu et al. 2018, section 3.3).

    hardness("SELECT count(*) FROM singer")                     # "easy"

The published rule counts three things of the main query: components (WHERE, GROUP BY, ORDER BY,
LIMIT, each join, each OR, each LIKE), nested queries (subqueries in FROM / WHERE / HAVING, and the
second query of UNION / INTERSECT / EXCEPT), and "others" (more than one aggregate, more than one
selected column, more than one WHERE condition, more than one GROUP BY column). The thresholds below
are Spider's; the counting reads sqlglot's tree instead of Spider's own parse, so a few queries that
the two parse differently can land one level apart.
"""

from __future__ import annotations

from typing import Any

LEVELS = ("easy", "medium", "hard", "extra")


def _own(main: Any, node: Any, kind: Any) -> list[Any]:
    """Nodes of `kind` under `node` that belong to `main` itself, not to a query nested in it."""
    from sqlglot import exp

    if node is None:
        return []
    return [n for n in node.find_all(kind) if n.find_ancestor(exp.Select) is main]


def counts(sql: str) -> tuple[int, int, int] | None:
    """(components, nested queries, others) of the main query, or None when it does not parse."""
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except Exception:  # sqlglot raises several types for unreadable SQL; all mean "no level"
        return None
    nested = 0
    while isinstance(tree, (exp.Union, exp.Intersect, exp.Except)):
        nested += 1
        tree = tree.left
    if isinstance(tree, exp.Subquery):
        tree = tree.this
    if not isinstance(tree, exp.Select):
        return None
    main = tree
    where, having = main.args.get("where"), main.args.get("having")
    joins = main.args.get("joins") or []
    conds = [where, having, *(j.args.get("on") for j in joins)]
    components = sum(1 for k in ("where", "group", "order", "limit") if main.args.get(k) is not None)
    components += len(joins)
    components += sum(len(_own(main, c, exp.Or)) + len(_own(main, c, exp.Like)) for c in conds)
    nested += sum(1 for s in main.find_all(exp.Select) if s is not main and s.parent_select is main)
    aggregates = sum(len(_own(main, part, exp.AggFunc)) for part in (
        *main.expressions, where, main.args.get("group"), main.args.get("order"), having))
    group = main.args.get("group")
    where_conditions = 1 + len(_own(main, where, exp.And)) + len(_own(main, where, exp.Or)) if where is not None else 0
    others = sum((aggregates > 1, len(main.expressions) > 1, where_conditions > 1,
                  group is not None and len(group.expressions) > 1))
    return components, nested, others


def hardness(sql: str) -> str:
    """easy / medium / hard / extra by Spider's rule; "unknown" when the query does not parse."""
    found = counts(sql)
    if found is None:
        return "unknown"
    c1, c2, others = found
    if c1 <= 1 and others == 0 and c2 == 0:
        return "easy"
    if (others <= 2 and c1 <= 1 and c2 == 0) or (c1 <= 2 and others < 2 and c2 == 0):
        return "medium"
    if (others > 2 and c1 <= 2 and c2 == 0) or (2 < c1 <= 3 and others <= 2 and c2 == 0) or \
            (c1 <= 1 and others == 0 and c2 <= 1):
        return "hard"
    return "extra"
