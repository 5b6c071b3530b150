"""A real database's schema as the CREATE TABLE context the model was trained on.

    schema = introspect(db)                                   # SQLAlchemy's inspector: tables, views, keys
    chosen = select_tables(schema, "How many orders shipped in May?", fits=lambda ctx: len(ctx) < 6000)
    chosen.context   # "CREATE TABLE orders (id INTEGER, ..., PRIMARY KEY (id), FOREIGN KEY (customer_id) ..."

Types are written in the small vocabulary of sql-create-context (INTEGER, REAL, VARCHAR, ...), not
the server's spelling (`character varying(50)`, `timestamp without time zone`), so the model sees
the words it learnt. When the whole schema does not fit the model's context, the tables whose
names and columns the question mentions come first, then their foreign-key neighbours (the
tables a join needs), as long as they fit; the rest are left out and listed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqltune.errors import SqltuneError
from sqltune.sql.schema import MAX_COLUMNS, MAX_TABLES, Column, Link, Schema, Table

_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# words that cannot stand bare as a table or column name in a CREATE TABLE the model reads
_RESERVED = frozenset("""all and any as asc between by case check column constraint create default delete desc distinct
drop else end except exists foreign from full group having in index inner insert intersect into is join key left
like limit not null offset on or order outer primary references right select set table then to union unique update
user using values when where with""".split())


def quote(name: str) -> str:
    if _BARE.match(name) and name.lower() not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class ForeignKey:
    columns: tuple[str, ...]
    table: str
    ref_columns: tuple[str, ...]


@dataclass(frozen=True)
class DbTable:
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()
    foreign_keys: tuple[ForeignKey, ...] = ()
    view: bool = False

    def ddl(self, keys: bool = True) -> str:
        parts = [f"{quote(c.name)} {c.type}" for c in self.columns]
        if not keys:
            return f"CREATE TABLE {quote(self.name)} ({', '.join(parts)})"
        if self.primary_key:
            parts.append(f"PRIMARY KEY ({', '.join(map(quote, self.primary_key))})")
        parts += [f"FOREIGN KEY ({', '.join(map(quote, fk.columns))}) REFERENCES {quote(fk.table)} "
                  f"({', '.join(map(quote, fk.ref_columns))})" for fk in self.foreign_keys]
        return f"CREATE TABLE {quote(self.name)} ({', '.join(parts)})"


@dataclass(frozen=True)
class DbSchema:
    tables: tuple[DbTable, ...]
    name: str = ""  # the PostgreSQL schema, "" for SQLite
    keys: bool = True  # primary and foreign keys in the context

    def table(self, name: str) -> DbTable | None:
        return next((t for t in self.tables if t.name.lower() == name.lower()), None)

    def context(self, names: Sequence[str] | None = None) -> str:
        wanted = None if names is None else {n.lower() for n in names}
        return "; ".join(t.ddl(self.keys) for t in self.tables if wanted is None or t.name.lower() in wanted)

    def to_schema(self) -> Schema:
        """The tables as sqltune.sql's Schema (what the SQL checker and parser read)."""
        links = tuple(Link(t.name, fk.columns, fk.table, fk.ref_columns) for t in self.tables for fk in t.foreign_keys)
        return Schema(tuple(Table(t.name, t.columns) for t in self.tables), links)

    def neighbours(self, name: str) -> list[str]:
        """Tables one foreign key away from `name`, in either direction."""
        out = [fk.table for fk in (self.table(name) or DbTable(name, ())).foreign_keys]
        out += [t.name for t in self.tables if any(fk.table.lower() == name.lower() for fk in t.foreign_keys)]
        return list(dict.fromkeys(n for n in out if n.lower() != name.lower() and self.table(n)))


def model_type(sa_type: Any) -> str:
    """A SQLAlchemy column type in sql-create-context's vocabulary."""
    import sqlalchemy.types as T

    for kind, word in ((T.Boolean, "BOOLEAN"), (T.Integer, "INTEGER"), (T.Numeric, "REAL"), (T.Float, "REAL"), (T.DateTime, "DATETIME"),
                       (T.Date, "DATE"), (T.Time, "TIME"), (T.LargeBinary, "BLOB"), (T.Text, "TEXT"),
                       (T.String, "VARCHAR"), (T.Enum, "VARCHAR")):
        if isinstance(sa_type, kind):
            return word
    return "VARCHAR"


def introspect(db: Any, *, keys: bool = True) -> DbSchema:
    """Tables and views of the database (its PostgreSQL schema), with primary and foreign keys (written
    into the context when `keys`; always used to pick foreign-key neighbours)."""
    import sqlalchemy as sa
    from sqlalchemy.engine.reflection import ObjectKind

    schema = db.schema or None
    try:
        insp = sa.inspect(db.engine)
        views = set(insp.get_view_names(schema=schema))
        # one catalog query per kind of fact for all tables (per-table calls took ~20 s for 250 tables)
        columns_of = insp.get_multi_columns(schema=schema, kind=ObjectKind.ANY)
        if len(columns_of) > MAX_TABLES:
            raise SqltuneError(f"{db.display} has {len(columns_of)} tables and views; sqltune reads at most "
                               f"{MAX_TABLES}", "point --db-schema at a schema with fewer tables")
        pks = insp.get_multi_pk_constraint(schema=schema)
        fks_of = insp.get_multi_foreign_keys(schema=schema)
        tables, total = [], 0
        for key in sorted(columns_of, key=lambda k: (k[1] in views, k[1])):
            name, cols = key[1], columns_of[key]
            total += len(cols)
            if total > MAX_COLUMNS:
                raise SqltuneError(f"{db.display} has more than {MAX_COLUMNS} columns; sqltune reads at most that",
                                   "point --db-schema at a smaller schema")
            columns = tuple(Column(c["name"], model_type(c["type"]), not c.get("nullable", True)) for c in cols)
            pk = tuple((pks.get(key) or {}).get("constrained_columns") or ())
            fks = tuple(ForeignKey(tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]))
                        for fk in fks_of.get(key) or () if fk.get("referred_table"))
            tables.append(DbTable(name, columns, pk, fks, name in views))
    except sa.exc.DBAPIError as e:
        raise SqltuneError(f"cannot read the schema of {db.display}: {str(e.orig).strip().splitlines()[0]}",
                           "connect as a user that may read the catalog and the tables") from None
    if not tables:
        where = f"schema {db.schema} of {db.display}" if db.schema else db.display
        raise SqltuneError(f"{where} has no tables or views", "point --database (and --db-schema) at your data")
    return DbSchema(tuple(tables), db.schema, keys)


