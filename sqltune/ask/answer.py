"""One question, answered on a real database: schema -> prompt -> SQL -> dialect -> gate -> rows.

    result = ask(cfg, "How many orders shipped in May?")          # cfg.database, cfg.model_name / eval_endpoint
    print(render_table(result))

The schema is read from the database (sqltune.db.introspect) and cut to what fits the model's
context; the model (a local artifact, or a running server) writes SQL in its own dialect, which
sqltune.db.dialect turns into one gated statement for the database, and sqltune.db.execute runs
it read-only. Every step's outcome is a field of AskResult, so the CLI, JSON output and tests read
the same thing.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqltune import config, logs
from sqltune.db import dialect, introspect
from sqltune.db.connect import Database, connect, warn_if_writable
from sqltune.db.execute import Runner, open_runner
from sqltune.errors import ConfigError
from sqltune.sql import vote
from sqltune.sql.sandbox import ROW_LIMIT, TIMEOUT, ExecResult

log = logs.get("db")
MAX_CELL = 60  # characters of one value shown in the terminal table (JSON and CSV carry it whole)


@dataclass
class AskResult:
    question: str
    database: dict[str, Any]
    selection: introspect.Selection
    translation: dialect.Translation
    result: ExecResult
    source: str  # model | endpoint | given (--sql)
    raw_output: str = ""
    generation_error: str = ""
    warnings: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    vote: dict[str, Any] | None = None  # --candidates: how many ran on the database and agreed (sqltune.sql.vote)

    @property
    def ok(self) -> bool:
        """The query ran (a result cut at the row cap still answers)."""
        return self.translation.ok and (self.result.ok or self.result.error_kind == ROW_LIMIT)

    @property
    def error(self) -> str:
        if self.generation_error:
            return f"no SQL: {self.generation_error}"
        if not self.translation.ok:
            return f"refused ({self.translation.error_kind}): {self.translation.error}"
        if not self.ok:
            return f"failed ({self.result.error_kind}): {self.result.error}"
        return ""

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "database": self.database, "schema": self.selection.to_dict(),
                "source": self.source, "model_sql": self.translation.model_sql, "sql": self.translation.sql,
                "sql_changed": self.translation.changed, "ok": self.ok, "error": self.error,
                "error_kind": self.translation.error_kind or self.result.error_kind,
                "columns": list(self.result.columns), "rows": [list(r) for r in self.result.rows],
                "row_count": len(self.result.rows), "truncated": self.result.truncated,
                "warnings": self.warnings, "timing": self.timing, "candidates": self.vote}


class Writer:
    """Where the SQL comes from: a local model, a running server, or the user's own --sql."""

    def __init__(self, cfg: config.Config, sources: dict[str, str], sql: str | None) -> None:
        self.cfg, self.given, self.llm = cfg, sql, None
        self.joined_from = ""  # the model's own SQL when its joins were completed (the last answer written)
        self.server_vote: dict[str, Any] | None = None
        self.kind = "given" if sql is not None else "endpoint" if cfg.eval_endpoint else "model"
        if self.kind == "model" and "model_name" not in sources:
            raise ConfigError("nothing writes the SQL", "pass --model DIR, --endpoint URL, or --sql 'SELECT ...'")
        self.max_new_tokens = cfg.eval_max_new_tokens
        if self.kind == "model":
            from sqltune.engines import batch

            # one question: a batch of one on the engine `sqltune serve` would use (--engine)
            self.llm = batch.open_model(cfg.model_name, cfg, batch_size=max(1, cfg.candidates))
            trained = self.llm.meta.get("max_new_tokens")
            if trained and "eval_max_new_tokens" not in sources:
                self.max_new_tokens = int(trained)
            # the schema budget the model was trained with (sqltune.db.introspect.context_for)
            self.cfg = config.as_trained(cfg, sources, self.llm.meta.get("config") or {})

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def fits(self, question: str) -> Callable[[str], bool]:
        """Whether a schema context fits: --db-context-chars, and the local model's own context length."""
        chars = self.cfg.db_context_chars
        if self.llm is None:
            return lambda context: len(context) <= chars
        llm = self.llm
        room = llm.max_model_len - self.max_new_tokens

        def fits(context: str) -> bool:
            if len(context) > chars:
                return False
            return len(llm.encode(llm.template.build_prompt(question, context))) <= room

        return fits

    def write(self, question: str, context: str) -> tuple[str, str, str]:
        """(sql, raw completion, generation error)."""
        if self.given is not None:
            return self.given, self.given, ""
        if self.llm is not None:
            from sqltune import prompts
            from sqltune.engines.base import SamplingParams

            prompt = self.llm.template.build_prompt(question, context)
            [done] = self.llm.generate_text([prompt], SamplingParams(max_tokens=self.max_new_tokens))
            if done.error:
                return "", done.text, done.error
            return self._joined(prompts.extract_sql(done.text, self.llm.eos_token, self.llm.template), context), done.text, ""
        from sqltune.evaluate import sources as src

        preds, _ = src.from_endpoint(self.cfg.eval_endpoint, [(question, context)], concurrency=1,
                                     retries=self.cfg.eval_retries, timeout=self.cfg.eval_request_timeout,
                                     max_new_tokens=self.max_new_tokens, progress=lambda n: None,
                                     candidates=self.cfg.candidates)
        self.server_vote = preds[0].vote  # the server voted on databases it synthesised from the schema
        return preds[0].sql, preds[0].raw, preds[0].error

    def candidates(self, question: str, context: str, k: int) -> list[vote.Candidate]:
        """k answers from the local model in one batch: the greedy one, then k-1 samples seeded 1..k-1."""
        from dataclasses import replace

        from sqltune import prompts
        from sqltune.engines import batch
        from sqltune.engines.base import SamplingParams

        assert self.llm is not None
        ids = self.llm.encode(self.llm.template.build_prompt(question, context))
        greedy = SamplingParams(max_tokens=self.max_new_tokens)
        done = self.llm.generate([batch.Request(ids, greedy)] + [
            batch.Request(ids, replace(greedy, temperature=self.cfg.candidate_temperature,
                                       top_p=self.cfg.candidate_top_p, seed=j)) for j in range(1, k)])
        return [vote.Candidate(self._joined(prompts.extract_sql(c.text, self.llm.eos_token, self.llm.template), context)
                               if not c.error else "", c.logprob, c.error) for c in done]

    def _joined(self, sql: str, context: str) -> str:
        """The model's SQL with the joins its columns need completed (--complete-joins, sqltune.sql.joins)."""
        from sqltune.sql.joins import with_joins

        joined = with_joins(sql, context) if self.cfg.complete_joins else sql
        self.joined_from = sql if joined != sql else ""
        return joined


