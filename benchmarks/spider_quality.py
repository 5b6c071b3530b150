"""Can the model write a JOIN? EX on held-out real databases (Spider's train databases sqltune never trains on)
beside EX on the single-table eval split, per model or recipe.

    python benchmarks/spider_quality.py --label demo --model models/smollm2-135m-sql          # score a finished model
    python benchmarks/spider_quality.py --label demo-30min --config configs/smollm2-135m-cpu.yaml \
        --set max_steps=660 --set max_train_minutes=30                                         # train, then score
    python benchmarks/spider_quality.py --label demo-schema --model models/smollm2-135m-sql --constrain schema
    python benchmarks/spider_quality.py --label demo-own-sql --model models/smollm2-135m-sql --no-complete-joins

Held-out databases: sqltune.data.databases.SPIDER_TRAIN_HELD_OUT (fixed by db_id; 493 questions, every one run
on its own SQLite file), with contexts built as `sqltune ask` builds them at the model's own context budget.
Single-table: the sql-create-context eval split (question hash, eval_fraction 0.05) with a seeded --single-limit
sample. Both through `sqltune eval --model`, the evaluation users run, with joins completed from the foreign keys as
`ask` and `serve` answer (`--no-complete-joins`: the model's own SQL). A training run records its wall and
CPU minutes (this process's children), peak RSS and tokens/s from its JSON log lines. Results merge by label
into benchmarks/results/spider_quality.json, with a plot of EX against training minutes. Figures are
reported, never asserted; say what else ran on the machine when you quote them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
SPIDER = SHARED / "spider-train"
SINGLE = SHARED / "sql-create-context" / "train.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def sqltune(*args: str, log: Path | None = None) -> None:
    with open(log or os.devnull, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "sqltune", *args], cwd=ROOT, text=True, stdout=out,
                              stderr=subprocess.STDOUT, env={**os.environ, "SQLTUNE_NO_PROGRESS": "1"})
    if proc.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"sqltune {' '.join(args[:2])} failed ({proc.returncode}):\n{tail}")


def flag(field: str, value: str) -> str:
    """`db_keys=false` -> `--no-db-keys` (a true/false field is a switch); `max_steps=300` -> `--max-steps=300`."""
    name = field.replace("_", "-")
    if value.lower() in ("true", "false"):
        return f"--{name}" if value.lower() == "true" else f"--no-{name}"
    return f"--{name}={value}"


def train(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    out = work / "model"
    sets = [flag(*s.split("=", 1)) for s in args.set]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    log = work / "train.log"
    sqltune("finetune", "--config", args.config, "--output", str(out), *sets, log=log)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    speeds = [e["tokens_per_s"] for e in events if "tokens_per_s" in e]
    meta = json.loads((out / "sqltune.json").read_text())
    figures = {"wall_minutes": round((time.time() - started) / 60, 2),
               "cpu_minutes": round((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60, 2),
               "peak_rss_mb": round((after.ru_maxrss) / 1024, 1), "tokens_per_s": round(statistics.median(speeds), 1)
               if speeds else None, "steps": meta["metrics"]["steps"], "train_runtime_s": meta["metrics"]["train_runtime_s"],
               "cut_short": meta["metrics"].get("cut_short"), "heldout": meta["metrics"].get("heldout", {}),
               "config": args.config, "set": args.set}
    figures["heldout"] = {k: v for k, v in figures["heldout"].items() if k != "samples"}
    return out, figures


def evaluate(model: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from sqltune.data.loading import table_kind

    spider_dir, single_dir = work / "spider-report", work / "single-report"
    common = ["--model", str(model), "--split", "eval", "--seed", "42"]
    decoding = (["--constrain", args.constrain] if args.constrain != "off" else []) + \
        ([] if args.complete_joins else ["--no-complete-joins"])
    sqltune("eval", *common, "--dataset", f"spider:{SPIDER}", "--limit", str(args.spider_limit),
            "--report-dir", str(spider_dir), *(["--db-context-chars", str(args.context_chars)] if args.context_chars else []),
            *(["--candidates", str(args.candidates)] if args.candidates > 1 else []), *decoding,
            log=work / "eval-spider.log")
    sqltune("eval", *common, "--dataset", str(SINGLE), "--eval-fraction", "0.05", "--limit", str(args.single_limit),
            "--report-dir", str(single_dir), *decoding, log=work / "eval-single.log")
    spider = json.loads((spider_dir / "report.json").read_text())["results"]
    single_rows = [json.loads(line) for line in (single_dir / "predictions.jsonl").read_text().splitlines() if line]
    single_rows = [r for r in single_rows if r["gold_ok"] and table_kind(r["context"], r["gold"]) == "single_table"]

    def ex(block: dict[str, Any]) -> dict[str, Any]:
        return {"ex": block["ex"]["value"], "n": block["ex"]["total"]}

    joins = [json.loads(line) for line in (spider_dir / "predictions.jsonl").read_text().splitlines() if line]
    completed = [r for r in joins if r.get("model_sql")]
    return {"held_out_databases": {"all": {"ex": spider["metrics"]["ex"]["value"], "n": spider["scored"]},
                                   **{k: ex(v) for k, v in spider.get("by_kind", {}).items()},
                                   "by_hardness": {k: ex(v) for k, v in spider.get("by_hardness", {}).items()},
                                   "by_database": {k: ex(v) for k, v in spider.get("by_database", {}).items()},
                                   "executable": spider["metrics"]["executable"]["value"],
                                   "joins_completed": {"answers": len(completed), "right": sum(bool(r["ex"]) for r in completed)}},
            "single_table_eval_split": {"ex": round(sum(bool(r["ex"]) for r in single_rows) / max(1, len(single_rows)), 4),
                                        "n": len(single_rows)},
            "join_examples": [{"question": r["question"], "predicted": r["predicted"], "gold": r["gold"], "ex": r["ex"]}
                              for r in joins if " join " in r["gold"].lower()][:4]}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in results.items():
        minutes = (r.get("training") or {}).get("wall_minutes")
        if minutes is None:
            continue
        for key, marker in (("all", "o"), ("multi_table", "s")):
            value = r["held_out_databases"].get(key, {}).get("ex")
            if value is not None:
                ax.scatter(minutes, 100 * value, marker=marker, label=f"{label} ({key})")
    ax.set_xlabel("minutes of the training job (2 CPU cores)")
    ax.set_ylabel("EX on held-out databases (%)")
    if ax.get_legend_handles_labels()[0]:  # only models this script trained have minutes
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--model", help="A finished model folder to score.")
    p.add_argument("--config", help="A recipe to train (then score).")
    p.add_argument("--set", action="append", default=[], help="field=value over the config (repeatable).")
    p.add_argument("--spider-limit", type=int, default=-1, help="Held-out questions scored (-1 = all 493).")
    p.add_argument("--single-limit", type=int, default=200)
    p.add_argument("--context-chars", type=int, default=0, help="Context budget; 0 = the model's own.")
    p.add_argument("--candidates", type=int, default=1,
                   help="Answers per held-out question, the one whose rows most of them return scored (ask's vote).")
    p.add_argument("--constrain", default="off", choices=["off", "schema", "schema+values"],
                   help="Decode both evaluations under the grammar of each question's schema (ask's --constrain).")
    p.add_argument("--no-complete-joins", dest="complete_joins", action="store_false",
                   help="Score the model's own SQL, its joins not completed from the foreign keys (eval's flag).")
    p.add_argument("--work", default="", help="Working folder (default: a new one under /tmp).")
    p.add_argument("--out", default=str(RESULTS / "spider_quality.json"))
    args = p.parse_args()
    if not SPIDER.is_dir():
        print(f"skipped: {SPIDER} is not here")
        return 0
    if bool(args.model) == bool(args.config):
        p.error("pass --model or --config")
    work = Path(args.work or f"/tmp/spider_quality-{args.label}")
    work.mkdir(parents=True, exist_ok=True)
    training = None
    model = Path(args.model) if args.model else None
    if args.config:
        model, training = train(args, work)
    result = {"label": args.label, "model": str(model), "training": training, "candidates": args.candidates,
              "constrain": args.constrain, "complete_joins": args.complete_joins,
              **evaluate(model, work, args),
              "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()}}
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results[args.label] = result
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    h, s = result["held_out_databases"], result["single_table_eval_split"]
    print(f"{args.label}: held-out databases EX {h['all']['ex']:.1%} of {h['all']['n']} (multi-table "
          f"{h.get('multi_table', {}).get('ex', 0):.1%}, single-table {h.get('single_table', {}).get('ex', 0):.1%}); "
          f"single-table eval split {s['ex']:.1%} of {s['n']}" +
          (f"; trained {training['wall_minutes']} min, {training['cpu_minutes']} CPU-min, peak RSS "
           f"{training['peak_rss_mb']} MB, {training['tokens_per_s']} tokens/s" if training else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
