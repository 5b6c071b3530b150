"""Turn per-example records into a report: metrics with counts, breakdowns, the gold self-check,
a Markdown summary, a PNG chart of EX by category, and a side-by-side comparison of reports.

Every rate is stored with its count and denominator ({"value": 0.62, "count": 310, "total": 500}),
so shard reports merge exactly and a reader can see how many examples a figure rests on.
Examples whose gold query fails on its own context are dataset errors: counted and listed by
kind, and left out of every denominator.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from sqltune.evaluate.candidates import summary as candidate_summary

REPORT_VERSION = 1
LEVELS = ("single_table", "multi_table", "easy", "medium", "hard", "extra")  # breakdowns in this order
METRICS = ("ex", "em_raw", "em_norm", "valid", "executable", "schema_ok")
LABELS = {"ex": "execution accuracy (EX)", "em_raw": "exact match, raw", "em_norm": "exact match, normalised",
          "valid": "valid SQL (parses)", "executable": "executable", "schema_ok": "schema adherence"}
BREAKDOWN_METRICS = ("ex", "em_norm", "executable")


def rate(count: int, total: int) -> dict[str, Any]:
    return {"value": round(count / total, 4) if total else 0.0, "count": count, "total": total}


def _metric_block(records: Sequence[dict[str, Any]], names: Iterable[str] = METRICS) -> dict[str, Any]:
    return {name: rate(sum(1 for r in records if r[name]), len(records)) for name in names}


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics, breakdowns and the gold self-check of a list of scored records."""
    scored = [r for r in records if r["gold_ok"]]
    failed = [r for r in records if not r["gold_ok"]]
    by_category: dict[str, list[dict[str, Any]]] = {}
    by_source: dict[str, list[dict[str, Any]]] = {}
    for r in scored:
        for cat in r["categories"]:
            by_category.setdefault(cat, []).append(r)
        by_source.setdefault(r["source"], []).append(r)
    return {
        "examples": len(records),
        "scored": len(scored),
        "metrics": _metric_block(scored),
        "by_category": {k: {"n": len(v), **_metric_block(v, BREAKDOWN_METRICS)} for k, v in sorted(by_category.items())},
        "by_source": {k: {"n": len(v), **_metric_block(v, BREAKDOWN_METRICS)} for k, v in sorted(by_source.items())},
        **_row_breakdowns(scored),
        "prediction_errors": dict(Counter(r["error_kind"] for r in scored if r["error_kind"]).most_common()),
        "timed_out": sum(1 for r in scored if r["timed_out"]),
        "candidates": candidate_summary(records),
        "joins_completed": _completed(scored),
        "gold_check": {
            "gold_ran": rate(len(scored), len(records)),
            "dataset_errors": len(failed),
            "dataset_errors_by_kind": dict(Counter(r["gold_error_kind"] for r in failed).most_common()),
            "dataset_error_examples": [{"index": r["index"], "gold": r["gold"], "error": r["gold_error"]}
                                       for r in failed[:20]],
            # EX can only tell queries apart when the gold query selects something somewhere
            "gold_selects_nothing": rate(sum(1 for r in scored if r["gold_empty"]), len(scored)),
        },
    }


