"""`sqltune eval`: generate -> execute -> score -> report.

    sqltune eval --model ./models/gemma-2b-sql --dataset b-mc2/sql-create-context --split eval --limit 1000
    sqltune eval --model ./models/gemma-2b-sql --engine vllm --dataset ./my_eval.jsonl     # auto | transformers | vllm
    sqltune eval --endpoint http://127.0.0.1:8000 --dataset ./my_eval.jsonl
    sqltune eval --predictions preds.jsonl --dataset ./my_eval.jsonl
    sqltune eval --compare reports/a reports/b
    sqltune eval --model ./models/sql --dataset my_questions.jsonl --database postgresql://reader@host/shop
    CLOUD_RUN_TASK_INDEX=0 CLOUD_RUN_TASK_COUNT=8 sqltune eval --model gs://b/models/sql --report-dir gs://b/reports/r1
    sqltune eval merge gs://b/reports/r1

Writes report.json (config, model fingerprint, every metric with counts), predictions.jsonl (one
line per example with every metric and error), summary.md (also printed) and ex_by_category.png.
A sharded run writes each shard under <report-dir>/shard-IIIII-of-NNNNN; `merge` joins them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqltune import __version__, config, logs
from sqltune.artifacts import storage
from sqltune.engines import factory
from sqltune.errors import ConfigError, DataError

log = logs.get("eval")
REPORT, PREDICTIONS, SUMMARY, CHART = "report.json", "predictions.jsonl", "summary.md", "ex_by_category.png"
_SHARD_DIR = re.compile(r"^shard-(\d{5})-of-(\d{5})$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="Score a model, a server or a predictions file by executing its SQL.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--self-check", action="store_true", help="Score the dataset's gold SQL against itself: "
                   "lists gold queries that fail on their own context and checks that EX is 100%%.")
    p.add_argument("--compare", nargs="+", metavar="REPORT", help="Print two or more reports (report.json or "
                   "their folders) side by side, with the examples where they disagree.")
    config.add_arguments(p, groups=["eval", "buckets", "tracking"], fields={
        "model_name": "A finished model folder or bucket URL.",
        "dataset": "Examples with gold SQL: hub id, local file, synthetic:N or spider:DIR (each row run on its own "
                   "database); default: the model's training data.",
        "heldout_databases": "", "question_syn": "",
        "dataset_split": "", "column_map": "", "keep_literal_case": "",
        "eval_fraction": "Held-out share for --split eval; default: the model's own.",
        "seed": "Seed for --limit sampling and the databases.",
        "eval_batch_size": "Sequences the engine generates together with --model; default: the server's "
                           "--max-batch-size (16).",
        "serve_engine": "Engine that generates with --model, as in `sqltune serve`; auto = vllm when CUDA and "
                        "vllm are installed, else transformers.",
        "database": "Score on this real database (postgresql:// URL or SQLite file), read-only, instead of "
                    "synthesised ones; contexts come from its schema.",
        "db_schema": "", "db_dialect": "", "db_timeout": "", "db_context_chars": "", "db_keys": "",
        "constrain": "Decode under the grammar of each example's schema (schema) and question (schema+values); "
                     "with --endpoint, asked of the server per request.",
        "candidates": "Answers per question, the greedy one and samples, voted on by running them (on databases "
                      "synthesised from the schema and question, or --database); the report shows EX against the "
                      "greedy answer's. --predictions: each line's `candidates`.",
        "candidate_temperature": "", "candidate_top_p": ""},
        aliases={"column_map": ["--columns"], "eval_batch_size": ["--batch-size"]})
    factory.engine_choices(p)
    p.set_defaults(func=run)
    actions = p.add_subparsers(dest="eval_action", metavar="merge")
    merge = actions.add_parser("merge", help="Join shard reports into one report.")
    merge.add_argument("folder", help="The --report-dir the shards wrote to (local or bucket URL).")
    merge.add_argument("--out", default="", help="Where the merged report goes; default: the same folder.")
    merge.set_defaults(func=run_merge)


def parse_shard(spec: str, environ: Mapping[str, str]) -> tuple[int, int]:
    """(index, count) from `i/n`, else from Cloud Run's task variables, else (0, 1)."""
    if not spec and "CLOUD_RUN_TASK_COUNT" in environ:
        spec = f"{environ.get('CLOUD_RUN_TASK_INDEX', '0')}/{environ['CLOUD_RUN_TASK_COUNT']}"
    if not spec:
        return 0, 1
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"--shard {spec!r} is not i/n with 0 <= i < n", "use e.g. --shard 0/4 (the first of four)")
    return int(m.group(1)), int(m.group(2))


