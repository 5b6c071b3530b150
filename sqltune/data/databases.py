"""Training and evaluation rows on real databases: the Spider / BIRD layout, and your own database.

    rows, report = read_layout("../shared/data/spider-train", context_chars=1500)     # --dataset spider:DIR
    rows, report = read_pairs(pairs, "shop.sqlite", context_chars=6000)              # --dataset pairs.jsonl --database

The layout (Spider, Spider-Syn, BIRD): question files (`train_spider.json`, `train_others.json`, BIRD's
`train.json` with `evidence` and `SQL`, `dev.json`), `tables.json`, `database/<db_id>/<db_id>.sqlite`.
Each row's context is read from its own database by the function `sqltune ask` uses
(sqltune.db.introspect: keys included, types in the model's vocabulary), each database introspected
once, and cut to the same budget by the same selection (`introspect.context_for`), so a model learns
on the contexts it is later asked with. A database without a file gets its schema from tables.json,
written as the same DDL. Every gold query runs read-only on its database first: one that fails is
reported and skipped, never trained on.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqltune.errors import DataError

PREFIX = "spider:"
# the question files of the layout, in the order they are read when the folder is given whole
TRAIN_FILES = ("train_spider.json", "train_others.json", "train.json")
DEV_FILES = ("dev.json",)
GOLD_TIMEOUT_S = 5.0  # a gold query slower than this on its own database is not a training target

# Spider's train databases held out of training by sqltune, fixed by db_id (Spider's dev databases are the
# public benchmark and are never in this project): 493 questions on 10 databases. student_assessment holds the
# reference tutorial's own example (candidates + people), so a model trained here has never seen it.
SPIDER_TRAIN_HELD_OUT = ("cinema", "department_store", "dorm_1", "party_host", "school_bus", "small_bank_1",
                         "store_product", "student_assessment", "tracking_orders", "wedding")


@dataclass
class DatabaseReport:
    """What reading rows on real databases did: per database, rows without a file, gold queries that failed."""

    rows: Counter[str] = field(default_factory=Counter)  # usable rows per db_id
    no_database: int = 0  # rows whose database has no file (context from tables.json, gold not run)
    gold_failed: Counter[str] = field(default_factory=Counter)  # skipped: the gold SQL fails on its database
    gold_failed_examples: list[dict[str, str]] = field(default_factory=list)
    tables_kept_for_gold: int = 0  # rows whose context selection kept a table only because the gold reads it
    tables_left_out: int = 0  # rows whose context leaves some of the database's tables out (budget)
    context_chars: int = 0
    variants: set[int] = field(default_factory=set)  # positions of the Spider-Syn rewrites (training rows only)

    def to_dict(self) -> dict[str, Any]:
        return {"databases": len(self.rows), "rows_per_database": dict(sorted(self.rows.items())),
                "no_database": self.no_database, "gold_failed": sum(self.gold_failed.values()),
                "gold_failed_per_database": dict(self.gold_failed), "gold_failed_examples": self.gold_failed_examples,
                "tables_kept_for_gold": self.tables_kept_for_gold, "rows_with_tables_left_out": self.tables_left_out,
                "context_chars": self.context_chars}


def is_layout(path: str | Path) -> bool:
    """A folder with tables.json (or database/) and one of the layout's question files."""
    p = Path(path)
    return p.is_dir() and ((p / "tables.json").is_file() or (p / "database").is_dir()) and any(
        (p / f).is_file() for f in TRAIN_FILES + DEV_FILES)


def layout_root(source: str) -> tuple[Path, str] | None:
    """(folder, question file or "") of a `spider:DIR[/FILE.json]` source or a folder in the layout; else None."""
    spec = source[len(PREFIX):] if source.startswith(PREFIX) else source
    p = Path(spec)
    if p.suffix == ".json" and source.startswith(PREFIX):
        return p.parent, p.name
    if source.startswith(PREFIX) or is_layout(p):
        return p, ""
    return None


def _question_files(root: Path, chosen: str) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{root} is not a folder", "pass --dataset spider:DIR with DIR holding tables.json, "
                        "database/<db_id>/<db_id>.sqlite and train_spider.json (or BIRD's train.json)")
    if chosen:
        if not (root / chosen).is_file():
            raise DataError(f"{root / chosen} does not exist", f"pass one of the question files in {root}")
        return [root / chosen]
    files = [root / f for f in TRAIN_FILES if (root / f).is_file()] or [root / f for f in DEV_FILES if (root / f).is_file()]
    if not files or not ((root / "tables.json").is_file() or (root / "database").is_dir()):
        raise DataError(f"{root} is not in the Spider / BIRD layout (it needs tables.json or database/, and one of "
                        f"{', '.join(TRAIN_FILES + DEV_FILES)})", "point spider:DIR at the folder that holds them")
    return files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", "save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} does not parse as JSON: {e}", "restore the file from its source") from None