def _stems(text: str) -> set[str]:
    """Lower-case word stems of a question or a name (snake_case and CamelCase split; plurals folded)."""
    words = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", text.replace("_", " "))
    out = set()
    for w in (w.lower() for w in words):
        if len(w) < 2:
            continue
        if w.endswith("ies") and len(w) > 4:
            w = w[:-3] + "y"
        elif w.endswith("s") and not w.endswith("ss") and len(w) > 3:
            w = w[:-1]
        out.add(w)
    return out


@dataclass(frozen=True)
class Selection:
    context: str
    tables: list[str]
    left_out: list[str] = field(default_factory=list)
    how: str = "all tables"
    kept_for_gold: int = 0  # training rows only: tables added because the gold SQL reads them

    def to_dict(self) -> dict[str, Any]:
        return {"tables": self.tables, "left_out": self.left_out, "how": self.how}


def relevance(table: DbTable, question: set[str]) -> float:
    """Up to 4 for the words of the table's name in the question (all of them: 4), 1 per column whose
    name shares a word with it: `orders` ranks above `order_items` for "How many orders ...?"."""
    name = _stems(table.name)
    score = 4.0 * len(name & question) / max(1, len(name))
    return score + sum(1 for c in table.columns if _stems(c.name) & question)



def select_tables(schema: DbSchema, question: str, fits: Callable[[str], bool]) -> Selection:
    """Every table when they fit; else the question's tables by relevance, then their foreign-key
    neighbours, while the context still fits; the rest are listed in `left_out`."""
    everything = schema.context()
    if fits(everything):
        return Selection(everything, [t.name for t in schema.tables])
    words = _stems(question)
    scored = sorted(((relevance(t, words), i, t.name) for i, t in enumerate(schema.tables)), key=lambda s: (-s[0], s[1]))
    chosen: list[str] = []

    def add(name: str) -> None:
        if name not in chosen and fits(schema.context([*chosen, name])):
            chosen.append(name)

    for score, _, name in scored:
        if score > 0:
            add(name)
    matched = list(chosen)
    for name in matched:
        for other in schema.neighbours(name):
            add(other)
    how = "tables the question names (by table and column names), then their foreign-key neighbours"
    if not chosen:
        how = "no table matched the question's words: the first tables that fit"
        for t in schema.tables:
            add(t.name)
    if not chosen:
        raise SqltuneError(f"not even one table of {len(schema.tables)} fits the model's context "
                           f"(the smallest: {min(len(t.ddl(schema.keys)) for t in schema.tables)} characters)",
                           "raise --db-context-chars, or use a model with a longer context")
    order = {t.name: i for i, t in enumerate(schema.tables)}
    chosen.sort(key=order.__getitem__)
    left = [t.name for t in schema.tables if t.name not in chosen]
    return Selection(schema.context(chosen), chosen, left, how)


def tables_read(sql: str, schema: DbSchema) -> list[str]:
    """The schema's tables a query reads (by name, any case), in schema order; [] when it does not parse."""
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except Exception:  # sqlglot raises several types for unreadable SQL; all mean "no tables known"
        return []
    names = {t.name.lower() for t in tree.find_all(exp.Table)} if tree is not None else set()
    return [t.name for t in schema.tables if t.name.lower() in names]


def context_for(schema: DbSchema, question: str, chars: int, *, gold: str = "",
                fits: Callable[[str], bool] | None = None) -> Selection:
    """The one context of (schema, question, budget) that training, evaluation, `ask` and serve build: the whole
    schema when it fits in `chars` characters (and `fits`, a model's own token room), else `select_tables`.
    A training row passes its `gold` SQL: a table the gold reads that the selection left out is kept (the row
    teaches the model to use the table it needs; dropping the row instead would leave every large database's
    hardest questions out of training), counted in `kept_for_gold`."""
    within = (lambda c: len(c) <= chars) if fits is None else (lambda c: len(c) <= chars and fits(c))
    chosen = select_tables(schema, question, within)
    if not gold or not chosen.left_out:
        return chosen
    missing = [t for t in tables_read(gold, schema) if t not in chosen.tables]
    if not missing:
        return chosen
    names = [t.name for t in schema.tables if t.name in chosen.tables or t.name in missing]
    return Selection(schema.context(names), names, [t for t in chosen.left_out if t not in missing],
                     chosen.how + "; the tables the gold SQL reads", kept_for_gold=len(missing))
