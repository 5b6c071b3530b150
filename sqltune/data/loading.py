"""Load, validate and split text-to-SQL examples.

    sqltune data check --dataset ../shared/data/sql-create-context/train.jsonl

Sources: a hub id (datasets.load_dataset, HF_TOKEN read here), a local .json / .jsonl /
.parquet / .csv file, or `synthetic:N`. Every row is validated; a bad row is skipped and
counted by reason, never fatal. The train / eval split hashes the normalised question, so the
same question never sits on both sides, whatever the limit, order or machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqltune.data.examples import Example, is_eval, normalise_question
from sqltune.errors import DataError

FIELDS = ("question", "context", "answer")
_CREATE = re.compile(r"^\s*CREATE\s+TABLE\s+[\w\"`\[\].]+\s*\(.+\)\s*$", re.IGNORECASE | re.DOTALL)
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class DataReport:
    """What loading did to the rows: the counts are printed and saved in the artifact."""

    source: str
    rows_read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    limited_to: int | None = None
    train: int = 0
    eval: int = 0
    fingerprint: str = ""
    # rows whose answer had string literals respelled as the question spells them (data/literals.py),
    # and how many literals; None when the rule is off (--keep-literal-case)
    literal_case_rows: int | None = 0
    literal_case_literals: int = 0
    # training rows added by repeating the multi-table ones (--multi-table-repeat)
    multi_table_repeated: int = 0
    # rows on real databases (the Spider / BIRD layout, --database): per database, gold queries that failed
    databases: dict[str, Any] | None = None
    held_out_databases: list[str] = field(default_factory=list)
    # several sources in one job: each one's own report, and the training rows dropped because their question
    # is an eval question of a held-out database (sql-create-context repeats Spider's questions)
    sources: list[dict[str, Any]] = field(default_factory=list)
    weight: float = 1.0
    leaked_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows_read": self.rows_read, "skipped": dict(self.skipped),
                "skipped_total": sum(self.skipped.values()), "duplicates": self.duplicates,
                "limited_to": self.limited_to, "train": self.train, "eval": self.eval,
                "fingerprint": self.fingerprint, "literal_case_rows": self.literal_case_rows,
                "literal_case_literals": self.literal_case_literals,
                "multi_table_repeated": self.multi_table_repeated, "weight": self.weight,
                **({"databases": self.databases, "held_out_databases": self.held_out_databases}
                   if self.databases is not None else {}),
                **({"sources": self.sources, "leaked_dropped": self.leaked_dropped} if self.sources else {})}


@dataclass
class Splits:
    train: list[Example]
    eval: list[Example]
    report: DataReport


def parse_columns(spec: str) -> dict[str, str]:
    """`question=q,context=schema,answer=sql` -> {"question": "q", ...}; unnamed fields map to themselves."""
    mapping = {f: f for f in FIELDS}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        ours, sep, theirs = part.partition("=")
        if not sep or ours.strip() not in FIELDS or not theirs.strip():
            raise DataError(f"column mapping `{part}` is not of the form field=column",
                            "use e.g. --column-map question=q,context=schema,answer=sql")
        mapping[ours.strip()] = theirs.strip()
    return mapping


def _read_json_lines(path: Path) -> Iterator[dict[str, Any] | str]:
    """Yield each row, or the reason a line is skipped: 'invalid_json', or 'not_utf8' for a line whose bytes are
    not UTF-8 text (counted like any bad row; the rest of the file still loads)."""
    with path.open("rb") as fh:
        first = fh.read(1)
        fh.seek(0)
        if first == b"[":  # a JSON array
            data = fh.read()
            try:
                rows = json.loads(data.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})",
                                "save it as UTF-8, or as JSON lines so a bad line is skipped and counted") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path} is not valid JSON: {e}", "fix the file or save it as JSON lines") from None
            yield from rows
            return
        for raw in fh:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield "not_utf8"
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield "invalid_json"


def read_rows(source: str, split: str = "train", seed: int = 0) -> Iterator[Any]:
    """Raw rows from any supported source, before validation."""
    if source.startswith("synthetic:"):
        from sqltune.data import synthetic

        count = source.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise DataError(f"`{source}`: N must be a positive integer", "use e.g. --dataset synthetic:2000")
        yield from synthetic.generate(int(count), seed=seed)
        return
    path = Path(source)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(f"dataset file {path} does not exist",
                            "pass an existing .json/.jsonl/.parquet/.csv file, a hub id, or synthetic:N")
        kind = LOCAL_SUFFIXES.get(path.suffix.lower())
        if kind == "json":
            yield from _read_json_lines(path)
            return
        if kind is None:
            raise DataError(f"dataset file {path} has an unknown extension",
                            f"use one of {', '.join(sorted(LOCAL_SUFFIXES))}")
        import datasets

        yield from datasets.load_dataset(kind, data_files=str(path), split="train")
        return
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split, token=os.environ.get("HF_TOKEN") or None)
    except Exception as e:  # the hub raises many types; all mean "cannot load this id"
        raise DataError(f"cannot load dataset `{source}` (split {split}): {type(e).__name__}: {e}",
                        "check the id and your network / HF_TOKEN, or pass a local file or synthetic:N") from None
    yield from ds


def validate(row: Any, mapping: dict[str, str]) -> Example | str:
    """An Example, or the reason the row is skipped."""
    if not isinstance(row, dict):
        return row if row in ("invalid_json", "not_utf8") else "not_an_object"
    values = {}
    for ours, theirs in mapping.items():
        if theirs not in row or row[theirs] is None:
            return f"missing_{ours}"
        value = row[theirs]
        if not isinstance(value, str):
            return f"non_text_{ours}"
        if not value.strip():
            return f"empty_{ours}"
        values[ours] = value.strip()
    statements = [s for s in values["context"].split(";") if s.strip()]
    if not statements or not all(_CREATE.match(s) for s in statements):
        return "context_not_create_table"
    return Example(**values)


_JOIN = re.compile(r"\bJOIN\b", re.IGNORECASE)


def table_kind(context: str, answer: str, on_database: bool = False) -> str:
    """`multi_table` (Spider-style: several CREATE TABLEs in the context, or a JOIN in the answer) or
    `single_table` (WikiSQL-style): the two behave very differently, so every EX figure is split by it.
    A row on a real database has every table of it in its context: there, the gold's own tables decide."""
    if on_database:
        import sqlglot
        from sqlglot import exp

        try:
            tree = sqlglot.parse_one(answer, read="sqlite")
        except Exception:  # sqlglot raises several types for unreadable SQL; the context rule decides then
            tree = None
        if tree is not None:
            tables = {t.name.lower() for t in tree.find_all(exp.Table)}
            return "multi_table" if len(tables) > 1 else "single_table"
    tables = sum(1 for s in context.split(";") if s.strip())
    return "multi_table" if tables > 1 or _JOIN.search(answer) else "single_table"


