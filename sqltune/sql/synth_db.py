"""Small seeded databases on which a gold query selects something.

    plan = make_plan(schema, parsed_gold.expression, question)
    rows = synthesise(plan, seed=7)            # {"head": [(69, "Ann"), ...], ...}

Test-suite accuracy (Zhong et al., 2020) runs gold and predicted SQL on several databases and
counts a match only if they agree on all of them. Random rows rarely satisfy `name = "Ann" AND
age > 60`, so every condition of the gold query is turned into values that satisfy it (the
literal, just past a bound, a string matching a LIKE) and values that just miss it (neighbours:
69 -> 68, 70; "1,019" -> "1,018"; "ann" -> "Ann"). Row 0 of each table satisfies all of its
conditions; the other rows mix hits, near misses, question words, small domains (so DISTINCT
and GROUP BY see duplicates) and NULLs (so COUNT(*) and COUNT(col) differ). Columns joined in
the gold query, or sharing a name across tables, draw from one small key pool so joins match.
Values are stored as the column's affinity wants: numbers in numeric columns, text in text ones.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from sqlglot import exp

from sqltune.errors import DataError
from sqltune.sql.schema import Column, Schema, column_of, table_scope

Value = Any  # str | int | float | None
_NUM = re.compile(r"-?\d[\d,]*(\.\d+)?")
_QUOTED = re.compile(r"['\"]([^'\"]{1,40})['\"]")
_WORD = re.compile(r"[A-Za-z][\w'.-]{2,}")
_OPS = {exp.EQ: "eq", exp.NEQ: "neq", exp.GT: "gt", exp.GTE: "gte", exp.LT: "lt", exp.LTE: "lte",
        exp.Like: "like", exp.ILike: "like"}
_FLIP = {"gt": "lt", "gte": "lte", "lt": "gt", "lte": "gte"}
# Planning and filling a database are linear in the schema (256 tables x 16 columns: ~0.2 s); these
# caps stop a schema far past that before it holds a run slot or an eval row for long
PLAN_BUDGET_S = 2.0
SYNTH_BUDGET_S = 3.0


class SynthesisTooSlow(DataError):
    """The schema is too large to plan or fill a database for within the time cap."""


def _check_budget(started: float, budget_s: float, what: str) -> None:
    if time.perf_counter() - started > budget_s:
        raise SynthesisTooSlow(f"the schema is too large to synthesise a database for: {what} took over "
                               f"{budget_s:g}s", "give fewer tables or columns (only those the query needs)")


@dataclass(frozen=True)
class Condition:
    table: str
    column: str
    op: str  # eq neq gt gte lt lte like in between null notnull
    values: tuple[Value, ...] = ()


@dataclass
class Plan:
    """What the gold query needs of a database; built once per example, reused for every seed."""

    schema: Schema
    conditions: dict[tuple[str, str], list[Condition]] = field(default_factory=dict)
    key_class: dict[tuple[str, str], int] = field(default_factory=dict)  # (table, col) -> join class
    class_literals: dict[int, list[Value]] = field(default_factory=dict)
    numbers: list[int | float] = field(default_factory=list)  # from the question and the gold
    words: list[str] = field(default_factory=list)        # from the question
    group_sizes: list[int] = field(default_factory=list)  # N of HAVING COUNT(...) <op> N


def _literal(node: exp.Expression) -> Value | None:
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal) and not node.this.is_string:
        return _number(f"-{node.this.this}")
    if isinstance(node, exp.Literal):
        return str(node.this) if node.is_string else _number(str(node.this))
    if isinstance(node, exp.Null):
        return None
    return None


def _number(text: str) -> int | float | str:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def make_plan(schema: Schema, gold: exp.Expression | None, question: str,
              budget_s: float = PLAN_BUDGET_S) -> Plan:
    """What `gold` needs of a database over `schema`: linear in the schema (one pass links same-named
    columns), and a DataError past `budget_s` rather than minutes on a schema no query needs."""
    started = time.perf_counter()
    plan = Plan(schema)
    keys: dict[tuple[str, str], tuple[str, str]] = {}  # union-find over (table, column)

    def find(k: tuple[str, str]) -> tuple[str, str]:
        root = k
        while keys.get(root, root) != root:
            root = keys[root]
        while k != root:  # path compression: a chain of 256 tables stays one hop deep
            keys[k], k = root, keys[k]
        return root

    def union(a: tuple[str, str], b: tuple[str, str]) -> None:
        keys.setdefault(a, a)
        keys.setdefault(b, b)
        keys[find(a)] = find(b)

    # same-named columns across tables are join keys: each links to the first table that has the name
    # (linking every pair took 14 s on 256 tables x 16 shared names)
    first: dict[str, tuple[str, str]] = {}
    for t in schema.tables:
        _check_budget(started, budget_s, "reading the schema")
        for c in t.columns:
            key = (t.name, c.name.lower())
            if c.name.lower() in first and first[c.name.lower()][0] != t.name:
                union(key, first[c.name.lower()])
            first.setdefault(c.name.lower(), key)
    if gold is not None:
        scope = table_scope(gold)
        for cond in _conditions(gold, scope, schema):
            plan.conditions.setdefault((cond.table, cond.column.lower()), []).append(cond)
        for eq in gold.find_all(exp.EQ):
            if isinstance(eq.this, exp.Column) and isinstance(eq.expression, exp.Column):
                a, b = column_of(eq.this, scope, schema), column_of(eq.expression, scope, schema)
                if a and b and a[0] != b[0]:
                    union((a[0], a[1].lower()), (b[0], b[1].lower()))
        plan.numbers += [v for v in (_literal(n) for n in gold.find_all(exp.Literal))
                         if isinstance(v, (int, float))]
    roots = {r: i for i, r in enumerate(sorted({find(k) for k in keys}))}
    for k in keys:
        plan.key_class[k] = roots[find(k)]
    for (table, column), conds in plan.conditions.items():
        if (table, column) in plan.key_class:
            cls = plan.key_class[(table, column)]
            plan.class_literals.setdefault(cls, []).extend(
                v for c in conds if c.op == "eq" for v in c.values)
    found = (_number(m.group().replace(",", "")) for m in _NUM.finditer(question))
    plan.numbers += [v for v in found if isinstance(v, (int, float))][:6]
    quoted = [m.group(1) for m in _QUOTED.finditer(question)]
    plan.words = quoted + [w for w in _WORD.findall(question) if w[0].isupper()][:6]
    if gold is not None:
        for having in gold.find_all(exp.Having):
            for cmp in having.find_all(exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE):
                n = _literal(cmp.expression)
                if isinstance(cmp.this, exp.Count) and isinstance(n, int) and 0 < n < 8:
                    plan.group_sizes.append(n)
    return plan


def _conditions(gold: exp.Expression, scope: dict[str, str], schema: Schema) -> list[Condition]:
    out = []
    for node in gold.find_all(*_OPS, exp.In, exp.Between, exp.Is):
        col = node.this
        op = _OPS.get(type(node))
        other = node.args.get("expression")
        if op and not isinstance(col, exp.Column) and isinstance(other, exp.Column):
            col, other, op = other, col, _FLIP.get(op, op)
        if not isinstance(col, exp.Column):
            continue
        ref = column_of(col, scope, schema)
        if ref is None:
            continue
        if isinstance(node, exp.In):
            values = tuple(v for v in map(_literal, node.expressions) if v is not None)
            cond = Condition(*ref, "in", values) if values else None
        elif isinstance(node, exp.Between):
            low, high = _literal(node.args["low"]), _literal(node.args["high"])
            cond = Condition(*ref, "between", (low, high)) if low is not None and high is not None else None
        elif isinstance(node, exp.Is):
            negated = isinstance(node.parent, exp.Not)
            cond = Condition(*ref, "notnull" if negated else "null")
        else:
            value = _literal(other) if other is not None else None
            cond = Condition(*ref, op, (value,)) if value is not None else None
        if cond is not None:
            out.append(cond)
    return out


def _shift(value: Value, delta: float) -> Value:
    """`value` moved by `delta`, written the way it was written ("1,019" -> "1,020", "78%" -> "79%")."""
    if isinstance(value, (int, float)):
        return value + delta if isinstance(value, float) else int(value + delta)
    text = str(value)
    m = _NUM.search(text)
    if not m:
        return text + ("x" if delta > 0 else "")
    raw = m.group()
    num = _number(raw.replace(",", ""))
    if not isinstance(num, (int, float)):
        return text
    moved = num + delta if isinstance(num, float) else int(num + delta)
    shown = f"{moved:,}" if "," in raw else str(moved)
    return text[: m.start()] + shown + text[m.end():]


def _variants(value: Value) -> list[Value]:
    """Near misses of a literal: numeric neighbours, or other spellings of a string."""
    if isinstance(value, (int, float)) or (isinstance(value, str) and _NUM.search(value)):
        return [_shift(value, -1), _shift(value, 1), _shift(value, 10)]
    text = str(value)
    other_case = text.title() if text != text.title() else text.lower()
    return [other_case, text + " jr", text[: max(1, len(text) // 2)]]


def _fill_like(pattern: str, rng: random.Random) -> str:
    out = []
    for ch in pattern:
        out.append(rng.choice(["", "ab", "zx"]) if ch == "%" else rng.choice("aeiou") if ch == "_" else ch)
    return "".join(out)


def _hits(cond: Condition, column: Column, rng: random.Random) -> list[Value]:
    v = cond.values
    if cond.op == "eq":
        return [v[0]]
    if cond.op == "neq":
        return _variants(v[0])
    if cond.op in ("gt", "gte", "lt", "lte"):
        up = cond.op in ("gt", "gte")
        text = str(v[0])
        # a text column compares as text ("9" > "10"), so add candidates that win that way too
        extra = [text + "0", "9" * len(text)] if up else ["0", text[:-1] or "0"]
        candidates = [_shift(v[0], 1 if up else -1), _shift(v[0], 7 if up else -7), *extra]
        if cond.op in ("gte", "lte"):
            candidates.append(v[0])
        held = [c for c in candidates if _holds(_store(c, column), cond.op, v[0], column)]
        return held or candidates
    if cond.op == "like":
        return [_fill_like(str(v[0]), rng)]
    if cond.op in ("in", "between"):
        return list(v)
    if cond.op == "null":
        return [None]
    return []


def _holds(stored: Value, op: str, literal: Value, column: Column) -> bool:
    """Whether SQLite would find `stored <op> literal` true, applying the column's affinity."""
    if stored is None:
        return False
    lit = _store(literal, column)
    if isinstance(stored, str) != isinstance(lit, str):
        return False
    try:
        return {"gt": stored > lit, "gte": stored >= lit, "lt": stored < lit, "lte": stored <= lit}[op]
    except TypeError:
        return False