def _model_meta(cfg: config.Config, mode: str) -> dict[str, Any]:
    if mode != "model":
        return {}
    from sqltune.artifacts import manifests, registry

    if manifests.is_remote(cfg.model_name):
        # a bucket model keeps its own eval defaults (dataset, eval fraction): fetch it now (cached, verified);
        # generation reuses the same cached folder
        return manifests.read_meta(registry.fetch(cfg.model_name).path)
    path = manifests.local_path(cfg.model_name)
    return manifests.read_meta(path) if (path / manifests.SQLTUNE_META).is_file() else {}


def load_examples(cfg: config.Config, sources: Mapping[str, str], meta: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The examples to evaluate (split, then a seeded --limit sample, in dataset order) and their description."""
    from sqltune.data import loading

    trained = meta.get("config", {})
    source = cfg.dataset if "dataset" in sources else trained.get("dataset", "")
    if not source:
        raise ConfigError("no dataset to evaluate on", "pass --dataset (a hub id, a .jsonl file or synthetic:N)")
    fraction = cfg.eval_fraction if "eval_fraction" in sources else trained.get("eval_fraction", cfg.eval_fraction)
    report = loading.DataReport(source=source)
    if loading.needs_databases(source):
        # rows on real databases, or several sources: split as the job split them (by database), with the
        # context budget the model was trained with unless --db-context-chars says otherwise
        options = loading.database_options(config.as_trained(cfg, sources, trained))
        splits = loading.load_splits(source, split=cfg.dataset_split, columns=cfg.column_map, eval_fraction=fraction,
                                     seed=cfg.seed, keep_literal_case=cfg.keep_literal_case, db=options)
        report = splits.report
        examples = {"eval": splits.eval, "train": splits.train}.get(cfg.eval_split, splits.train + splits.eval)
        examples = loading.select(examples, "all", fraction, cfg.eval_limit, cfg.seed)
    else:
        rows = loading.read_rows(source, cfg.dataset_split, cfg.seed)
        examples = loading.clean(rows, loading.parse_columns(cfg.column_map), report, cfg.keep_literal_case)
        examples = loading.select(examples, cfg.eval_split, fraction, cfg.eval_limit, cfg.seed)
    if not examples:
        raise DataError(f"no examples in split `{cfg.eval_split}` of {source}",
                        "use --split all, or a larger dataset / --eval-fraction")
    desc = {"source": source, "split": cfg.eval_split, "dataset_split": cfg.dataset_split, "eval_fraction": fraction,
            "limit": cfg.eval_limit, "examples": len(examples), "fingerprint": loading.fingerprint(examples),
            "skipped": dict(report.skipped), "duplicates": report.duplicates,
            "literal_case_rows": report.literal_case_rows}
    return examples, desc


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not logs.show_progress(), dynamic_ncols=True)


def predict(cfg: config.Config, mode: str, examples: Sequence[Any], all_examples_rows: list[dict[str, Any]] | None
            ) -> tuple[list[Any], dict[str, Any]]:
    from sqltune.evaluate import sources as src

    pairs = [(ex.question, ex.context) for ex in examples]
    with src.GenerateProgress(len(pairs)) as bar:
        if mode == "gold":
            from sqltune.data import loading

            preds = [src.Prediction(ex.answer) for ex in examples]
            info = {"kind": "gold", "name": "gold-self-check", "fingerprint": loading.fingerprint(examples)}
        elif mode == "predictions":
            preds = src.match_predictions(all_examples_rows or [], examples, cfg.eval_predictions)
            info = {"kind": "predictions", "path": cfg.eval_predictions, "name": Path(cfg.eval_predictions).stem,
                    "fingerprint": _sha256(Path(cfg.eval_predictions))}
        elif mode == "endpoint":
            preds, info = src.from_endpoint(cfg.eval_endpoint, pairs, concurrency=cfg.eval_concurrency,
                                            retries=cfg.eval_retries, timeout=cfg.eval_request_timeout,
                                            max_new_tokens=cfg.eval_max_new_tokens, progress=bar.update,
                                            constrain="" if cfg.constrain == "off" and not cfg.eval_compare_unconstrained
                                            else cfg.constrain, candidates=cfg.candidates)
        else:
            preds, info = src.from_model(cfg.model_name, pairs, batch_size=cfg.eval_batch_size,
                                         max_new_tokens=cfg.eval_max_new_tokens, progress=bar.update,
                                         constrain=cfg.constrain, cfg=cfg, candidates=cfg.candidates)
            if cfg.complete_joins:  # as ask and serve answer (a sqltune server's /v1/sql already did)
                preds = [src.with_joins(p, c) for p, (_, c) in zip(preds, pairs, strict=True)]
                info["joins_completed"] = sum(1 for p in preds if p.model_sql)
                logs.event(log, "joins completed", count=info["joins_completed"], of=len(preds))
    return preds, info


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def score(items: Sequence[Any], settings: Any, workers: int) -> list[dict[str, Any]]:
    from sqltune.evaluate.score import iter_scores

    records = []
    step = max(1, len(items) // 10)
    start = time.perf_counter()
    with _progress_bar(len(items), "score") as bar:
        for n, record in enumerate(iter_scores(items, settings, workers), 1):
            records.append(record)
            bar.update(1)
            if n % step == 0 or n == len(items):
                logs.event(log, "scoring", done=n, total=len(items),
                           ex_so_far=round(sum(r["ex"] for r in records) / n, 4),
                           seconds=round(time.perf_counter() - start, 1))
    return records


def _mode(cfg: config.Config, sources: Mapping[str, str], self_check: bool = False) -> str:
    if self_check:
        return "gold"
    chosen = [m for m, on in (("endpoint", bool(cfg.eval_endpoint)), ("predictions", bool(cfg.eval_predictions)),
                              ("model", "model_name" in sources)) if on]
    if not chosen:
        raise ConfigError("nothing to evaluate", "pass --model DIR, --endpoint URL or --predictions FILE")
    if len(chosen) > 1 and chosen[:2] != ["endpoint", "model"] and chosen[:2] != ["predictions", "model"]:
        raise ConfigError(f"pass only one of --model, --endpoint, --predictions (got {', '.join(chosen)})",
                          "evaluate one source per run, then `sqltune eval --compare` the reports")
    return chosen[0]


def run(args: argparse.Namespace) -> int:
    if args.compare:
        return run_compare(args.compare)
    from sqltune.evaluate import report as rep

    cfg, sources = config.from_namespace(args)
    logs.setup(cfg.log_level)
    storage.configure(cfg)  # bucket_endpoint, transfer_workers and model_cache apply to models and reports
    mode = _mode(cfg, sources, getattr(args, "self_check", False))
    shard_index, shard_count = parse_shard(cfg.eval_shard, os.environ)
    rows: list[dict[str, Any]] | None = None
    meta = _model_meta(cfg, mode)
    # contexts as the model was trained on them (schema budget, keys) unless the flags say otherwise
    cfg = config.as_trained(cfg, sources, meta.get("config") or {})
    if mode == "predictions":
        from sqltune.evaluate import sources as src

        rows = src.read_predictions(cfg.eval_predictions)
    real_db = None
    if cfg.database:  # a real database answers instead of synthesised ones (sqltune.evaluate.database)
        from sqltune.evaluate.database import DatabaseEval

        real_db = DatabaseEval(cfg)
        rows = real_db.with_contexts(rows) if rows is not None else None
    if mode == "predictions" and "dataset" not in sources and real_db is None:
        from sqltune.data import loading
        from sqltune.evaluate import sources as src

        examples = src.examples_from_predictions(rows or [], cfg.eval_predictions)
        dataset = {"source": cfg.eval_predictions, "split": "all", "examples": len(examples),
                   "fingerprint": loading.fingerprint(examples)}
    else:
        if mode == "model" and "eval_batch_size" not in sources:
            # the engine's own capacity (serve's --max-batch-size, 16) unless --batch-size says otherwise:
            # 3.68 questions/s at 16 against 2.49 at 8 on the demo model, the same SQL
            # (benchmarks/results/generation_speed.json)
            cfg = dataclasses.replace(cfg, eval_batch_size=cfg.max_batch_size)
        if "eval_max_new_tokens" not in sources and meta.get("max_new_tokens"):
            # the longest answer the model was trained on, unless --eval-max-new-tokens says otherwise
            cfg = dataclasses.replace(cfg, eval_max_new_tokens=int(meta["max_new_tokens"]))
        if real_db is not None:
            examples, dataset = real_db.examples(cfg, sources, mode, rows)
        else:
            examples, dataset = load_examples(cfg, sources, meta)
    indices = [i for i in range(len(examples)) if i % shard_count == shard_index]
    mine = [examples[i] for i in indices]
    from sqltune.evaluate import row_databases

    if real_db is None and row_databases.has_databases(examples):  # each row on its own database
        real_db = row_databases.RowDatabases(dict(enumerate(examples)), timeout_s=cfg.db_timeout,
                                             row_cap=cfg.eval_row_cap, written=cfg.db_dialect, keys=cfg.db_keys)
        real_db.order = indices
    logs.event(log, "eval started", mode=mode, examples=len(examples), shard=f"{shard_index}/{shard_count}",
               scoring=len(mine), dataset=dataset["source"])
    out = cfg.eval_output or ""
    if cfg.eval_compare_unconstrained:
        if cfg.constrain == "off" or mode not in ("model", "endpoint"):
            raise ConfigError("--compare-unconstrained compares a --constrain run with a free one",
                              "add --constrain schema (or schema+values) and --model or --endpoint")
        runs = [dataclasses.replace(cfg, constrain="off"), cfg]
    else:
        runs = [cfg]
    done = []
    try:
        for run_cfg in runs:
            sub = run_cfg.constrain if len(runs) > 1 else ""
            done.append(_evaluate(run_cfg, mode, mine, rows, indices, dataset, (shard_index, shard_count), out, sub,
                                  real_db))
    finally:
        if real_db is not None:
            real_db.close()
    report = done[-1][0]
    if cfg.run_id:  # the report joins the training run (TensorBoard folder, MLflow / W&B run)
        from sqltune import tracking

        tracking.log_eval(cfg, sources, report, meta)
    if len(done) > 1:
        print(rep.compare([r for r, _ in done], [p for _, p in done], names=[c.constrain for c in runs]))
    if mode == "gold" and report["results"]["metrics"]["ex"]["value"] < 1.0:
        print("self-check FAILED: gold vs gold is below 100% EX; see predictions.jsonl for the examples")
        return 1
    return 0


def _evaluate(cfg: config.Config, mode: str, mine: Sequence[Any], rows: list[dict[str, Any]] | None,
              indices: Sequence[int], dataset: dict[str, Any], shard: tuple[int, int], out: str,
              sub: str, real_db: Any = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate, score and write one report (`sub`: its folder under the report dir when a run makes two)."""
    from sqltune.evaluate import report as rep
    from sqltune.evaluate.candidates import annotate, choose_for
    from sqltune.evaluate.score import Item, Settings

    shard_index, shard_count = shard
    t0 = time.perf_counter()
    preds, source = predict(cfg, mode, mine, rows)
    t1 = time.perf_counter()
    logs.event(log, "predictions ready", count=len(preds), seconds=round(t1 - t0, 1))
    settings = Settings(databases=cfg.eval_databases, seed=cfg.seed, time_budget_s=cfg.eval_query_timeout,
                        row_cap=cfg.eval_row_cap)
    votes = choose_for(cfg, mode, mine, rows, preds, real_db)
    chosen = [v.sql for v in votes] if votes else [p.sql for p in preds]
    items = [Item(i, ex.question, ex.context, ex.answer, sql) for i, ex, sql in zip(indices, mine, chosen, strict=True)]
    records = real_db.score(items) if real_db is not None else score(items, settings, cfg.eval_workers)
    if votes:  # the greedy answer scored too where the vote changed it, so the report shows what choosing did
        greedy = [Item(it.index, it.question, it.context, it.gold, v.runs[0].sql)
                  for it, v in zip(items, votes, strict=True) if v.chosen != 0]
        scored = real_db.score(greedy) if real_db is not None else score(greedy, settings, cfg.eval_workers)
        annotate(records, votes, {r["index"]: r for r in scored})
    for i, (record, p) in enumerate(zip(records, preds, strict=True)):
        record["raw_output"], record["generation_error"] = p.raw, p.error
        own = p.model_candidates[votes[i].chosen] if votes and p.model_candidates else p.model_sql
        if own:
            record["model_sql"] = own  # the model's own SQL of the answer scored, before its joins were completed
        if p.vote is not None:
            record["candidates"] = p.vote
        if cfg.constrain != "off":
            record["constrained"], record["constraint_reason"] = p.constrained, p.reason
    t2 = time.perf_counter()
    report = {
        "version": rep.REPORT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sqltune_version": __version__, "source": source, "dataset": dataset,
        "shard": {"index": shard_index, "count": shard_count},
        "settings": {**vars(settings), "greedy": cfg.candidates == 1, "max_new_tokens": cfg.eval_max_new_tokens,
                     "constrain": cfg.constrain, "candidates": cfg.candidates},
        "config": cfg.to_dict(), "results": rep.aggregate(records),
        "generation_errors": sum(1 for p in preds if p.error),
        "timing": {"generate_s": round(t1 - t0, 2), "score_s": round(t2 - t1, 2),
                   "scored_per_s": round(len(items) / max(t2 - t1, 1e-9), 1)},
    }
    if real_db is not None:
        report["database"] = real_db.describe()
    out = out or f"reports/{_slug(source.get('name', 'eval'))}"
    if sub:
        out = storage.join(out, _slug(sub))
    if shard_count > 1:
        out = storage.join(out, f"shard-{shard_index:05d}-of-{shard_count:05d}")
    write_report(out, report, records, chart=shard_count == 1)
    print(rep.markdown(report))
    print(f"\nreport: {storage.join(out, REPORT)}")
    logs.event(log, "eval finished", ex=report["results"]["metrics"]["ex"]["value"], out=out,
               seconds=round(t2 - t0, 1))
    return report, records


def _slug(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name).strip("-") or "eval"


def write_report(out: str, report: dict[str, Any], records: Sequence[dict[str, Any]], *, chart: bool = True) -> None:
    from sqltune.evaluate import report as rep

    lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    storage.write_bytes(storage.join(out, PREDICTIONS), lines.encode())
    storage.write_bytes(storage.join(out, SUMMARY), rep.markdown(report).encode())
    if chart:
        storage.write_bytes(storage.join(out, CHART), rep.chart_png(report))
    storage.write_bytes(storage.join(out, REPORT), json.dumps(report, indent=2, default=str).encode())


def read_report(where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A report and its predictions, from report.json or the folder holding it."""
    folder = where[: -len(REPORT)].rstrip("/") if where.endswith(REPORT) else where
    raw = storage.read_bytes(storage.join(folder, REPORT))
    if raw is None:
        raise DataError(f"no {REPORT} at {folder}", "pass a report.json or the folder `sqltune eval` wrote")
    preds = storage.read_bytes(storage.join(folder, PREDICTIONS)) or b""
    return json.loads(raw), [json.loads(line) for line in preds.decode().splitlines() if line.strip()]


def run_compare(paths: Sequence[str]) -> int:
    from sqltune.evaluate import report as rep

    if len(paths) < 2:
        raise ConfigError("--compare needs two or more reports", "pass e.g. --compare reports/a reports/b")
    loaded = [read_report(p) for p in paths]
    names = [r.get("source", {}).get("name", "?") for r, _ in loaded]
    if len(set(names)) < len(names):  # same model twice: tell the columns apart by where they came from
        names = [p.rstrip("/").removesuffix(REPORT).rstrip("/") for p in paths]
    print(rep.compare([r for r, _ in loaded], [p for _, p in loaded], names=names))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    """Join shard-*-of-N reports: check every shard is there and from the same run, re-aggregate."""
    from sqltune.evaluate import report as rep

    logs.setup("info")
    shards = {}
    for name in storage.list_dirs(args.folder):
        if m := _SHARD_DIR.match(name):
            shards[int(m.group(1))] = (int(m.group(2)), name)
    if not shards:
        raise DataError(f"no shard-*-of-* folders under {args.folder}", "point at the --report-dir of a sharded eval")
    counts = {count for count, _ in shards.values()}
    if len(counts) != 1:
        raise DataError(f"shards of different runs under {args.folder} (counts {sorted(counts)})",
                        "give each sharded run its own --report-dir")
    count = counts.pop()
    missing = sorted(set(range(count)) - set(shards))
    if missing:
        raise DataError(f"{len(missing)} of {count} shards have no report yet (first missing: {missing[0]})",
                        "wait for every task to finish, or rerun the failed ones with --shard i/n")
    reports, records = [], []
    for i in range(count):
        r, preds = read_report(storage.join(args.folder, shards[i][1]))
        reports.append(r)
        records += preds
    keys = {(r["dataset"].get("fingerprint"), r["source"].get("fingerprint")) for r in reports}
    if len(keys) != 1:
        raise DataError("shards disagree on the dataset or model fingerprint", "merge shards of one run only")
    records.sort(key=lambda r: r["index"])
    merged = {**reports[0], "shard": {"index": 0, "count": 1, "merged_from": count},
              "results": rep.aggregate(records),
              "generation_errors": sum(r.get("generation_errors", 0) for r in reports),
              "timing": {"generate_s": round(sum(r["timing"]["generate_s"] for r in reports), 2),
                         "score_s": round(sum(r["timing"]["score_s"] for r in reports), 2)}}
    out = args.out or args.folder
    write_report(out, merged, records)
    print(rep.markdown(merged))
    print(f"\nmerged {count} shards ({len(records)} examples): {storage.join(out, REPORT)}")
    return 0
