"""Schema-constrained decoding, measured: unconstrained vs `schema` vs `schema+values` on the same
held-out rows, and what the grammar costs.

    python benchmarks/constrained.py --model models/tiny-sql --model models/smollm2-135m-sql --limit 100
    python benchmarks/constrained.py --limit 50              # no --model: trains the tiny model first
    python benchmarks/constrained.py --grammar-only          # gold acceptance over the whole shared file

Rows: the shared data's eval split (question hash, as in training). Per model and mode: valid-SQL
rate, schema adherence, literal accuracy (the gold's literals all in the prediction) and EX, from the
same scorer as `sqltune eval`; decoding cost in ms per generated token; grammar compile time cold
(first sight of a schema) and cached (the same schema again). Writes
benchmarks/results/constrained.json (paths relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"
OUT = ROOT / "benchmarks" / "results" / "constrained.json"
MODES = ("off", "schema", "schema+values")


def rel(path: Path | str) -> str:
    p = Path(path).resolve()
    if p.is_relative_to(ROOT):
        return str(p.relative_to(ROOT))
    if p.is_relative_to(ROOT.parent / "shared"):
        return "../" + str(p.relative_to(ROOT.parent))
    # a model of another checkout of the repository: the same path inside it (models/<name>)
    return str(Path(*p.parts[p.parts.index("models"):])) if "models" in p.parts else p.name


def grammar_acceptance() -> dict:
    """Share of gold queries (contexts that parse) the grammar accepts, rejects split by whether SQLite
    itself reads the gold on its context (a grammar gap) or not (a dataset error)."""
    from sqltune import constrain
    from sqltune.errors import DataError
    from sqltune.sql.grammar import schema_grammar
    from sqltune.sql.schema import parse_schema

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    out: dict = {"rows": len(rows), "context_unreadable": 0}
    for mode in ("schema", "schema+values"):
        accepted, gaps, errors = 0, [], []
        for r in rows:
            try:
                schema = parse_schema(r["context"])
            except DataError:
                out["context_unreadable"] += mode == "schema"
                continue
            g = schema_grammar(schema, r["question"] if mode == "schema+values" else None)
            if constrain.accepts(g, " " + r["answer"]):
                accepted += 1
                continue
            db = sqlite3.connect(":memory:")
            try:
                for ddl in schema.ddl():
                    db.execute(ddl)
                db.execute("EXPLAIN " + r["answer"])
                gaps.append(r["answer"])
            except sqlite3.Error as e:
                errors.append(f"{type(e).__name__}: {str(e)[:60]}")
            db.close()
        total = accepted + len(gaps) + len(errors)
        reasons: dict[str, int] = {}
        for e in errors:
            key = "no such column" if "no such column" in e else ("syntax error" if "syntax" in e else e)
            reasons[key] = reasons.get(key, 0) + 1
        out[mode] = {"accepted": accepted, "of": total, "share": round(accepted / total, 4),
                     "rejected_sqlite_reads_them": len(gaps), "rejected_dataset_errors": len(errors),
                     "dataset_error_reasons": reasons, "gap_examples": gaps[:25]}
        print(f"{mode}: grammar accepts {accepted}/{total} ({accepted / total:.2%}); "
              f"{len(gaps)} gaps, {len(errors)} dataset errors {reasons}", flush=True)
    return out


def train_tiny(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "sqltune", "finetune", "--config", "configs/tiny-cpu.yaml",
                    "--output", str(out)], check=True, cwd=ROOT)
    return out


def eval_rows(source: str, fraction: float, limit: int, seed: int) -> list:
    """A seeded sample of the held-out split (question hash, as in training) of a dataset."""
    from sqltune.data import loading

    report = loading.DataReport(source=source)
    examples = loading.clean(loading.read_rows(source, "train", seed), loading.parse_columns(""), report)
    held = [ex for ex in examples if loading.is_eval(ex.question, fraction)]
    return [held[i] for i in sorted(random.Random(seed).sample(range(len(held)), min(limit, len(held))))]


def _literals(sql: str) -> set[str] | None:
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except Exception:
        return None
    found = {lit.this.lower().replace(",", "") for lit in tree.find_all(exp.Literal)}
    # "Ann" in double quotes is a string to SQLite when no column has that name: count it as one
    found |= {c.name.lower().replace(",", "") for c in tree.find_all(exp.Column)
              if isinstance(c.this, exp.Identifier) and c.this.quoted}
    return found


def literals_right(ex, predicted: str) -> bool:
    """Every literal of the gold (strings and numbers, case and thousands separators aside) is in the
    prediction: what `schema+values` is meant to fix."""
    gold, pred = _literals(ex.answer), _literals(predicted)
    if gold is None:
        return False
    return pred is not None and gold <= pred


def run_model(model: str, rows: list, batch: int, max_new_tokens: int) -> dict:
    from sqltune import constrain, generation, prompts
    from sqltune.engines import batch as offline
    from sqltune.evaluate import report as rep
    from sqltune.evaluate.score import Item, Settings, iter_scores

    loaded = generation.load(model)
    texts = [loaded.template.build_prompt(ex.question, ex.context) for ex in rows]
    result: dict = {"model": rel(model), "rows": len(rows)}
    # grammar compile time: cold (a schema first seen) and cached (seen before)
    cold, warm = [], []
    _ = loaded.compiler.masks  # the wind-down masks are built once per model; not part of any mode's timing
    for ex in rows[:40]:
        g = constrain.build("schema", ex.question, ex.context).grammar
        t = time.perf_counter()
        loaded.compiler.compile(g)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        loaded.compiler.compile(g)
        warm.append(time.perf_counter() - t)
    result["compile_ms"] = {"cold_median": round(sorted(cold)[len(cold) // 2] * 1000, 2),
                            "cold_max": round(max(cold) * 1000, 2),
                            "cached_median": round(sorted(warm)[len(warm) // 2] * 1000, 4)}
    for mode in MODES:
        cons = [constrain.build(mode, ex.question, ex.context) for ex in rows]
        for c in cons:  # compile first, so ms/token measures decoding alone
            if c.grammar:
                loaded.compiler.compile(c.grammar)
        preds, tokens, steps, started, cpu = [], 0, 0, time.perf_counter(), time.process_time()
        for i in range(0, len(rows), batch):
            outs = offline.generate(loaded, texts[i:i + batch], max_new_tokens,
                                    grammars=[c.grammar for c in cons[i:i + batch]])
            tokens += sum(o.completion_tokens for o in outs)
            steps += max(o.completion_tokens for o in outs)  # a batch decodes until its longest row ends
            preds += [prompts.extract_sql(o.text, loaded.tokenizer.eos_token, loaded.template) for o in outs]
        seconds = time.perf_counter() - started
        # CPU time of this process as well as wall time: on a shared machine the wall clock mostly
        # measures the neighbours
        cpu_seconds = time.process_time() - cpu
        items = [Item(i, ex.question, ex.context, ex.answer, p) for i, (ex, p) in enumerate(zip(rows, preds, strict=True))]
        records = list(iter_scores(items, Settings(), 2))
        metrics = rep.aggregate(records)["metrics"]
        result[mode] = {k: metrics[k]["value"] for k in ("valid", "schema_ok", "ex")}
        result[mode]["literal_accuracy"] = round(sum(literals_right(ex, p) for ex, p in zip(rows, preds, strict=True))
                                                 / len(rows), 4)
        result[mode].update(ms_per_token=round(seconds * 1000 / max(tokens, 1), 2),
                            ms_per_step=round(seconds * 1000 / max(steps, 1), 2),
                            cpu_ms_per_step=round(cpu_seconds * 1000 / max(steps, 1), 2), tokens=tokens, steps=steps,
                            seconds=round(seconds, 1), fallbacks=sum(1 for c in cons if c.reason))
        result[mode]["_ex"] = [bool(r["ex"]) for r in records]
        result[mode]["_pred"] = preds
        print(model, mode, {k: v for k, v in result[mode].items() if not k.startswith("_")}, flush=True)
    # the rows where a constraint changed EX, both ways, for reading
    for mode in MODES[1:]:
        flips = [{"question": ex.question, "gold": ex.answer, "off": result["off"]["_pred"][i],
                  mode: result[mode]["_pred"][i], "ex_off": a, "ex_constrained": b}
                 for i, (ex, a, b) in enumerate(zip(rows, result["off"]["_ex"], result[mode]["_ex"], strict=True))
                 if a != b]
        result[mode]["ex_flips"] = {"gained": sum(f["ex_constrained"] for f in flips),
                                    "lost": sum(f["ex_off"] for f in flips), "examples": flips[:12]}
    for mode in MODES:
        result[mode] = {k: v for k, v in result[mode].items() if not k.startswith("_")}
    # per decoding step of a batch: free and constrained rows then do the same work but for the mask
    off, off_cpu = result["off"]["ms_per_step"], result["off"]["cpu_ms_per_step"]
    for mode in MODES[1:]:
        result[mode]["overhead_per_step"] = round(result[mode]["ms_per_step"] / off - 1, 3)
        result[mode]["cpu_overhead_per_step"] = round(result[mode]["cpu_ms_per_step"] / off_cpu - 1, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="A finished model folder (repeatable).")
    ap.add_argument("--limit", type=int, default=100, help="Held-out rows per model.")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--grammar-only", action="store_true", help="Only the gold acceptance over the whole file.")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    results: dict = {"command": "python benchmarks/constrained.py " + " ".join(argv or sys.argv[1:]),
                     "data": rel(DATA), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.grammar_only:
        results["grammar_acceptance"] = grammar_acceptance()
    else:
        models = args.model or [str(train_tiny(ROOT / "models" / "bench-tiny-sql"))]
        rows = eval_rows(str(DATA), 0.05, args.limit, args.seed)
        results["models"] = []
        for m in models:
            one = run_model(m, rows, args.batch_size, args.max_new_tokens)
            one["rows_from"] = f"{rel(DATA)} eval split"
            results["models"].append(one)
            # a model trained on other data (the tiny demo model: synthetic) also on its own held-out split
            trained = json.loads((Path(m) / "sqltune.json").read_text()).get("config", {})
            if trained.get("dataset", "").startswith("synthetic:"):
                own = eval_rows(trained["dataset"], trained.get("eval_fraction", 0.05), args.limit, args.seed)
                extra = run_model(m, own, args.batch_size, args.max_new_tokens)
                extra["rows_from"] = f"{trained['dataset']} eval split (the model's own training data)"
                results["models"].append(extra)
    out = Path(args.out)
    if out.exists():
        try:
            old = json.loads(out.read_text())
            results = {**old, **results}
        except json.JSONDecodeError:
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {rel(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
