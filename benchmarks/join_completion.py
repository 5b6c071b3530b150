"""What completing joins from the foreign keys (sqltune.sql.joins) does to answers a model already wrote.

    python benchmarks/join_completion.py /tmp/spider_quality-*/spider-report

Each argument is a report folder of `sqltune eval` on the held-out Spider databases (what
benchmarks/spider_quality.py writes, under --no-complete-joins or from before completion existed: its
`model_sql`, else `predicted`, is the model's own SQL). Its answers are written out twice, as the model
wrote them and completed against each question's context, and both files are scored by `sqltune eval
--predictions` on the same questions, contexts and databases. No model runs, so the difference is the
completion's alone. Results merge by run label (the report's folder name) into benchmarks/results/join_completion.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SPIDER = ROOT.parent / "shared" / "data" / "spider-train"
RESULTS = ROOT / "benchmarks" / "results"


def score(rows: list[dict[str, Any]], report: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    preds = work / f"{name}.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chars = report["config"]["db_context_chars"]
    out = work / f"{name}-report"
    done = subprocess.run([sys.executable, "-m", "sqltune", "eval", "--predictions", str(preds), "--dataset", f"spider:{SPIDER}",
                           "--split", "eval", "--seed", str(report["config"]["seed"]), "--limit", str(len(rows)),
                           "--db-context-chars", str(chars), "--db-keys" if report["config"]["db_keys"] else "--no-db-keys",
                           "--report-dir", str(out)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"sqltune eval failed:\n{done.stderr[-2000:]}")
    res = json.loads((out / "report.json").read_text())["results"]
    kinds = res.get("by_kind", {})
    return {"ex": res["metrics"]["ex"]["value"], "n": res["scored"], "executable": res["metrics"]["executable"]["value"],
            **{k: kinds[k]["ex"]["value"] for k in ("single_table", "multi_table") if k in kinds},
            "by_hardness": {k: v["ex"]["value"] for k, v in res.get("by_hardness", {}).items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="Report folders of `sqltune eval` on spider:DIR --split eval.")
    p.add_argument("--out", default=str(RESULTS / "join_completion.json"))
    args = p.parse_args()
    if not SPIDER.is_dir():
        print(f"skipped: {SPIDER} is not here")
        return 0
    from sqltune.sql.joins import with_joins

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for folder in map(Path, args.reports):
        report = json.loads((folder / "report.json").read_text())
        records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line]
        own = [{"question": r["question"], "context": r["context"], "predicted": r.get("model_sql") or r["predicted"]}
               for r in records]
        completed = [{**r, "predicted": with_joins(r["predicted"], r["context"])} for r in own]
        with tempfile.TemporaryDirectory() as tmp:
            result = {"model": report["source"].get("path") or report["source"].get("model"),
                      "changed": sum(a["predicted"] != b["predicted"] for a, b in zip(own, completed, strict=True)),
                      "model_sql": score(own, report, Path(tmp), "own"),
                      "completed": score(completed, report, Path(tmp), "completed")}
        label = folder.parent.name if folder.name == "spider-report" else folder.name
        results[label.removeprefix("spider_quality-")] = {"report": str(folder), **result}
        a, b = result["model_sql"], result["completed"]
        print(f"{folder}: {result['changed']} of {a['n']} answers completed; EX {a['ex']:.1%} -> {b['ex']:.1%} "
              f"(multi-table {a.get('multi_table', 0):.1%} -> {b.get('multi_table', 0):.1%}, single-table "
              f"{a.get('single_table', 0):.1%} -> {b.get('single_table', 0):.1%}); answers that run "
              f"{a['executable']:.1%} -> {b['executable']:.1%}")
        out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
