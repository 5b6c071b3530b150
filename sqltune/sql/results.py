"""Whether two queries' results are the same answer: the one comparison behind execution accuracy and
behind choosing among candidate answers (sqltune.sql.vote).

Rows are compared as multisets (in order only when asked: the gold query has a top-level ORDER BY),
allowing the columns to come in another order, as test-suite accuracy does: a user who asked for
name and age gets the same answer either way. Floats are rounded to 6 places, so AVG's 2.0 equals
SUM's 2.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sqlglot import exp

Row = tuple[Any, ...]
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)
PERMUTATION_CAP = 720


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        rounded = round(value, 6)
        return int(rounded) if rounded.is_integer() else rounded
    return value


def _normal(rows: Sequence[Row]) -> list[Row]:
    return [tuple(_cell(v) for v in row) for row in rows]


def _column_orders(gold: list[Row], pred: list[Row], width: int) -> list[tuple[int, ...]]:
    """Orders of the predicted columns under which each matches a gold column's values."""
    if not gold:
        return [tuple(range(width))]
    gold_cols = [Counter(r[j] for r in gold) for j in range(width)]
    pred_cols = [Counter(r[i] for r in pred) for i in range(width)]
    candidates = [[i for i in range(width) if pred_cols[i] == gold_cols[j]] for j in range(width)]
    orders = []
    for order in itertools.product(*candidates):
        if len(set(order)) == width:
            orders.append(order)
            if len(orders) >= PERMUTATION_CAP:
                break
    return orders


def same_result(gold: Sequence[Row], pred: Sequence[Row], *, gold_width: int, pred_width: int,
                ordered: bool) -> bool:
    """True when the predicted rows equal the gold rows (as a multiset unless `ordered`)."""
    if gold_width != pred_width or len(gold) != len(pred):
        return False
    g, p = _normal(gold), _normal(pred)
    for order in _column_orders(g, p, gold_width):
        moved = [tuple(row[i] for i in order) for row in p]
        if (moved == g) if ordered else (Counter(moved) == Counter(g)):
            return True
    return False


def is_ordered(gold_sql: str, gold: exp.Expression | None) -> bool:
    """Order matters only when the gold query's outermost statement has ORDER BY."""
    if gold is None:
        return bool(_ORDER_BY.search(gold_sql))
    return bool(gold.args.get("order"))