class Deadline:
    """One question's time on the database: --db-timeout, shared by all its candidates. They run one
    after another, so K slow ones with a limit each took K times the limit; now each distinct candidate
    gets an equal share of what is left when its turn comes (a fast one leaves its unused share to the
    ones after it), and a question costs at most --db-timeout whatever K is."""

    MIN_RUN_S = 0.01  # less than this left: the query is not started, it could only time out

    def __init__(self, seconds: float, candidates: int = 1) -> None:
        self.seconds, self.candidates = seconds, candidates
        self.ends = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.ends - time.monotonic())

    def spent(self) -> ExecResult:
        shared = f", shared by its {self.candidates} candidates" if self.candidates > 1 else ""
        return ExecResult(ok=False, error_kind=TIMEOUT, timed_out=True,
                          error=f"not run: the question's {self.seconds:g} s on the database (--db-timeout{shared}) "
                                "was spent")

    def run(self, runner: Runner, sql: str, waiting: int = 1) -> ExecResult:
        """Run `sql` within its share of what is left, `waiting` queries (itself included) still to come."""
        share = self.left() / max(1, waiting)
        return runner.run(sql, timeout_s=share) if share >= self.MIN_RUN_S else self.spent()


def choose_on_database(cfg: config.Config, db: Database, schema: Any, candidates: list[vote.Candidate],
                       deadline: Deadline | None = None) -> vote.Vote:
    """The candidate whose rows on the database most candidates share, each translated, gated and run read-only,
    all within one deadline (a fresh --db-timeout unless `deadline` is given)."""
    deadline = deadline or Deadline(cfg.db_timeout, len(candidates))
    with open_runner(db, timeout_s=cfg.db_timeout, row_cap=cfg.db_row_cap) as runner:
        def run(sql: str, waiting: int) -> ExecResult:
            t = dialect.translate(sql, schema, source=cfg.db_dialect, target=db.dialect)
            if not t.ok:
                return ExecResult(ok=False, error_kind=t.error_kind, error=t.error)
            return deadline.run(runner, t.sql, waiting)

        def execute(checked: Sequence[vote.Checked]) -> list[tuple[ExecResult, ...]]:
            return [(run(c.sql, len(checked) - i),) for i, c in enumerate(checked)]

        return vote.choose(candidates, schema, execute)


