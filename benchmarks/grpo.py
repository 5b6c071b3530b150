"""GRPO against continued SFT at equal minutes, from the demo model: EX on held-out databases, the reward curve,
each step's seconds split into generation / reward / update, peak RSS.

    make demo && nice -n 10 python benchmarks/grpo.py --minutes 10 30 --eval-limit 200
    python benchmarks/grpo.py --minutes 3 --eval-limit 60 --tag short        # a short run on a busy machine

For each budget M: `sqltune finetune --config configs/smollm2-135m-grpo-cpu.yaml --max-train-minutes M` (GRPO), and
`sqltune finetune --method full` from the same model on the same rows for M minutes (continued SFT, the demo
recipe's settings). The start model and both results are then scored on the same held-out questions:
  multi-table   Spider's eval split (its databases never trained on), executed on each question's real database
  single-table  sql-create-context's eval split (when ../shared/data has it), on databases synthesised from the schema
by the rule the GRPO reward uses (sqltune.finetune.rewards.execute: rows equal to the gold's). Step seconds, reward
and RSS come from each run's JSON log lines. Writes benchmarks/results/grpo[-TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = ROOT / "configs" / "smollm2-135m-grpo-cpu.yaml"
SPIDER = "spider:" + str(ROOT.parent / "shared" / "data" / "spider-train")
SINGLE = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"


def finetune(args: list[str], log: Path) -> list[dict[str, Any]]:
    """Run `sqltune finetune`, keep its stderr in `log`; returns its JSON log lines."""
    env = {**os.environ, "SQLTUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, "-m", "sqltune", "finetune", *args], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.DEVNULL, stderr=fh)
    if proc.returncode != 0:
        raise SystemExit(f"sqltune finetune failed ({proc.returncode}); see {log}")
    events = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return events


def step_figures(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds per step by phase (the first step, with its warm-up, left out), the reward curve, peak RSS."""
    steps = [e for e in events if e.get("message") == "train step"]
    timed = [e for e in steps[1:] if "generation_s" in e] or [e for e in steps if "generation_s" in e]
    out: dict[str, Any] = {"steps": steps[-1]["step"] if steps else 0}
    if timed:
        for key in ("step_s", "generation_s", "reward_s", "update_s"):
            out[key] = round(statistics.median(e[key] for e in timed), 3)
        out["reward_share"] = round(sum(e["reward_s"] for e in timed) / sum(e["step_s"] for e in timed), 4)
        out["reward_curve"] = [{k: e.get(k) for k in ("step", "reward", "ex", "zero_std_groups", "kl",
                                                      "completion_length")} for e in steps]
    else:
        out["loss_curve"] = [{"step": e["step"], "loss": e["loss"]} for e in steps]
    done = [e for e in events if e.get("message") == "finetune finished"]
    out["peak_rss_mb"] = done[-1].get("peak_rss_mb") if done else None
    out["wall_s"] = done[-1].get("wall_s") if done else None
    return out


def heldout(dataset: str, limit: int, seed: int, context_chars: int) -> list[Any]:
    from sqltune.data import loading

    # contexts cut to the start model's schema budget, as its training and `ask` cut them
    splits = loading.load_splits(dataset, eval_fraction=0.05, seed=seed,
                                 db=loading.DatabaseOptions(context_chars=context_chars))
    rows = splits.eval
    if 0 < limit < len(rows):
        import random

        rows = random.Random(seed).sample(rows, limit)
    return rows