def tables_json_schemas(path: Path) -> dict[str, Any]:
    """db_id -> DbSchema built from Spider's tables.json (for databases without a file)."""
    from sqltune.db.introspect import DbSchema, DbTable, ForeignKey
    from sqltune.sql.schema import Column

    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path} is not a list of databases", "use Spider's tables.json format")
    types = {"number": "INTEGER", "text": "VARCHAR", "time": "DATETIME", "boolean": "BOOLEAN", "others": "VARCHAR"}
    out = {}
    for n, db in enumerate(data):
        try:
            names = db.get("table_names_original") or db["table_names"]
            cols = db.get("column_names_original") or db["column_names"]
            by_table: list[list[tuple[int, str, str]]] = [[] for _ in names]
            for i, ((t, c), kind) in enumerate(zip(cols, db["column_types"], strict=True)):
                if t >= 0:
                    by_table[t].append((i, c, types.get(kind, "VARCHAR")))
            pks = {p for pk in db.get("primary_keys", []) for p in (pk if isinstance(pk, list) else [pk])}
            fks: dict[int, list[ForeignKey]] = {}
            for a, b in db.get("foreign_keys", []):
                fks.setdefault(cols[a][0], []).append(ForeignKey((cols[a][1],), names[cols[b][0]], (cols[b][1],)))
            tables = tuple(DbTable(name, tuple(Column(c, t, False) for _, c, t in by_table[ti]),
                                   tuple(c for i, c, _ in by_table[ti] if i in pks), tuple(fks.get(ti, ())))
                           for ti, name in enumerate(names))
            out[db["db_id"]] = DbSchema(tables)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(f"{path}: database #{n} is not in tables.json's format ({type(e).__name__}: {e})",
                            "use Spider's tables.json (db_id, table_names_original, column_names_original, "
                            "column_types, primary_keys, foreign_keys)") from None
    return out


class Databases:
    """Each database opened read-only once: its schema (introspected, or from tables.json), and a runner."""

    def __init__(self, keys: bool = True, timeout_s: float = GOLD_TIMEOUT_S, row_cap: int = 1000) -> None:
        self.keys, self.timeout_s, self.row_cap = keys, timeout_s, row_cap
        self._open: dict[str, tuple[Any, Any, Any]] = {}

    def get(self, spec: str) -> tuple[Any, Any, Any]:
        """(Database, DbSchema, Runner) of a SQLite file or URL, opened on first use."""
        if spec not in self._open:
            from sqltune.db import introspect
            from sqltune.db.connect import connect
            from sqltune.db.execute import open_runner

            db = connect(spec)
            with warnings.catch_warnings():  # SQLAlchemy's notes on odd declared types and FKs it cannot match
                warnings.simplefilter("ignore")
                schema = introspect.introspect(db, keys=self.keys)
            self._open[spec] = (db, schema, open_runner(db, timeout_s=self.timeout_s, row_cap=self.row_cap).__enter__())
        return self._open[spec]

    def close(self) -> None:
        for db, _, runner in self._open.values():
            runner.close()
            db.close()
        self._open.clear()

    def __enter__(self) -> Databases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gold_runs(dbs: Databases, spec: str, sql: str, written: str = "sqlite") -> str:
    """"" when the gold query runs on its database (read-only, through the same translation and gate as
    `ask`), else why not."""
    from sqltune.db import dialect

    db, schema, runner = dbs.get(spec)
    t = dialect.translate(sql, schema.to_schema(), source=written, target=db.dialect)
    if not t.ok:
        return f"{t.error_kind}: {t.error}"
    result = runner.run(t.sql)
    if result.ok or result.error_kind == "row_limit":
        return ""
    return f"{result.error_kind}: {result.error}"


def _row_fields(row: Any) -> tuple[str, str, str, str] | str:
    """(db_id, question, gold SQL, hint) of a Spider or BIRD row, or why it is skipped."""
    if not isinstance(row, dict):
        return "not_an_object"
    q, sql, db_id = row.get("question"), row.get("query", row.get("SQL")), row.get("db_id")
    if not isinstance(db_id, str) or not db_id.strip():
        return "missing_db_id"
    if not isinstance(q, str) or not q.strip():
        return "missing_question"
    if not isinstance(sql, str) or not sql.strip():
        return "missing_answer"
    hint = row.get("evidence")
    return db_id.strip(), " ".join(q.split()), " ".join(sql.split()), hint.strip() if isinstance(hint, str) else ""


def with_hint(question: str, hint: str) -> str:
    """BIRD's evidence goes to the model with the question (the prompt has no field of its own for it)."""
    return f"{question} (Hint: {hint})" if hint else question