def answer_candidates(cfg: config.Config, db: Database, schema: Any, candidates: list[vote.Candidate]
                      ) -> tuple[vote.Vote, dialect.Translation, ExecResult]:
    """The vote, the chosen SQL as translated for the database, and its result, all within one --db-timeout.
    The chosen candidate already ran in the vote (or timed out there): its result is the answer, never a
    second run, so a fallback to a candidate that timed out does not wait the limit again."""
    deadline = Deadline(cfg.db_timeout, len(candidates))
    chosen = choose_on_database(cfg, db, schema, candidates, deadline)
    run = chosen.runs[chosen.chosen] if chosen.runs else None
    # no run in the vote: refused by the SQLite checker, yet the database's dialect reads it, so it runs in what is left
    translation, result = run_sql(cfg, db, schema, chosen.sql, candidates[chosen.chosen].error,
                                  ran=run.results[0] if run is not None and run.results else None, deadline=deadline)
    return chosen, translation, result


def run_sql(cfg: config.Config, db: Database, schema: Any, sql: str, error: str = "", *,
            ran: ExecResult | None = None, deadline: Deadline | None = None) -> tuple[dialect.Translation, ExecResult]:
    """`sql` (in --db-dialect) translated for the database and gated, then run read-only with --db-row-cap and
    --db-timeout (or its share of `deadline`), unless `ran` is the result it already has. A generation `error` or
    a refused translation is the result, and nothing runs."""
    translation = dialect.translate(sql, schema, source=cfg.db_dialect, target=db.dialect)
    if error or not translation.ok:
        return translation, ExecResult(ok=False, error_kind=translation.error_kind or "generation",
                                       error=translation.error or error)
    if ran is not None:
        return translation, ran
    with open_runner(db, timeout_s=cfg.db_timeout, row_cap=cfg.db_row_cap) as runner:
        return translation, deadline.run(runner, translation.sql) if deadline is not None else runner.run(translation.sql)


