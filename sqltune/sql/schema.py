"""CREATE TABLE contexts as schemas, and SQL parsed the way SQLite reads it.

    schema = parse_schema("CREATE TABLE head (age INTEGER, name VARCHAR)")
    parsed = parse_sql('SELECT name FROM head WHERE name = "Ann"', schema)   # "Ann" is a string

sql-create-context (WikiSQL and Spider rewritten) quotes strings with double quotes. SQLite reads
a double-quoted token as an identifier when such a column exists and as a string otherwise, so
parsing follows that rule: a bare double-quoted "identifier" that names no column or alias
becomes a string literal. A string such as "73,405" compared with a numeric column becomes the
number, so `attendance = "73,405"` and `attendance = 73405` mean the same on an INTEGER column.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from sqltune.errors import DataError

DIALECT = "sqlite"
# Far above any real text-to-SQL schema (Spider's largest has 26 tables, ~350 columns), far below what
# costs a request more than a few milliseconds to read: the server answers 400 past these.
MAX_TABLES = 256
MAX_COLUMNS = 4096
_NUMBER_TEXT = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$|^-?\d+(\.\d+)?$")


def affinity(type_name: str) -> str:
    """SQLite's column affinity for a declared type (https://sqlite.org/datatype3.html#affname)."""
    t = type_name.upper()
    if "INT" in t:
        return "INTEGER"
    if any(k in t for k in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if not t or "BLOB" in t:
        return "BLOB"
    if any(k in t for k in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


@dataclass(frozen=True)
class Column:
    name: str
    type: str = "VARCHAR"
    not_null: bool = False

    @cached_property
    def affinity(self) -> str:
        return affinity(self.type)

    @cached_property
    def numeric(self) -> bool:
        return self.affinity in ("INTEGER", "REAL", "NUMERIC")


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]

    def column(self, name: str) -> Column | None:
        key = name.lower()
        return next((c for c in self.columns if c.name.lower() == key), None)


@dataclass(frozen=True)
class Link:
    """A foreign key: `table (columns)` references `ref_table (ref_columns)`."""

    table: str
    columns: tuple[str, ...]
    ref_table: str
    ref_columns: tuple[str, ...]


@dataclass(frozen=True)
class Schema:
    tables: tuple[Table, ...]
    links: tuple[Link, ...] = ()  # foreign keys, when the context declares them
    _columns: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_columns", frozenset(c.name.lower() for t in self.tables for c in t.columns))

    def table(self, name: str) -> Table | None:
        key = name.lower()
        return next((t for t in self.tables if t.name.lower() == key), None)

    def has_column(self, name: str) -> bool:
        return name.lower() in self._columns

    def tables_with(self, column: str) -> list[Table]:
        return [t for t in self.tables if t.column(column)]

    def ddl(self) -> list[str]:
        def q(name: str) -> str:
            return '"' + name.replace('"', '""') + '"'

        return [f"CREATE TABLE {q(t.name)} ({', '.join(f'{q(c.name)} {c.type}' for c in t.columns)})"
                for t in self.tables]


def parse_schema(context: str) -> Schema:
    """Tables and columns of a `CREATE TABLE ...; CREATE TABLE ...` context. A table created
    twice (it happens in sql-create-context) gets the union of its columns. At most MAX_TABLES
    tables and MAX_COLUMNS columns, so the work one context can cause stays small.

    One parse at a time: the work holds the GIL (sqlglot's tokenizer for up to ~40 ms of a
    256-table context), so threads gain nothing by parsing side by side, while a context that
    several requests send at once (the playground's Run, pressed again) is parsed once and the
    waiting threads leave the event loop free."""
    with _PARSE_ONE_AT_A_TIME:
        return _parse_schema(context)


_PARSE_ONE_AT_A_TIME = threading.RLock()


@lru_cache(maxsize=8192)
def _parse_schema(context: str) -> Schema:
    # a cheap upper bound before the parse: every column after a table's first follows a comma
    if context.count(",") + 1 > MAX_COLUMNS * 2:
        raise _too_big(f"context has {context.count(',') + 1} comma-separated items")
    try:
        statements = [s for s in sqlglot.parse(context, read=DIALECT) if s is not None]
    except SqlglotError as e:
        raise DataError(f"context is not valid CREATE TABLE SQL: {_first_line(e)}",
                        "give each example a context of CREATE TABLE statements") from None
    except RecursionError:  # sqlglot's parser recurses once per nesting level
        raise DataError("context is nested too deeply to read (parentheses inside parentheses)",
                        "give plain CREATE TABLE statements") from None
    except ValueError as e:  # sqlglot's tokenizer on odd literals
        raise DataError(f"context is not valid CREATE TABLE SQL: {_first_line(e)}",
                        "give each example a context of CREATE TABLE statements") from None
    if len(statements) > MAX_TABLES:
        raise _too_big(f"context has {len(statements)} statements")
    merged: dict[str, tuple[str, list[Column], set[str]]] = {}
    links: list[Link] = []
    total = 0
    for st in statements:
        if not isinstance(st, exp.Create) or not isinstance(st.this, exp.Schema):
            raise DataError(f"context statement is not CREATE TABLE: {st.sql(DIALECT)[:80]}",
                            "give each example a context of CREATE TABLE statements")
        name = st.this.this.name
        _, cols, seen = merged.setdefault(name.lower(), (name, [], set()))
        for coldef in st.this.expressions:
            links += _links(name, coldef)
            # a set, not a scan of the list: 8000 columns took 21 s of the event loop with the scan
            if not isinstance(coldef, exp.ColumnDef) or coldef.name.lower() in seen:
                continue
            seen.add(coldef.name.lower())
            total += 1
            if total > MAX_COLUMNS:
                raise _too_big(f"context has more than {MAX_COLUMNS} columns")
            kind = coldef.args.get("kind")
            constraints = [c.args.get("kind") for c in coldef.args.get("constraints") or []]
            not_null = any(isinstance(k, (exp.NotNullColumnConstraint, exp.PrimaryKeyColumnConstraint))
                           and not (isinstance(k, exp.NotNullColumnConstraint) and k.args.get("allow_null"))
                           for k in constraints)
            cols.append(Column(coldef.name, kind.sql() if kind else "", not_null))  # declared name, e.g. VARCHAR
    if not merged:
        raise DataError("context has no CREATE TABLE statement", "give each example its CREATE TABLE context")
    return Schema(tuple(Table(name, tuple(cols)) for name, cols, _ in merged.values()), tuple(dict.fromkeys(links)))


def _links(table: str, item: exp.Expression) -> list[Link]:
    """The foreign keys one item of a CREATE TABLE declares: `FOREIGN KEY (a) REFERENCES t (b)`, or a
    column's own `REFERENCES t (b)`."""
    if isinstance(item, exp.ForeignKey):
        columns, reference = tuple(i.name for i in item.expressions), item.args.get("reference")
    elif isinstance(item, exp.ColumnDef):
        kinds = [c.args.get("kind") for c in item.args.get("constraints") or []]
        reference = next((k for k in kinds if isinstance(k, exp.Reference)), None)
        columns = (item.name,)
    else:
        return []
    target = reference.this if reference is not None else None
    if isinstance(target, exp.Schema) and isinstance(target.this, exp.Table):
        refs = tuple(i.name for i in target.expressions)
        if len(refs) == len(columns):
            return [Link(table, columns, target.this.name, refs)]
    return []


def _too_big(what: str) -> DataError:
    return DataError(f"{what}; at most {MAX_TABLES} tables and {MAX_COLUMNS} columns are read",
                     "send only the tables the question is about")


@dataclass(frozen=True)
class Parsed:
    """A statement parsed for scoring; `error` says why it is not, never None-as-failure."""

    ok: bool
    expression: exp.Expression | None = None
    error: str = ""
    rewritten: bool = False  # literals were changed, so execute expression.sql() not the raw text

    def sql(self, raw: str) -> str:
        if self.rewritten and self.expression is not None:
            return self.expression.sql(dialect=DIALECT)
        return raw


def parse_sql(sql: str, schema: Schema) -> Parsed:
    """Parse one statement as SQLite would read it against `schema`."""
    text = sql.strip().rstrip(";").strip()
    if not text:
        return Parsed(False, error="empty query")
    try:
        statements = [s for s in sqlglot.parse(text, read=DIALECT) if s is not None]
    except (SqlglotError, RecursionError, ValueError) as e:
        return Parsed(False, error=_first_line(e))
    if len(statements) != 1:
        return Parsed(False, error=f"{len(statements)} statements; expected exactly one")
    expression = statements[0]
    # SQLite applies the double-quote rule itself, so only the number rewrite changes what runs
    _resolve_strings(expression, schema, text)
    return Parsed(True, expression, rewritten=_numbers_for_numeric_columns(expression, schema))


def _select_aliases(expression: exp.Expression) -> set[str]:
    return {a.alias.lower() for a in expression.find_all(exp.Alias) if a.alias}


def _resolve_strings(expression: exp.Expression, schema: Schema, text: str) -> bool:
    """Apply SQLite's double-quoted-string rule: an unresolvable "name" is a string literal."""
    aliases = _select_aliases(expression)
    changed = False
    for col in list(expression.find_all(exp.Column)):
        ident = col.this
        if col.table or not isinstance(ident, exp.Identifier) or not ident.quoted:
            continue
        name = ident.name
        if schema.has_column(name) or name.lower() in aliases or f'"{name}"' not in text:
            continue
        col.replace(exp.Literal.string(name))
        changed = True
    return changed


def table_scope(expression: exp.Expression) -> dict[str, str]:
    """Table names and aliases in a query -> the table name they stand for (lower-case keys)."""
    scope: dict[str, str] = {}
    for t in expression.find_all(exp.Table):
        scope[t.name.lower()] = t.name
        if t.alias:
            scope[t.alias.lower()] = t.name
    return scope


def column_of(col: exp.Column, scope: dict[str, str], schema: Schema) -> tuple[str, str] | None:
    """(table, column) in the schema that a column reference names, resolving table aliases."""
    if col.table:
        table = schema.table(scope.get(col.table.lower(), col.table))
        return (table.name, col.name) if table and table.column(col.name) else None
    in_query = [schema.table(n) for n in scope.values()]
    candidates = [t for t in in_query if t and t.column(col.name)] or schema.tables_with(col.name)
    return (candidates[0].name, col.name) if candidates else None


def _numbers_for_numeric_columns(expression: exp.Expression, schema: Schema) -> bool:
    changed = False
    scope = table_scope(expression)
    for pred in list(expression.find_all(exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)):
        col, lit = pred.this, pred.expression
        if isinstance(lit, exp.Column):
            col, lit = lit, col
        if not (isinstance(col, exp.Column) and isinstance(lit, exp.Literal) and lit.is_string):
            continue
        if not _NUMBER_TEXT.match(lit.this) or "," not in lit.this:
            continue
        ref = column_of(col, scope, schema)
        table = schema.table(ref[0]) if ref else None
        column = table.column(ref[1]) if table and ref else None
        if column is not None and column.numeric:
            lit.replace(exp.Literal.number(lit.this.replace(",", "")))
            changed = True
    return changed


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