def _misses(cond: Condition, column: Column) -> list[Value]:
    """Values that just fail the condition: the bound itself for < and >, a neighbour for =."""
    v = cond.values
    if cond.op in ("null", "notnull") or not v:
        return []
    if cond.op == "neq":
        return [v[0]]
    if cond.op in ("gt", "gte", "lt", "lte"):
        candidates = [v[0], _shift(v[0], 1), _shift(v[0], -1), _shift(v[0], 10), _shift(v[0], -10)]
        return [c for c in candidates if not _holds(_store(c, column), cond.op, v[0], column)]
    return [m for value in v for m in _variants(value)]


def _store(value: Value, column: Column) -> Value:
    """The value as the column's affinity keeps it."""
    if value is None:
        return None
    if column.numeric:
        if isinstance(value, str):
            num = _number(value.replace(",", ""))
            return num if isinstance(num, (int, float)) else value
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def synthesise(plan: Plan, seed: int, *, plant: bool = True,
               budget_s: float = SYNTH_BUDGET_S) -> dict[str, list[tuple[Value, ...]]]:
    """Rows for every table of the plan's schema, deterministic in `seed`.

    With `plant`, each table gets a row that satisfies all of its conditions, a twin of it (an
    exact copy for even seeds, so DISTINCT matters; for odd ones with its free columns redrawn,
    so MIN and MAX differ) and one near miss per constrained column (the planted row with that one
    value changed to just miss), so a query that drops or changes a condition returns more or
    fewer rows. Random rows fill the rest, and the order is shuffled.
    """
    rng = random.Random(seed)
    pools: dict[int, list[Value]] = {}
    for cls in sorted(set(plan.key_class.values())):
        literals = plan.class_literals.get(cls, [])
        # pool size varies by database, so "appears in both tables" and HAVING counts vary too
        size = rng.randint(2, 6)
        pools[cls] = (literals[:1] + rng.sample(range(1, 60), size))[:size]
    data: dict[str, list[tuple[Value, ...]]] = {}
    keyed = [t.name for t in plan.schema.tables for c in t.columns if (t.name, c.name.lower()) in plan.key_class]
    grouped = keyed[0] if keyed else plan.schema.tables[0].name
    started = time.perf_counter()
    for table in plan.schema.tables:
        _check_budget(started, budget_s, "filling its tables")
        domains = {c.name.lower(): _domain(c, plan, rng) for c in table.columns}
        # each table's random rows use part of each key pool, so some keys of one table are missing
        # from another (EXCEPT, NOT IN and LEFT JOIN then have something to find)
        mine = {cls: [pool[0], *rng.sample(pool[1:], rng.randint(min(1, len(pool) - 1), len(pool) - 1))]
                for cls, pool in pools.items()}
        rows = [_row(table.columns, table.name, plan, mine, domains, rng, planted=False) for _ in range(rng.randint(3, 7))]
        # most nullable columns get a NULL somewhere, so COUNT(*) and COUNT(col) disagree on some database
        for i, c in enumerate(table.columns):
            if not c.not_null and rng.random() < 0.8:
                at = rng.randrange(len(rows))
                rows[at] = rows[at][:i] + (None,) + rows[at][i + 1:]
        if plant:
            planted = _row(table.columns, table.name, plan, pools, domains, rng, planted=True)
            free = _row(table.columns, table.name, plan, mine, domains, rng, planted=False)
            # seeds of neighbouring databases differ in parity (score.py steps by an odd number), so
            # the K databases have both kinds of twin
            twin = planted if seed % 2 == 0 else tuple(
                p if plan.conditions.get((table.name, c.name.lower())) or (table.name, c.name.lower()) in plan.key_class
                else f for c, p, f in zip(table.columns, planted, free, strict=True))
            # HAVING COUNT(*) >= N: the planted group gets N-1, N or N+1 rows in the first keyed table and
            # one row elsewhere, while random rows keep off its key, so its size is exactly that
            copies = 2
            if plan.group_sizes:
                copies = 1
                if table.name == grouped:
                    # score.py's seeds for the K databases fall in different residues mod 4, so
                    # the offsets below include an exact N on at least one of any three databases
                    copies = max(1, rng.choice(plan.group_sizes) + (0, 1, 0, -1)[seed % 4])
            other = _row(table.columns, table.name, plan, mine, domains, rng, planted=False)
            nearest = seed % 2 == 0 or rng.random() < 0.5
            misses = _near_misses(table.columns, table.name, plan, planted, other, rng, nearest=nearest)
            rows += [planted, *[twin] * (copies - 1), *misses]
            rng.shuffle(rows)
        data[table.name] = rows
    return data


