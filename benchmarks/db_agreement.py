"""Does execution accuracy on a real database agree with the synthesised-database evaluation?

    nice -n 10 python benchmarks/db_agreement.py --n 250      # sqltune reads at most 256 tables

Takes N single-table questions of ../shared/data/sql-create-context, the rows the synthesised
evaluation scores each on (`--eval-databases 1`, sqltune.evaluate.score's own seed), and puts them
into a SQLite file and a PostgreSQL database (a server started from Debian's binaries in a
temporary folder, as the tests do). Predictions: gold as written for half, perturbed for the other
half (benchmarks/eval_speed.py's changes). Then `sqltune eval --predictions` three ways and a
per-question comparison. Writes benchmarks/results/db_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import fixtures_db  # noqa: E402
from eval_speed import perturb  # noqa: E402

from sqltune.cli import main  # noqa: E402

DATA = ROOT.parent / "shared/data/sql-create-context/train.jsonl"


def run(n: int, seed: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="sqltune-dbagree-"))
    pg_root = Path(tempfile.mkdtemp(prefix="sqltune-pg-"))  # its own folder: initdb runs as `postgres`
    server, data = fixtures_db.start_pg_server(pg_root)
    try:
        built = fixtures_db.build_from_examples(DATA, n, seed, scan=20 * n)
        lite = tmp / "questions.sqlite"
        fixtures_db.seed_sqlite(lite, built.ddl, built.rows)
        fixtures_db.build_postgres_db(server, "questions", built)
        rng = random.Random(seed)
        lines = []
        for i, line in enumerate(built.lines):
            pred = line["gold"] if i % 2 == 0 else perturb(line["gold"], line["context"], rng)[0]
            lines.append({**line, "predicted": pred})
        preds = tmp / "preds.jsonl"
        preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
        url = server.url("questions", fixtures_db.READER, fixtures_db.READER_PASS)
        runs = {"synthesised": ["--eval-databases", "1"], "sqlite_file": ["--database", str(lite)],
                "postgresql": ["--database", url]}
        records, timing = {}, {}
        for name, extra in runs.items():
            t0 = time.perf_counter()
            assert main(["eval", "--predictions", str(preds), "--seed", str(seed), "--eval-workers", "1",
                         "--report-dir", str(tmp / name), *extra]) == 0
            timing[name] = round(time.perf_counter() - t0, 2)
            records[name] = {r["question"]: r for r in map(json.loads, (tmp / name / "predictions.jsonl").open())}
    finally:
        fixtures_db.stop_pg_server(server, data)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)
    synth = records["synthesised"]
    out = {"questions": len(built.lines), "seed": seed, "eval_seconds": timing}
    for name in ("sqlite_file", "postgresql"):
        real = records[name]
        both = [q for q in synth if synth[q]["gold_ok"] and real[q]["gold_ok"]]
        out[name] = {"gold_ran_on_both": len(both),
                     "ex_agree": sum(synth[q]["ex"] == real[q]["ex"] for q in both),
                     "ex_synthesised": sum(synth[q]["ex"] for q in both), "ex_real": sum(real[q]["ex"] for q in both),
                     "gold_fails_only_here": [real[q]["gold_error"] for q in synth
                                              if synth[q]["gold_ok"] and not real[q]["gold_ok"]][:10],
                     "disagreements": [{"gold": synth[q]["gold"], "predicted": synth[q]["predicted"],
                                        "synthesised_ex": synth[q]["ex"], "real_ex": real[q]["ex"],
                                        "ran": real[q]["sql_run"], "error": real[q]["error"]}
                                       for q in both if synth[q]["ex"] != real[q]["ex"]][:10]}
    return out


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=250)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    result = run(args.n, args.seed)
    print(json.dumps(result, indent=2))
    dest = ROOT / "benchmarks/results/db_agreement.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {dest.relative_to(ROOT)}")


if __name__ == "__main__":
    main_()