def ask(cfg: config.Config, question: str, *, sources: dict[str, str] | None = None, sql: str | None = None,
        db: Database | None = None) -> AskResult:
    """Answer `question` on cfg.database (or the open `db`)."""
    if not question.strip() and sql is None:
        raise ConfigError("no question given", 'pass the question as the last argument: sqltune ask ... "How many ...?"')
    t0 = time.perf_counter()
    own = db is None
    db = db or connect(cfg.database, schema=cfg.db_schema)
    try:
        warnings = [w for w in [warn_if_writable(db)] if w]
        schema = introspect.introspect(db, keys=cfg.db_keys)
        t1 = time.perf_counter()
        logs.event(log, "schema read", database=db.display, tables=len(schema.tables),
                   columns=sum(len(t.columns) for t in schema.tables), seconds=round(t1 - t0, 3))
        writer = Writer(cfg, sources or {}, sql)
        try:
            selection = introspect.select_tables(schema, question, writer.fits(question))
            if selection.left_out:
                logs.event(log, "tables left out of the context", given=selection.tables,
                           left_out=selection.left_out, how=selection.how)
            candidates: list[vote.Candidate] = []
            if cfg.candidates > 1 and writer.kind == "model":  # voted here, on the real database
                candidates = writer.candidates(question, selection.context, cfg.candidates)
            else:
                model_sql, raw, gen_error = writer.write(question, selection.context)
                if writer.joined_from:
                    warnings.append(f"joins completed from the foreign keys (--no-complete-joins: as written); "
                                    f"the model wrote: {writer.joined_from}")
        finally:
            writer.close()
        t2 = time.perf_counter()
        chosen = None
        if candidates:
            chosen, translation, result = answer_candidates(cfg, db, schema.to_schema(), candidates)
            model_sql, raw, gen_error = chosen.sql, chosen.sql, candidates[chosen.chosen].error
        else:
            translation, result = run_sql(cfg, db, schema.to_schema(), model_sql, gen_error)
        picked = chosen.to_dict() if chosen else writer.server_vote
        t3 = time.perf_counter()
        out = AskResult(question, db.describe(), selection, translation, result, writer.kind, raw, gen_error, warnings,
                        {"schema_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3), "query_s": round(t3 - t2, 3)},
                        picked)
        logs.event(log, "ask finished", ok=out.ok, kind=out.to_dict()["error_kind"], rows=len(result.rows),
                   truncated=result.truncated, changed=translation.changed, query_ms=round(result.elapsed_ms, 1))
        return out
    finally:
        if own:
            db.close()


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    text = value.hex() if isinstance(value, (bytes, bytearray, memoryview)) and not isinstance(value, str) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def table_text(columns: tuple[str, ...], rows: tuple[tuple[Any, ...], ...]) -> str:
    """Rows as an aligned table; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows)
               for i in range(len(columns))]

    def line(values: list[str], right: list[bool]) -> str:
        return " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)).rstrip()

    out = [line(list(columns), [False] * len(columns)), "-+-".join("-" * w for w in widths)]
    out += [line(r, numeric) for r in cells]
    return "\n".join(out)


def render_table(res: AskResult) -> str:
    lines = [f"-- {w}" for w in res.warnings]
    sel = res.selection
    if sel.left_out:
        lines.append(f"-- schema: {len(sel.tables)} of {len(sel.tables) + len(sel.left_out)} tables given to the model "
                     f"({', '.join(sel.tables)}); left out: {', '.join(sel.left_out)} [{sel.how}]")
    if res.vote and res.vote.get("candidates", 1) > 1:
        v = res.vote
        where = "the database" if "runs" in v else "databases the server synthesised from the schema"
        lines.append(f"-- chosen among {v['candidates']} candidates: {v['ran']} ran on {where}, {v['agreed']} agreed"
                     if v["ran"] else f"-- none of {v['candidates']} candidates ran; this is the first one, unchecked")
        if v.get("timed_out"):
            late = v["timed_out"]
            lines.append(f"-- timed out: candidate{'s' if len(late) > 1 else ''} {', '.join(str(i) for i in late)} "
                         f"(the question's --db-timeout is shared by its candidates; numbered from 0, the greedy one)")
    t = res.translation
    if t.changed:
        lines += [f"-- SQL as the model wrote it ({'given' if res.source == 'given' else 'model'}): {t.model_sql}",
                  f"-- SQL as run on {res.database['engine']}:", t.sql]
    else:
        lines.append(t.sql or t.model_sql or "(no SQL)")
    if not res.ok:
        lines.append(f"error: {res.error}")
        return "\n".join(lines)
    lines += ["", table_text(res.result.columns, res.result.rows), ""]
    count = len(res.result.rows)
    if res.result.truncated:
        lines.append(f"({count} rows shown; the query returns more: raise --db-row-cap to see them)")
    else:
        lines.append(f"({count} row{'s' if count != 1 else ''}, {res.result.elapsed_ms:.0f} ms)")
    return "\n".join(lines)


def render_json(res: AskResult) -> str:
    return json.dumps(res.to_dict(), indent=2, default=str, ensure_ascii=False)


def render_csv(res: AskResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(res.result.columns)
    w.writerows(["" if v is None else v for v in row] for row in res.result.rows)
    return buf.getvalue()