def _row(columns: tuple[Column, ...], table: str, plan: Plan, pools: dict[int, list[Value]],
         domains: dict[str, list[Value]], rng: random.Random, *, planted: bool) -> tuple[Value, ...]:
    """A planted row (every condition of the query holds, join keys from each class's first value) or a
    random one (conditions hit or missed, join keys from the rest of the class, some NULLs)."""
    row = []
    for c in columns:
        key = (table, c.name.lower())
        conds = plan.conditions.get(key, [])
        if key in plan.key_class:
            pool = pools[plan.key_class[key]]
            # with a HAVING COUNT to test, the planted group's key (pool[0]) is left to the planted rows
            value: Value = pool[0] if planted else rng.choice(pool[1:] if plan.group_sizes and len(pool) > 1 else pool)
        elif conds and planted:
            value = rng.choice(_hits(conds[0], c, rng) or domains[key[1]])
        elif conds and rng.random() < 0.6:
            cond = rng.choice(conds)
            value = rng.choice((_hits(cond, c, rng) if rng.random() < 0.5 else _misses(cond, c)) or domains[key[1]])
        else:
            value = rng.choice(domains[key[1]])
        if not planted and not c.not_null and rng.random() < 0.1:
            value = None
        row.append(_store(value, c))
    return tuple(row)


