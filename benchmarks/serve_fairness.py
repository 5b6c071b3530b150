"""A bystander's /v1/sql latency, idle and while one client holds the engine within the limits.

    python benchmarks/serve_fairness.py --model /path/to/tiny-model [--engine transformers] [--out NAME]

A real `sqltune serve` on 127.0.0.1. The attacks (issue 26): (a) one /v1/completions with n=16 and
max_tokens = min_tokens = 1024 (fewer where the model's context is shorter: it must fit), (b) four
/v1/sql with candidates=16 at once. While each runs, the bystander sends plain /v1/sql requests one
after another; the target is a median within 3x of idle. Saves benchmarks/results/serve_fairness*.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx

from sqltune.serve.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "CREATE TABLE head (age INTEGER, name VARCHAR)"
BYSTANDER = {"question": "How many heads are older than 56?", "context": SCHEMA, "max_tokens": 48}


def bystander(url: str, count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        r = httpx.post(url + "/v1/sql", json=BYSTANDER, timeout=300)
        r.raise_for_status()
        out.append(time.perf_counter() - started)
    return out


def in_flight(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("sqltune_sequences_in_flight "):
            return float(line.split()[1])
    return 0.0


def under(url: str, attack: list[tuple[str, dict]], expect: int, count: int) -> dict:
    done: list[float] = []
    clients = []
    for path, body in attack:
        def hit(path: str = path, body: dict = body) -> None:
            started = time.perf_counter()
            httpx.post(url + path, json=body, timeout=600)
            done.append(time.perf_counter() - started)
        clients.append(threading.Thread(target=hit, daemon=True))
    for c in clients:
        c.start()
    deadline = time.monotonic() + 60
    while in_flight(url) < expect and time.monotonic() < deadline:
        time.sleep(0.05)
    times = bystander(url, count)
    attack_running = len(done) < len(attack)
    for c in clients:
        c.join()
    return {"bystander_s": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
            "attack_still_running_when_bystander_done": attack_running, "attack_s": [round(t, 2) for t in done]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--engine", default="transformers")
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--out", default="serve_fairness")
    args = ap.parse_args()
    with ServerProcess(["--model", args.model, "--engine", args.engine, "--max-tokens-limit", "1024"]) as server:
        url = server.url
        bystander(url, 2)  # warm
        idle = bystander(url, 5)
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
        tokens = min(1024, int(models.get("max_model_len") or 1024) - 64)
        prompt = f"-- {SCHEMA}\n-- How many heads?\nSELECT"
        flood = {"prompt": prompt, "n": 16, "max_tokens": tokens, "min_tokens": tokens}
        candidates = {**BYSTANDER, "candidates": 16}
        results = {"engine": args.engine, "model": Path(args.model).name, "idle_s": [round(t, 3) for t in idle],
                   "idle_median_s": round(statistics.median(idle), 3), "flood_tokens": tokens,
                   "completions_n16": under(url, [("/v1/completions", flood)], 8, args.count),
                   "sql_4x_candidates16": under(url, [("/v1/sql", candidates)] * 4, 8, args.count)}
    for name in ("completions_n16", "sql_4x_candidates16"):
        results[name]["x_idle"] = round(results[name]["median_s"] / results["idle_median_s"], 2)
    out = ROOT / "benchmarks" / "results" / f"{args.out}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"saved {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
