"""What POST /v1/ask adds over POST /v1/sql on a real SQLite file, for a query that returns 1,000 rows.

    python benchmarks/ask_latency.py                         # trains a tiny model first (about a minute)
    python benchmarks/ask_latency.py --model models/sqltune-sql --requests 40

/v1/ask is /v1/sql's work (prompt, generation, the SQL read out of the completion) plus its own: the
context chosen from the database's schema (`schema_s` in its answer), the dialect translation and gate,
one read-only query on the database, and the rows in the reply. Which SQL a model writes is the model's
business, so the database part is measured on given SQL that returns exactly --rows rows
(`{"question", "sql"}`: the same translation, gate, runner and reply, no generation), against the
round trip of the cheapest keyed request (the floor every request pays):

    added = p50(/v1/ask with that SQL) - p50(floor) + p50(schema_s of /v1/ask with a question)

The whole requests are timed too: /v1/sql and /v1/ask with the same question, whatever SQL the model
writes. Requests alternate between the kinds, one at a time, on one keep-alive connection.
Target: added < 50 ms. Results: benchmarks/results/ask_latency.json. Reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
QUESTION = "What are the dates and totals of the orders that shipped?"


def shop(path: Path, orders: int) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE customers (id INTEGER PRIMARY KEY, name VARCHAR(40), city VARCHAR(40));
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers (id),
                             order_date DATE, total REAL, status VARCHAR(12));""")
    conn.executemany("INSERT INTO customers VALUES (?, ?, ?)", [(i, f"customer {i}", f"city {i % 17}")
                                                               for i in range(1, 201)])
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)",
                     [(i, 1 + i % 200, f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}", round(5 + (i * 37) % 200, 2),
                       "shipped" if i % 3 else "pending") for i in range(1, orders + 1)])
    conn.commit()
    conn.close()
    return path


def tiny_model() -> str:
    out = Path(tempfile.mkdtemp(prefix="ask-latency-model-")) / "model"
    subprocess.run([sys.executable, "-m", "sqltune", "finetune", "--model", "tiny", "--method", "full",
                    "--dataset", "synthetic:1500", "--learning-rate", "0.003", "--max-steps", "60",
                    "--train-batch-size", "16", "--save-steps", "1000", "--tiny-layers", "2",
                    "--eval-generate-limit", "0", "--output", str(out)], check=True, cwd=ROOT,
                   capture_output=True)
    return str(out)


def p50_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


def measure(url: str, context: str, sql: str, requests: int, rows: int) -> dict[str, Any]:
    import httpx

    kinds: dict[str, tuple[str, str, dict[str, Any] | None]] = {
        "floor": ("GET", "/health", None),
        "ask_given_sql": ("POST", "/v1/ask", {"question": QUESTION, "sql": sql}),
        "sql_question": ("POST", "/v1/sql", {"question": QUESTION, "context": context}),
        "ask_question": ("POST", "/v1/ask", {"question": QUESTION}),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    schema_s: list[float] = []
    last: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(requests + 3):  # the first 3 rounds warm up, uncounted
            for kind, (method, path, body) in kinds.items():
                started = time.perf_counter()
                r = client.request(method, path, json=body)
                seconds = time.perf_counter() - started
                r.raise_for_status()
                if i < 3:
                    continue
                times[kind].append(seconds)
                if kind == "ask_question":
                    schema_s.append(r.json()["timing"]["schema_s"])
                if kind.startswith("ask"):
                    last[kind] = r.json()
    given = last["ask_given_sql"]
    assert given["ok"] and given["row_count"] == rows, given.get("error")
    out: dict[str, Any] = {f"{k}_p50_ms": p50_ms(v) for k, v in times.items()}
    out["ask_schema_p50_ms"] = p50_ms(schema_s)
    out["added_p50_ms"] = round(out["ask_given_sql_p50_ms"] - out["floor_p50_ms"] + out["ask_schema_p50_ms"], 2)
    out["question_requests_difference_p50_ms"] = round(out["ask_question_p50_ms"] - out["sql_question_p50_ms"], 2)
    out["rows"] = given["row_count"]
    out["reply_bytes"] = len(json.dumps(given))
    model_answer = last["ask_question"]
    out["model_sql"] = model_answer["model_sql"]
    out["model_sql_rows"] = model_answer["row_count"] if model_answer["ok"] else f"did not run: {model_answer['error']}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="A finished model folder; default: train a tiny one first.")
    ap.add_argument("--requests", type=int, default=30, help="Timed requests of each kind.")
    ap.add_argument("--rows", type=int, default=1000, help="Rows the given SQL returns.")
    args = ap.parse_args(argv)

    from sqltune.serve.process import ServerProcess

    model = args.model or tiny_model()
    work = Path(tempfile.mkdtemp(prefix="ask-latency-"))
    db = shop(work / "shop.sqlite", orders=max(2 * args.rows, 2000))
    sql = f"SELECT id, customer_id, order_date, total, status FROM orders ORDER BY id LIMIT {args.rows}"
    server_args = ["--model", model, "--database", str(db), "--db-row-cap", str(args.rows), "--log-level", "warning"]
    with ServerProcess(server_args) as server:
        import httpx

        context = httpx.get(server.url + "/v1/database").json()["context"]
        figures = measure(server.url, context, sql, args.requests, args.rows)
    result = {"benchmark": "ask_latency", "model": model if args.model else "tiny (trained by the script)",
              "requests": args.requests, "given_sql": sql, "target_added_ms": 50, **figures,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "command": "python benchmarks/ask_latency.py" + (f" --model {args.model}" if args.model else "")
                         + (f" --requests {args.requests}" if args.requests != 30 else "")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ask_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"/v1/ask adds {figures['added_p50_ms']} ms over /v1/sql for {figures['rows']} rows (target < 50 ms); "
          f"results in {(RESULTS / 'ask_latency.json').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