def _near_misses(columns: tuple[Column, ...], table: str, plan: Plan, planted: tuple[Value, ...],
                 free: tuple[Value, ...], rng: random.Random, *, nearest: bool) -> list[tuple[Value, ...]]:
    """The planted row with one condition broken; free columns from `free`, so what the query
    selects or aggregates differs from the planted row's."""
    bound = [bool(plan.conditions.get((table, c.name.lower()))) or (table, c.name.lower()) in plan.key_class
             for c in columns]
    out = []
    for i, c in enumerate(columns):
        misses = [m for cond in plan.conditions.get((table, c.name.lower()), []) for m in _misses(cond, c)]
        if misses:
            # free values differ from the planted row's and are not NULL, so a query that wrongly
            # keeps this row gets a different SUM, AVG, MAX or list
            row = [p if b else (f if f is not None and f != p else _store(_variants(p)[1], c2) if p is not None else f)
                   for p, f, b, c2 in zip(planted, free, bound, columns, strict=True)]
            # the first miss is the closest (the bound itself), the one an off-by-one query catches
            row[i] = _store(misses[0] if nearest else rng.choice(misses), c)
            out.append(tuple(row))
    return out[:4]


def _domain(column: Column, plan: Plan, rng: random.Random) -> list[Value]:
    """A few values per column, so rows repeat (DISTINCT, GROUP BY) and questions' words appear."""
    if column.numeric:
        values: list[Value] = [rng.randint(0, 30) for _ in range(3)]
        if plan.numbers:
            values.append(rng.choice(plan.numbers))
        if column.affinity == "REAL":
            values = [float(v) + rng.choice([0.0, 0.5]) for v in values]
        return values
    stem = re.sub(r"\W", "", column.name.lower())[:10] or "v"
    values = [f"{stem}{rng.randint(1, 9)}" for _ in range(3)]
    if plan.words:
        values.append(rng.choice(plan.words))
    if plan.numbers:
        values.append(str(_number(str(rng.choice(plan.numbers)))))
    return values
