"""How fast execution accuracy scores 10,000 predictions, and how well it tells wrong from right.

    nice -n 10 python benchmarks/eval_speed.py --n 10000 --workers 2

Predictions are the gold answers of ../shared/data/sql-create-context (half as written, half
perturbed: a literal changed, a comparison flipped, a condition dropped, another column selected,
another aggregate, ASC/DESC swapped, DISTINCT toggled, or the text cut short). Gold-as-written
should score EX 1.0; perturbed ones should mostly score 0 (a perturbation can be equivalent, e.g.
MIN vs MAX of one row, so not exactly 0). Writes benchmarks/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqltune.evaluate.score import Item, Settings, iter_scores  # noqa: E402

DATA = ROOT.parent / "shared/data/sql-create-context/train.jsonl"
_NUMBER = re.compile(r"(?<![\w.])\d+(\.\d+)?(?![\w.])")
_STRING = re.compile(r"\"([^\"]+)\"|'([^']+)'")
_CMP = {" > ": " < ", " < ": " > ", " >= ": " <= ", " <= ": " >= "}
_AGG = {"MAX(": "MIN(", "MIN(": "MAX(", "COUNT(": "SUM(", "SUM(": "COUNT(", "AVG(": "SUM("}


def perturb(sql: str, context: str, rng: random.Random) -> tuple[str, str]:
    """A changed query and the name of the change; tries changes until one applies."""
    columns = sorted(set(re.findall(r"(\w+) (?:VARCHAR|INTEGER)", context)))
    changes = ["literal", "compare", "drop_condition", "column", "aggregate", "order", "distinct", "truncate"]
    rng.shuffle(changes)
    for change in changes:
        out = _apply(change, sql, columns, rng)
        if out and out != sql:
            return out, change
    return sql[: max(1, len(sql) // 2)], "truncate"


def _apply(change: str, sql: str, columns: list[str], rng: random.Random) -> str | None:
    if change == "literal":
        if m := _STRING.search(sql):
            value = m.group(1) or m.group(2)
            new = value.title() if value != value.title() else value.lower() + "x"
            return sql[: m.start()] + f'"{new}"' + sql[m.end():]
        if m := _NUMBER.search(sql.split(" WHERE ", 1)[-1]):
            offset = len(sql) - len(sql.split(" WHERE ", 1)[-1])
            return sql[: offset + m.start()] + str(int(float(m.group())) + 1) + sql[offset + m.end():]
        return None
    if change == "compare":
        for a, b in _CMP.items():
            if a in sql:
                return sql.replace(a, b, 1)
        return None
    if change == "drop_condition" and " AND " in sql:
        head, _, tail = sql.rpartition(" AND ")
        rest = tail.split(" ", 3)
        return head + (" " + rest[3] if len(rest) > 3 and rest[3].split(" ")[0] in ("GROUP", "ORDER") else "")
    if change == "column" and len(columns) > 1:
        m = re.match(r"SELECT (?:DISTINCT )?(\w+) FROM", sql)
        others = [c for c in columns if m and c != m.group(1)]
        if m and m.group(1) in columns and others:
            other = rng.choice(others)
            return sql[: m.start(1)] + other + sql[m.end(1):]
        return None
    if change == "aggregate":
        for a, b in _AGG.items():
            if a in sql:
                return sql.replace(a, b, 1)
        return None
    if change == "order":
        if " DESC" in sql:
            return sql.replace(" DESC", "", 1)
        if "ORDER BY" in sql:
            return re.sub(r"(ORDER BY [\w.()*]+)", r"\1 DESC", sql, count=1)
        return None
    if change == "distinct":
        return sql.replace("SELECT DISTINCT ", "SELECT ", 1) if "SELECT DISTINCT" in sql else \
            sql.replace("SELECT ", "SELECT DISTINCT ", 1)
    if change == "truncate":
        return sql[: max(1, int(len(sql) * 0.7))]
    return None


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="Predictions to score.")
    parser.add_argument("--workers", type=int, default=2, help="Scoring processes.")
    parser.add_argument("--databases", type=int, default=3, help="Databases per example (K).")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/eval_speed.json"))
    args = parser.parse_args(argv)
    if not DATA.is_file():
        print(f"no data at {DATA}; put sql-create-context train.jsonl there", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in DATA.open()]
    rng = random.Random(0)
    items, kinds = [], []
    for i in range(args.n):
        row = rows[i % len(rows)]
        if i % 2 == 0:
            pred, kind = row["answer"], "gold"
        else:
            pred, kind = perturb(row["answer"], row["context"], rng)
        items.append(Item(i, row["question"], row["context"], row["answer"], pred))
        kinds.append(kind)
    settings = Settings(databases=args.databases)
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    records = list(iter_scores(items, settings, workers=args.workers))
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu_before  # the pool has exited, so its children's time is counted
    scored = [(r, k) for r, k in zip(records, kinds, strict=True) if r["gold_ok"]]
    by_kind: dict[str, list[bool]] = {}
    for r, k in scored:
        by_kind.setdefault(k, []).append(bool(r["ex"]))
    result = {
        "predictions": args.n, "workers": args.workers, "databases": args.databases, "cpu_count": os.cpu_count(),
        "seconds": round(seconds, 2), "per_second": round(args.n / seconds, 1),
        "cpu_seconds": round(cpu, 2), "load_average_1m": round(os.getloadavg()[0], 2),
        # on a shared machine wall time includes others' work; CPU time / workers is the idle-machine wall time
        "projected_idle_seconds": round(cpu / max(1, args.workers), 2),
        "gold_ran_share": round(len(scored) / len(records), 4),
        "ex_by_prediction_kind": {k: {"n": len(v), "ex": round(sum(v) / len(v), 4)} for k, v in sorted(by_kind.items())},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"EX on {args.n} predictions: {seconds:.1f} s wall with {args.workers} workers "
          f"(load {result['load_average_1m']}), {cpu:.1f} s CPU -> {result['projected_idle_seconds']} s on "
          f"{args.workers} idle cores; target 60 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