def _row_breakdowns(scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """EX by kind of question (single- / multi-table), Spider hardness and database, where records carry them
    (rows scored on their own databases, sqltune.evaluate.row_databases)."""
    out: dict[str, Any] = {}
    for key, name in (("kind", "by_kind"), ("hardness", "by_hardness"), ("db_id", "by_database")):
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in scored:
            if r.get(key):
                groups.setdefault(r[key], []).append(r)
        if groups:
            order = sorted(groups, key=lambda g: (LEVELS.index(g) if g in LEVELS else len(LEVELS), g))
            out[name] = {g: {"n": len(groups[g]), "ex": rate(sum(1 for r in groups[g] if r["ex"]), len(groups[g]))}
                         for g in order}
    return out


def pct(block: dict[str, Any]) -> str:
    return f"{100 * block['value']:.1f}% ({block['count']}/{block['total']})"


def _where(report: dict[str, Any]) -> str:
    """What the queries ran on: the real database (engine, server, URL without password), or synthesised ones."""
    db = report.get("database")
    if db:
        return f"on the real {db.get('engine', '?')} database {db.get('database', '?')}, {db.get('server_version', '')}"
    return f"{report['settings']['databases']} databases per example"


def _completed(scored: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Answers whose joins were completed (sqltune.sql.joins): the model's own SQL named a column its tables
    lack, so it could not run, and completion only ever changes such SQL. EX of the model's own SQL is then
    EX less the completed answers that are right (greedy answers only: a vote among candidates as written
    could have chosen another one, so it is not given)."""
    done = [r for r in scored if r.get("model_sql")]
    if not done:
        return None
    right = sum(1 for r in done if r["ex"])
    voted = any(r.get("candidates") for r in scored)
    return {"answers": len(done), "right": right,
            "ex_model_sql": None if voted else rate(sum(1 for r in scored if r["ex"]) - right, len(scored))}


def markdown(report: dict[str, Any]) -> str:
    """The summary printed at the end of `sqltune eval` and saved as summary.md."""
    res = report["results"]
    src = report.get("source", {})
    lines = [f"# sqltune eval: {src.get('name', '?')}", "",
             f"{res['scored']} examples scored of {res['examples']} "
             f"(dataset {report.get('dataset', {}).get('source', '?')}, split {report.get('dataset', {}).get('split', '?')}; "
             f"{_where(report)}).", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {LABELS[m]} | {pct(res['metrics'][m])} |" for m in METRICS]
    gc = res["gold_check"]
    lines += ["", f"Gold self-check: {pct(gc['gold_ran'])} of gold queries run on their own context; "
              f"{gc['dataset_errors']} dataset errors excluded {gc['dataset_errors_by_kind'] or ''}; "
              f"gold selects nothing on any database for {pct(gc['gold_selects_nothing'])}.", ""]
    for title, key in (("By query feature", "by_category"), ("By source", "by_source")):
        lines += [f"## {title}", "", "| category | n | EX | EM (norm) | executable |", "|---|---|---|---|---|"]
        for name, row in res[key].items():
            lines.append(f"| {name} | {row['n']} | {100 * row['ex']['value']:.1f}% | "
                         f"{100 * row['em_norm']['value']:.1f}% | {100 * row['executable']['value']:.1f}% |")
        lines.append("")
    for title, key in (("By kind of question", "by_kind"), ("By Spider hardness", "by_hardness"),
                       ("By database", "by_database")):
        if res.get(key):
            lines += [f"## {title}", "", "| | n | EX |", "|---|---|---|"]
            lines += [f"| {name} | {row['n']} | {pct(row['ex'])} |" for name, row in res[key].items()] + [""]
    votes = res.get("candidates")
    if votes:
        lines += [f"Answers chosen among {votes['k']} candidates by execution: EX {pct(votes['ex'])} against "
                  f"{pct(votes['ex_greedy'])} for the greedy answer; {votes['changed']} answers changed "
                  f"({votes['gained']} gained, {votes['lost']} lost), {votes['fallback']} with no candidate that ran; "
                  f"on average {votes['mean_ran']} ran and {votes['mean_agreed']} agreed.", ""]
    joined = res.get("joins_completed")
    if joined:
        own = joined["ex_model_sql"]
        lines += [f"Joins completed from the foreign keys in {joined['answers']} answers, {joined['right']} of them now "
                  f"right" + (f": EX {pct(res['metrics']['ex'])} against {pct(own)} for the model's own SQL "
                              "(--no-complete-joins)." if own else "."), ""]
    if res["prediction_errors"]:
        lines += ["Prediction errors: " + ", ".join(f"{k} {v}" for k, v in res["prediction_errors"].items()), ""]
    return "\n".join(lines)


def chart_png(report: dict[str, Any]) -> bytes:
    """A horizontal bar chart of EX by query feature and by source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    rows = [(f"source: {k}", v) for k, v in res["by_source"].items()] + list(res["by_category"].items())
    names = [name for name, _ in rows]
    values = [100 * row["ex"]["value"] for _, row in rows]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.5))
    bars = ax.barh(names, values, color="#4C72B0")
    for bar, (_, row) in zip(bars, rows, strict=True):
        ax.text(bar.get_width() + 1, bar.get_y() + bar.get_height() / 2, f"{row['ex']['value']:.0%} (n={row['n']})",
                va="center", fontsize=8)
    ax.set_xlim(0, 115)
    ax.invert_yaxis()
    ax.set_xlabel("execution accuracy (%)")
    overall = res["metrics"]["ex"]
    ax.set_title(f"{report.get('source', {}).get('name', '')}: EX {overall['value']:.1%} overall")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def compare(reports: Sequence[dict[str, Any]], predictions: Sequence[Sequence[dict[str, Any]]] | None = None,
            *, names: Sequence[str] | None = None, max_examples: int = 10) -> str:
    """A table of two or more reports side by side, then examples where their EX disagrees."""
    names = list(names or [r.get("source", {}).get("name", f"report{i}") for i, r in enumerate(reports)])
    head = "| | " + " | ".join(names) + " |"
    sep = "|---" * (len(names) + 1) + "|"
    lines = ["## Metrics", "", head, sep]
    for m in METRICS:
        lines.append(f"| {LABELS[m]} | " + " | ".join(pct(r["results"]["metrics"][m]) for r in reports) + " |")
    for key, title in (("by_category", "EX by query feature"), ("by_source", "EX by source")):
        lines += ["", f"## {title}", "", head, sep]
        cats = sorted({c for r in reports for c in r["results"][key]})
        for cat in cats:
            cells = [r["results"][key].get(cat) for r in reports]
            lines.append(f"| {cat} | " + " | ".join(
                f"{100 * c['ex']['value']:.1f}% (n={c['n']})" if c else "-" for c in cells) + " |")
    if predictions and len(predictions) == len(reports):
        keyed = [{(p["question"], p["context"], p["gold"]): p for p in preds} for preds in predictions]
        common = set.intersection(*(set(k) for k in keyed))
        differ = [k for k in sorted(common, key=lambda k: keyed[0][k]["index"])
                  if len({bool(kd[k]["ex"]) for kd in keyed}) > 1]
        lines += ["", f"## Disagreements: {len(differ)} of {len(common)} shared examples", ""]
        for k in differ[:max_examples]:
            lines += [f"- **{k[0]}**", f"  - gold: `{k[2]}`"]
            lines += [f"  - {name} ({'right' if kd[k]['ex'] else 'wrong'}): `{kd[k]['predicted']}`"
                      for name, kd in zip(names, keyed, strict=True)]
    return "\n".join(lines)