def read_layout(source: str, *, context_chars: int, keys: bool = True, question_syn: bool = False,
                skipped: Counter[str] | None = None) -> tuple[list[Any], DatabaseReport]:
    """The rows of a Spider / BIRD folder as Examples with their database, context and gold checked."""
    from sqltune.data.examples import Example
    from sqltune.db import introspect

    found = layout_root(source)
    assert found is not None
    root, chosen = found
    files = _question_files(root, chosen)
    fallback = tables_json_schemas(root / "tables.json")
    report, skipped = DatabaseReport(context_chars=context_chars), skipped if skipped is not None else Counter()
    examples: list[Example] = []
    with Databases(keys=keys) as dbs:
        for path in files:
            data = _read_json(path)
            if not isinstance(data, list):
                raise DataError(f"{path} is not a list of questions", "use the Spider / BIRD question file format")
            for row in data:
                fields = _row_fields(row)
                if isinstance(fields, str):
                    skipped[fields] += 1
                    continue
                db_id, question, gold, hint = fields
                file = root / "database" / db_id / f"{db_id}.sqlite"
                if file.is_file():
                    try:
                        _, schema, _ = dbs.get(str(file))
                    except Exception as e:  # noqa: BLE001 - a database that cannot be opened is one line
                        raise DataError(f"cannot open {file}: {e}", "restore the database file, or remove its "
                                        "questions") from None
                    why = gold_runs(dbs, str(file), gold)
                    if why:
                        report.gold_failed[db_id] += 1
                        if len(report.gold_failed_examples) < 20:
                            report.gold_failed_examples.append({"db_id": db_id, "gold": gold, "error": why[:200]})
                        continue
                    where = str(file)
                elif db_id in fallback:
                    schema, where = fallback[db_id], ""
                    schema = introspect.DbSchema(schema.tables, keys=keys)
                    report.no_database += 1
                else:
                    skipped["unknown_database"] += 1
                    continue
                questions = [question]
                if question_syn and isinstance(row.get("question_syn"), str) and row["question_syn"].strip() \
                        and " ".join(row["question_syn"].split()) != question:
                    questions.append(" ".join(row["question_syn"].split()))
                for n, q in enumerate(questions):
                    if n:
                        report.variants.add(len(examples))
                    chosen_ctx = introspect.context_for(schema, with_hint(q, hint), context_chars, gold=gold)
                    report.tables_kept_for_gold += chosen_ctx.kept_for_gold
                    report.tables_left_out += bool(chosen_ctx.left_out)
                    examples.append(Example(with_hint(q, hint), chosen_ctx.context, gold, db_id, where, hint))
                report.rows[db_id] += 1
    return examples, report


def read_pairs(rows: Iterable[Any], database: str, *, context_chars: int, keys: bool = True, written: str = "sqlite",
               mapping: dict[str, str] | None = None,
               skipped: Counter[str] | None = None) -> tuple[list[Any], DatabaseReport]:
    """Question / SQL pairs on one database (`--dataset pairs.jsonl --database URL`): contexts from its schema
    as `ask` builds them, each gold query run read-only first and counted."""
    from sqltune.config import redact_url
    from sqltune.data.examples import Example
    from sqltune.db import introspect

    mapping = mapping or {"question": "question", "answer": "answer"}
    report, skipped = DatabaseReport(context_chars=context_chars), skipped if skipped is not None else Counter()
    name = Path(database).stem if "://" not in database else redact_url(database).rsplit("/", 1)[-1]
    examples = []
    with Databases(keys=keys) as dbs:
        _, schema, _ = dbs.get(database)
        for row in rows:
            if not isinstance(row, dict):
                skipped[row if row in ("invalid_json", "not_utf8") else "not_an_object"] += 1
                continue
            q, sql = row.get(mapping["question"]), row.get(mapping["answer"], row.get("sql", row.get("query")))
            if not (isinstance(q, str) and q.strip() and isinstance(sql, str) and sql.strip()):
                skipped["missing_question_or_answer"] += 1
                continue
            q, sql = " ".join(q.split()), sql.strip().rstrip(";").strip()
            why = gold_runs(dbs, database, sql, written)
            if why:
                report.gold_failed[name] += 1
                if len(report.gold_failed_examples) < 20:
                    report.gold_failed_examples.append({"db_id": name, "gold": sql, "error": why[:200]})
                continue
            chosen = introspect.context_for(schema, q, context_chars, gold=sql)
            report.tables_kept_for_gold += chosen.kept_for_gold
            report.tables_left_out += bool(chosen.left_out)
            examples.append(Example(q, chosen.context, sql, name, database))
            report.rows[name] += 1
    return examples, report


def held_out(db_ids: Sequence[str], chosen: Sequence[str], fraction: float) -> set[str]:
    """The databases whose questions form the eval split: `chosen` when given; else Spider's train databases
    fixed above where the source has them; else a hash of each db_id at `fraction` (never by row: questions on
    one database share its schema and values)."""
    from sqltune.data.examples import is_eval

    ids = set(db_ids)
    if chosen:
        return {d for d in chosen if d in ids}
    fixed = ids & set(SPIDER_TRAIN_HELD_OUT)
    if fixed:
        return fixed
    return {d for d in ids if is_eval(f"database {d}", fraction)}