def kind_of(ex: Example) -> str:
    return table_kind(ex.context, ex.answer, on_database=bool(ex.db_id))


def repeat_multi_table(examples: list[Example], times: int) -> tuple[list[Example], int]:
    """The training rows with every multi-table row `times` times, the copies spread through the list (a
    seeded shuffle orders them anyway); returns the rows and how many copies were added."""
    if times <= 1:
        return examples, 0
    multi = [ex for ex in examples if kind_of(ex) == "multi_table"]
    return examples + multi * (times - 1), len(multi) * (times - 1)


def select(examples: list[Example], split: str, fraction: float, limit: int, seed: int) -> list[Example]:
    """The examples of one split (all, eval or train, by question hash as in training), then a seeded
    sample of `limit` of them (-1 = all), in their original order."""
    if split != "all":
        examples = [ex for ex in examples if is_eval(ex.question, fraction) == (split == "eval")]
    if 0 <= limit < len(examples):
        keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
        examples = [examples[i] for i in keep]
    return examples


def clean(rows: Iterable[Any], mapping: dict[str, str], report: DataReport,
          keep_literal_case: bool = False) -> list[Example]:
    """Validated, deduplicated examples; unless `keep_literal_case`, the answer's string literals take the
    question's spelling (literals.question_case), counted in the report."""
    from sqltune.data.literals import question_case

    seen: set[Example] = set()
    kept: list[Example] = []
    if keep_literal_case:
        report.literal_case_rows = None
    for row in rows:
        report.rows_read += 1
        result = validate(row, mapping)
        if not isinstance(result, str) and not keep_literal_case:
            answer, changed = question_case(result.question, result.answer, result.context)
            if changed:
                result = Example(result.question, result.context, answer)
                report.literal_case_rows = (report.literal_case_rows or 0) + 1
                report.literal_case_literals += changed
        if isinstance(result, str):
            report.skipped[result] += 1
        elif result in seen:
            report.duplicates += 1
        else:
            seen.add(result)
            kept.append(result)
    return kept


