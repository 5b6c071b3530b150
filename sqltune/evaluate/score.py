"""Score one prediction against its gold query, and many across processes.

    record = score_example(Item(0, question, context, gold, predicted), Settings())
    records = score_all(items, Settings(), workers=2)

For each example: parse the context into a schema, build K seeded databases on which the gold
query returns something (up to `attempts` seeds each), run the gold query twice on each (a gold
query that fails, or disagrees with itself, is a dataset error: counted, reported, excluded),
then run the prediction on the same databases. Every field of the record is explicit.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqltune.errors import DataError
from sqltune.evaluate import metrics
from sqltune.sql import check
from sqltune.sql.sandbox import EMPTY, MULTIPLE, SYNTAX, ExecResult, Sandbox
from sqltune.sql.schema import Parsed, Schema, parse_schema, parse_sql
from sqltune.sql.synth_db import SynthesisTooSlow, make_plan, synthesise


@dataclass(frozen=True)
class Settings:
    databases: int = 3
    seed: int = 0
    time_budget_s: float = 1.0
    row_cap: int = 1000
    attempts: int = 4  # seeds tried per database until the gold query selects something


@dataclass(frozen=True)
class Item:
    index: int
    question: str
    context: str
    gold: str
    predicted: str


def _informative(result: ExecResult) -> bool:
    """A gold result that tells queries apart: some row with a value other than NULL or 0."""
    return any(v is not None and v != 0 for row in result.rows for v in row)


def _usefulness(result: ExecResult) -> int:
    """2: some value other than NULL or 0; 1: some row (MIN can be 0); 0: nothing selected."""
    if _informative(result):
        return 2
    return 1 if any(v is not None for row in result.rows for v in row) else 0


def _seed(settings: Settings, item: Item) -> int:
    digest = hashlib.sha256(f"{settings.seed}\0{item.context}\0{item.gold}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def _record(item: Item, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "index": item.index, "question": item.question, "context": item.context, "gold": item.gold,
        "predicted": item.predicted, "source": "unknown", "features": {}, "categories": [],
        "gold_ok": False, "gold_error_kind": "", "gold_error": "", "gold_empty": False,
        "valid": False, "executable": False, "schema_ok": False, "unknown_names": [],
        "em_raw": metrics.exact_match_raw(item.gold, item.predicted), "em_norm": False, "ex": False,
        "error_kind": "", "error": "", "timed_out": False}
    base.update(fields)
    return base


def _gold_databases(item: Item, schema: Schema, gold_sql: str, plan: Any, settings: Settings,
                    ordered: bool) -> tuple[list[tuple[Sandbox, ExecResult]], ExecResult | None, str]:
    """Sandboxes with the gold result on each, or the failing gold result and its error kind."""
    boxes: list[tuple[Sandbox, ExecResult]] = []
    base = _seed(settings, item)
    ddl = schema.ddl()
    for k in range(settings.databases):
        chosen: tuple[Sandbox, ExecResult] | None = None
        for attempt in range(settings.attempts):
            box = Sandbox(ddl, synthesise(plan, base + 7919 * k + attempt), time_budget_s=settings.time_budget_s,
                          row_cap=settings.row_cap)
            result = box.run(gold_sql)
            if not result.ok:
                box.close()
                for b, _ in boxes:
                    b.close()
                return [], result, result.error_kind
            if chosen is None or _usefulness(result) > _usefulness(chosen[1]):
                if chosen is not None:
                    chosen[0].close()
                chosen = (box, result)
            else:
                box.close()
            if _usefulness(result) == 2:
                break
        assert chosen is not None
        again = chosen[0].run(gold_sql)
        if not again.ok or not metrics.same_result(chosen[1].rows, again.rows, gold_width=len(chosen[1].columns),
                                                   pred_width=len(again.columns), ordered=ordered):
            for b, _ in [*boxes, chosen]:
                b.close()
            return [], again, "nondeterministic"
        boxes.append(chosen)
    return boxes, None, ""


def score_example(item: Item, settings: Settings) -> dict[str, Any]:
    try:
        schema = parse_schema(item.context)
    except DataError as e:
        return _record(item, gold_error_kind="schema", gold_error=e.message)
    gold = parse_sql(item.gold, schema)
    gold_expr = gold.expression if gold.ok else None
    feats = metrics.features(gold_expr, item.gold)
    ordered = metrics.is_ordered(item.gold, gold_expr)
    common = {"source": metrics.source_of(schema), "features": feats, "categories": metrics.categories(feats)}
    try:
        plan = make_plan(schema, gold_expr, item.question)
        boxes, failed, kind = _gold_databases(item, schema, gold.sql(item.gold), plan, settings, ordered)
    except SynthesisTooSlow as e:  # a schema too large to fill in the time cap: this row, not the run
        return _record(item, **common, gold_error_kind="schema", gold_error=e.message)
    if failed is not None:
        return _record(item, **common, gold_error_kind=kind, gold_error=failed.error or kind)
    try:
        return _score_prediction(item, schema, gold, boxes, ordered, common)
    finally:
        for box, _ in boxes:
            box.close()


def _score_prediction(item: Item, schema: Schema, gold: Parsed, boxes: list[tuple[Sandbox, ExecResult]],
                      ordered: bool, common: dict[str, Any]) -> dict[str, Any]:
    gold_expr = gold.expression if gold.ok else None
    same_text = metrics.strip_sql(item.predicted) == metrics.strip_sql(item.gold)
    pred = gold if same_text else parse_sql(item.predicted, schema)
    unknown = check.unknown_names(pred.expression, schema) if pred.ok and pred.expression is not None else []
    fields: dict[str, Any] = {
        **common, "gold_ok": True, "gold_empty": not any(_informative(r) for _, r in boxes),
        "unknown_names": unknown, "schema_ok": pred.ok and not unknown}
    sql = pred.sql(item.predicted)
    # last use of both trees, so normalise them in place rather than copy them
    fields["em_norm"] = metrics.exact_match_norm(gold_expr, pred.expression if pred.ok else None,
                                                 gold_sql=item.gold, pred_sql=item.predicted, copy=False)
    ex = True
    for box, gold_result in boxes:
        result = box.run(sql)
        if not result.ok:
            # valid = SQLite parsed it (sqlglot is more lenient: it reads "SELEC x" as a column alias)
            valid = result.error_kind not in (SYNTAX, EMPTY, MULTIPLE)
            return _record(item, **{**fields, "schema_ok": fields["schema_ok"] and valid}, valid=valid,
                           error_kind=result.error_kind, error=result.error, timed_out=result.timed_out)
        if not metrics.same_result(gold_result.rows, result.rows, gold_width=len(gold_result.columns),
                                   pred_width=len(result.columns), ordered=ordered):
            ex = False
            break
    return _record(item, **fields, valid=True, executable=True, ex=ex,
                   error="" if ex else "result differs from the gold result")


_WORKER_SETTINGS = Settings()


def _init_worker(settings: Settings) -> None:
    global _WORKER_SETTINGS
    _WORKER_SETTINGS = settings


def _score_in_worker(item: Item) -> dict[str, Any]:
    return score_example(item, _WORKER_SETTINGS)


def iter_scores(items: Sequence[Item], settings: Settings, workers: int = 0) -> Iterator[dict[str, Any]]:
    """Records in item order. Processes are spawned, not forked: the parent may hold a model
    whose OpenMP threads a fork would copy mid-flight."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(items) < 64:
        for item in items:
            yield score_example(item, settings)
        return
    chunk = max(1, min(64, len(items) // (workers * 8)))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(settings,)) as pool:
        yield from pool.imap(_score_in_worker, items, chunksize=chunk)