def execution_accuracy(model: Path, rows: list[Any]) -> dict[str, Any]:
    """Greedy SQL of `model` for the rows, executed as the reward executes it; EX over rows whose gold runs."""
    from sqltune.engines import batch
    from sqltune.finetune import rewards

    with batch.open_model(str(model), engine="transformers", batch_size=16) as llm:
        predicted = llm.generate_sql([(ex.question, ex.context) for ex in rows])
    scorer = rewards.Scorer(rewards.Limits(timeout_s=2.0), workers=2)
    try:
        outcomes = scorer.score([rewards.Task(p, ex.answer, ex.context, ex.database, ex.question)
                                 for p, ex in zip(predicted, rows, strict=True)])
    finally:
        scorer.close()
    scored = [o for o in outcomes if o.gold_ok]
    return {"ex": round(sum(o.ex for o in scored) / len(scored), 4) if scored else None,
            "runs": round(sum(o.executable for o in scored) / len(scored), 4) if scored else None,
            "questions": len(scored)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-sql"), help="the start model (the demo's)")
    p.add_argument("--minutes", type=float, nargs="+", default=[10.0, 30.0])
    p.add_argument("--eval-limit", type=int, default=200, help="held-out questions of each kind")
    p.add_argument("--dataset-limit", type=int, default=-1, help="training rows (seeded subset); -1 = all")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--learning-rate", type=float, default=5e-6, help="GRPO's")
    p.add_argument("--sft-learning-rate", type=float, default=1e-5, help="continued SFT's")
    p.add_argument("--skip-sft", action="store_true")
    p.add_argument("--tag", default="")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "grpo"))
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    start, work = Path(args.model), Path(args.work)
    if not (start / "manifest.json").is_file():
        raise SystemExit(f"{start} is not a finished sqltune model: run `make demo` first, or pass --model")
    work.mkdir(parents=True, exist_ok=True)
    # the minutes stop training, not the steps; a warm-up as a share of 100,000 steps would never end
    common = ["--dataset", SPIDER, "--dataset-limit", str(args.dataset_limit), "--eval-generate-limit", "0",
              "--report-to", "none", "--seed", str(args.seed), "--max-steps", "100000", "--save-steps", "1000",
              "--warmup-ratio", "0"]
    from sqltune.artifacts import manifests

    chars = int((manifests.read_meta(start).get("config") or {}).get("db_context_chars") or 6000)
    multi = heldout(SPIDER, args.eval_limit, args.seed, chars)
    single = heldout(str(SINGLE), args.eval_limit, args.seed, chars) if SINGLE.is_file() else []
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/grpo.py", *sys.argv[1:]]), "start_model": str(start),
        "host_cpus": os.cpu_count(), "db_context_chars": chars, "omp_threads": os.environ.get("OMP_NUM_THREADS", "2"),
        "settings": {"num_generations": args.num_generations, "temperature": args.temperature,
                     "learning_rate": args.learning_rate, "sft_learning_rate": args.sft_learning_rate,
                     "dataset_limit": args.dataset_limit},
        "heldout": {"multi_table": len(multi), "single_table": len(single)}, "runs": []}

    def score(model: Path) -> dict[str, Any]:
        t0 = time.time()
        out = {"multi_table": execution_accuracy(model, multi)}
        if single:
            out["single_table"] = execution_accuracy(model, single)
        out["eval_s"] = round(time.time() - t0, 1)
        return out

    # the start model's score, kept beside the runs: the same model, questions and budget give the same figures
    cached = work / f"start-{args.eval_limit}-{args.seed}-{chars}.json"
    stamp = (start / "model.safetensors").stat().st_mtime if (start / "model.safetensors").exists() else 0
    kept = json.loads(cached.read_text()) if cached.is_file() else {}
    if kept.get("stamp") == stamp:
        result["start"] = kept["score"]
    else:
        result["start"] = score(start)
        cached.write_text(json.dumps({"stamp": stamp, "score": result["start"]}))
    print(json.dumps({"start": result["start"]}))
    for minutes in args.minutes:
        out = work / f"grpo-{minutes:g}"
        events = finetune(["--config", str(RECIPE), "--model", str(start), "--output", str(out), *common,
                           "--max-train-minutes", str(minutes), "--learning-rate", str(args.learning_rate),
                           "--grpo-num-generations", str(args.num_generations), "--train-batch-size",
                           str(args.num_generations), "--grpo-temperature", str(args.temperature),
                           "--resume", "never"], work / f"grpo-{minutes:g}.log")
        run = {"method": "grpo", "minutes": minutes, **step_figures(events), **score(out)}
        result["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "reward_curve"}))
        if args.skip_sft:
            continue
        out = work / f"sft-{minutes:g}"
        events = finetune(["--model", str(start), "--method", "full", "--output", str(out), *common,
                           "--max-train-minutes", str(minutes), "--learning-rate", str(args.sft_learning_rate),
                           "--lr-scheduler-type", "constant_with_warmup", "--train-batch-size", "8",
                           "--max-seq-length", "512", "--logging-steps", "5", "--resume", "never"],
                          work / f"sft-{minutes:g}.log")
        run = {"method": "sft", "minutes": minutes, **step_figures(events), **score(out)}
        result["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "loss_curve"}))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"grpo{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