def fingerprint(examples: Iterable[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.to_dict(), sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class DatabaseOptions:
    """How rows on real databases get their context (the same budget and keys `ask` uses) and their split."""

    database: str = ""  # --database: the one database of a file of question / SQL pairs
    context_chars: int = 6000
    keys: bool = True
    question_syn: bool = False  # Spider-Syn's rewrites of the training questions as more training rows
    held_out: tuple[str, ...] = ()  # db_ids of the eval split; () = sqltune's fixed set, else a hash of db_id
    written: str = "sqlite"  # the dialect the gold SQL of --database pairs is written in


_WEIGHT = re.compile(r"^(.+?)\s*\*\s*(\d+(?:\.\d+)?)$")


def needs_databases(source: str) -> bool:
    """Whether `source` is read through load_splits' database path: rows on real databases, or several sources."""
    from sqltune.data import databases

    return len(parse_sources(source)) > 1 or any(databases.layout_root(name) for name, _ in parse_sources(source))


def database_options(cfg: Any) -> DatabaseOptions:
    """The DatabaseOptions of a Config: the same budget, keys and dialect `ask` uses."""
    return DatabaseOptions(database=cfg.database, context_chars=cfg.db_context_chars, keys=cfg.db_keys,
                           question_syn=cfg.question_syn, held_out=tuple(cfg.heldout_databases),
                           written=cfg.db_dialect)


def parse_sources(spec: str) -> list[tuple[str, float]]:
    """`a.jsonl, spider:DIR*2` -> [("a.jsonl", 1.0), ("spider:DIR", 2.0)]: sources with their weight (how many
    times each training row is used: 2 = twice, 0.5 = a seeded half)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = _WEIGHT.match(part)
        name, weight = (m.group(1).strip(), float(m.group(2))) if m else (part, 1.0)
        if weight <= 0:
            raise DataError(f"dataset `{part}`: the weight must be above 0", "use e.g. --dataset a.jsonl,spider:DIR*2")
        out.append((name, weight))
    if not out:
        raise DataError("--dataset is empty", "pass a hub id, a file, spider:DIR or synthetic:N")
    return out


def _weighted(examples: list[Example], weight: float, seed: int) -> list[Example]:
    whole, part = int(weight), weight - int(weight)
    extra = random.Random(seed).sample(examples, round(part * len(examples))) if part else []
    return examples * whole + extra


def load_splits(source: str, *, split: str = "train", columns: str = "", limit: int = -1,
                eval_fraction: float = 0.05, seed: int = 42, keep_literal_case: bool = False,
                db: DatabaseOptions | None = None) -> Splits:
    """Read, validate, respell literals as the question does, deduplicate, subsample (seeded) and split each
    source (`a,b*2`: several, with weights), then join them; an eval question of a held-out database is
    never a training row of another source."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction {eval_fraction} must be in [0, 1)", "use e.g. --eval-fraction 0.05")
    parts = parse_sources(source)
    db = db or DatabaseOptions()
    loaded = [_load_one(name, split=split, columns=columns, limit=limit, eval_fraction=eval_fraction, seed=seed,
                        keep_literal_case=keep_literal_case, db=db) for name, _ in parts]
    if len(parts) == 1 and parts[0][1] == 1.0:
        return loaded[0]
    held = {normalise_question(ex.question) for s in loaded if s.report.databases is not None for ex in s.eval}
    report = DataReport(source=source)
    train: list[Example] = []
    held_out: list[Example] = []
    for (_, weight), one in zip(parts, loaded, strict=True):
        kept = [ex for ex in one.train if ex.db_id or normalise_question(ex.question) not in held]
        one.report.weight, one.report.leaked_dropped = weight, len(one.train) - len(kept)
        report.leaked_dropped += one.report.leaked_dropped
        train += _weighted(kept, weight, seed)
        held_out += one.eval
        report.rows_read += one.report.rows_read
        report.skipped.update(one.report.skipped)
        report.duplicates += one.report.duplicates
        report.held_out_databases += one.report.held_out_databases
        report.sources.append(one.report.to_dict())
    report.train, report.eval = len(train), len(held_out)
    report.fingerprint = fingerprint(train + held_out)
    return Splits(train, held_out, report)


def _load_one(source: str, *, split: str, columns: str, limit: int, eval_fraction: float, seed: int,
              keep_literal_case: bool, db: DatabaseOptions) -> Splits:
    from sqltune.data import databases

    report = DataReport(source=source)
    layout = databases.layout_root(source)
    variants: set[Example] = set()
    if layout is not None or db.database:
        if layout is not None:
            found, dbr = databases.read_layout(source, context_chars=db.context_chars, keys=db.keys,
                                               question_syn=db.question_syn, skipped=report.skipped)
        else:
            found, dbr = databases.read_pairs(read_rows(source, split, seed), db.database, context_chars=db.context_chars,
                                              keys=db.keys, written=db.written, mapping=parse_columns(columns),
                                              skipped=report.skipped)
        if dbr.gold_failed:
            report.skipped["gold_fails_on_database"] += sum(dbr.gold_failed.values())
        report.rows_read = len(found) - len(dbr.variants) + sum(report.skipped.values())
        report.databases = dbr.to_dict()
        variants = {found[i] for i in dbr.variants}
        # string literals stay as the database holds them: respelling them as the question does would change
        # what the gold query selects
        report.literal_case_rows = None
        seen: set[Example] = set()
        examples = []
        for ex in found:
            if ex in seen:
                report.duplicates += 1
            else:
                seen.add(ex)
                examples.append(ex)
    else:
        examples = clean(read_rows(source, split, seed), parse_columns(columns), report, keep_literal_case)
    if limit >= 0 and limit < len(examples):
        examples = random.Random(seed).sample(examples, limit)
        report.limited_to = limit
    if not examples:
        raise DataError(f"no usable rows in `{source}` (skipped: {dict(report.skipped) or 'none'})",
                        "check the column mapping (--column-map) and that the file has question/context/answer rows")
    if layout is not None:  # by database, never by row: questions on one database share its schema and values
        held = databases.held_out([ex.db_id for ex in examples], db.held_out, eval_fraction)
        report.held_out_databases = sorted(held)
        train = [ex for ex in examples if ex.db_id not in held]
        evals = [ex for ex in examples if ex.db_id in held and ex not in variants]
    else:
        train = [ex for ex in examples if not is_eval(ex.question, eval_fraction)]
        evals = [ex for ex in examples if is_eval(ex.question, eval_fraction)]
    if not train:
        raise DataError("every row landed in the eval split", "lower --eval-fraction or add rows")
    report.train, report.eval = len(train), len(evals)
    report.fingerprint = fingerprint(examples)
    return Splits(train, evals, report)


def write_jsonl(examples: Iterable[dict[str, Any]], path: str | Path) -> int:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with p.open("w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex, ensure_ascii=False) + "\n")
            count += 1
    return count
