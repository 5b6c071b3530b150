"""Answers chosen by execution, measured: EX and wall time per question for K = 1, 4, 8 candidates.

    flock /tmp/sqltune-bench.lock python benchmarks/candidates.py --model models/smollm2-135m-sql --limit 200
    python benchmarks/candidates.py --model models/smollm2-135m-sql --limit 40 --k 1 4 --beam-limit 0   # quick look

Rows: the shared data's eval split as `sqltune eval --split eval --limit N` picks it (question hash, seeded
sample). Candidates: the transformers engine that `sqltune serve` runs (dynamic batching, --max-batch-size
rows at once, rows with the same prompt sharing one prefill), sent exactly what `--candidates K` sends:
the greedy request plus K-1 samples at --candidate-temperature / --candidate-top-p, seeds 1..K-1. Rows
decode independently, so the largest K is generated once and each smaller K votes among its first K.
The answers are voted by sqltune.sql.vote on databases synthesised from schema and question (never
the gold) and scored by the scorer of `sqltune eval`; every candidate is scored too, for the oracle
(some candidate is right). EX is split by kind of row as every EX figure is (data.loading.table_kind):
single_table (WikiSQL-style) and multi_table (Spider-style: several CREATE TABLEs or a JOIN). Time: each
K generated on its own over the first --timing-limit questions, one question after another (a user of /v1/sql or `sqltune ask`) and all at
once (`sqltune eval`). Beam search (K beams from transformers' generate: the engines stream one
sequence per request and have no beams) runs on the first --beam-limit questions, beside greedy
generate on the same rows for its time ratio. Writes benchmarks/results/candidates.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"
OUT = ROOT / "benchmarks" / "results" / "candidates.json"


def rel(path: Path | str) -> str:
    p = Path(path).resolve()
    for base, prefix in ((ROOT, ""), (ROOT.parent / "shared", "../shared/")):
        if p.is_relative_to(base):
            return prefix + str(p.relative_to(base))
    return str(Path(*p.parts[p.parts.index("models"):])) if "models" in p.parts else p.name


def examples(limit: int, seed: int) -> list[Any]:
    from sqltune import config
    from sqltune.evaluate.cli import load_examples

    cfg, sources = config.load(["--dataset", str(DATA), "--split", "eval", "--limit", str(limit), "--seed", str(seed)],
                               {})
    return load_examples(cfg, sources, {})[0]


async def generate(engine: Any, cfg: Any, prompts: list[list[int]], k: int, max_tokens: int) -> list[list[Any]]:
    """Every prompt's k candidates, all requests in flight at once (the engine batches them)."""
    from sqltune.engines.base import SamplingParams, complete

    greedy = SamplingParams(max_tokens=max_tokens, stop=tuple(engine.template.stops))
    sampled = [SamplingParams(max_tokens=max_tokens, temperature=cfg.candidate_temperature, top_p=cfg.candidate_top_p,
                              stop=tuple(engine.template.stops), seed=j) for j in range(1, k)]
    tasks = [[asyncio.create_task(complete(engine, ids, p)) for p in (greedy, *sampled)] for ids in prompts]
    return [[await t for t in row] for row in tasks]


def score(rows: list[Any], sqls: list[str]) -> list[dict[str, Any]]:
    from sqltune.evaluate.score import Item, Settings, iter_scores

    items = [Item(i, ex.question, ex.context, ex.answer, sql) for i, (ex, sql) in enumerate(zip(rows, sqls, strict=True))]
    return list(iter_scores(items, Settings(seed=42), workers=1))


def ex_block(records: list[dict[str, Any]], key: str = "ex") -> dict[str, Any]:
    scored = [r for r in records if r["gold_ok"]]
    out: dict[str, Any] = {"all": _rate(sum(bool(r[key]) for r in scored), len(scored))}
    from sqltune.data.loading import table_kind

    for kind in ("single_table", "multi_table"):
        mine = [r for r in scored if table_kind(r["context"], r["gold"]) == kind]
        out[kind] = _rate(sum(bool(r[key]) for r in mine), len(mine))
    return out


def _rate(count: int, total: int) -> dict[str, Any]:
    return {"value": round(count / total, 4) if total else 0.0, "count": count, "total": total}


def vote_k(rows: list[Any], texts: list[list[str]], errors: list[list[str]], logprobs: list[list[float]],
           k: int) -> dict[str, Any]:
    """EX of the answers voted among each question's first k candidates (k = 1: the greedy answer)."""
    from sqltune.evaluate import candidates as cands
    from sqltune.sql.vote import Candidate

    t0 = time.perf_counter()
    votes = cands.choose_all([(ex.question, ex.context) for ex in rows],
                             [[Candidate(t, lp, e) for t, e, lp in zip(ts[:k], es[:k], lps[:k], strict=True)]
                              for ts, es, lps in zip(texts, errors, logprobs, strict=True)], seed=42) if k > 1 else None
    vote_s = time.perf_counter() - t0
    records = score(rows, [v.sql for v in votes] if votes else [ts[0] for ts in texts])
    result: dict[str, Any] = {"k": k, "questions": len(rows), "ex": ex_block(records),
                              "vote_s_per_question": round(vote_s / len(rows), 4)}
    if votes:
        # the same votes with ties going to the earliest candidate (no likelihoods): what the tie-break adds
        flat = cands.choose_all([(ex.question, ex.context) for ex in rows],
                                [[Candidate(t, None, e) for t, e in zip(ts[:k], es[:k], strict=True)]
                                 for ts, es in zip(texts, errors, strict=True)], seed=42)
        result["ex_ties_to_greedy"] = ex_block(score(rows, [v.sql for v in flat]))
        greedy = score(rows, [ts[0] for ts in texts])
        for r, g in zip(records, greedy, strict=True):
            r["ex_greedy"] = g["ex"]
        result["changed"] = sum(1 for v in votes if v.chosen != 0)
        result["gained"] = sum(1 for r in records if r["ex"] and not r["ex_greedy"])
        result["lost"] = sum(1 for r in records if r["ex_greedy"] and not r["ex"])
        result["fallback"] = sum(1 for v in votes if v.fallback)
        result["mean_ran"] = round(sum(v.ran for v in votes) / len(votes), 3)
        result["mean_agreed"] = round(sum(v.agreed for v in votes) / len(votes), 3)
        result["mean_distinct_sql"] = round(sum(len(set(ts[:k])) for ts in texts) / len(texts), 3)
        # an early stop worth knowing about: when the greedy answer and the first sample are the same text, keep
        # the greedy answer and generate nothing more (only the disagreeing questions need the other k-2)
        same = [ts[0].strip() == ts[1].strip() and not es[0] for ts, es in zip(texts, errors, strict=True)]
        early = [r["ex_greedy"] if s_ else r["ex"] for r, s_ in zip(records, same, strict=True)]
        result["early_stop"] = {"stopped_at_2": sum(same), "rows_per_question": round(
            sum(2 if s_ else k for s_ in same) / len(same), 3), "ex": _rate(sum(bool(e) for e, r in zip(
                early, records, strict=True) if r["gold_ok"]), sum(1 for r in records if r["gold_ok"]))}
        every = score([ex for ex, ts in zip(rows, texts, strict=True) for _ in ts[:k]], [t for ts in texts for t in ts[:k]])
        for i, r in enumerate(records):
            r["oracle"] = any(e["ex"] for e in every[i * k:(i + 1) * k])
        result["ex_oracle"] = ex_block(records, "oracle")
    return result


def candidates_for(engine: Any, cfg: Any, rows: list[Any], k: int, max_tokens: int, *, one_at_a_time: bool
                   ) -> tuple[list[list[str]], list[list[str]], list[list[float]], float, int]:
    """(SQL, generation errors) of every question's k candidates, seconds taken, completion tokens: all
    questions in flight at once (as `sqltune eval` sends them), or one question after another (as a
    user asking /v1/sql or `sqltune ask`), each with its k requests in flight."""
    from sqltune.prompts import extract_sql

    prompts = [engine.encode(engine.template.build_prompt(ex.question, ex.context)) for ex in rows]
    t0 = time.perf_counter()
    if one_at_a_time:
        done = [row for ids in prompts for row in asyncio.run(generate(engine, cfg, [ids], k, max_tokens))]
    else:
        done = asyncio.run(generate(engine, cfg, prompts, k, max_tokens))
    seconds = time.perf_counter() - t0
    texts = [[extract_sql(c.text, engine.eos_token, engine.template) for c in row] for row in done]
    errors = [[c.error if c.finish_reason == "error" else "" for c in row] for row in done]
    logprobs = [[c.logprob for c in row] for row in done]
    return texts, errors, logprobs, seconds, sum(c.completion_tokens for row in done for c in row)


def run_beams(model: str, rows: list[Any], ks: list[int], max_tokens: int, batch: int) -> dict[str, Any]:
    """K beams per question with transformers' generate, and greedy generate on the same rows for the ratio."""
    import torch

    from sqltune import generation
    from sqltune.evaluate import candidates as cands
    from sqltune.prompts import extract_sql
    from sqltune.sql.vote import Candidate

    loaded = generation.load(model)
    tok = loaded.tokenizer
    eos = loaded.model.generation_config.eos_token_id or tok.eos_token_id
    out: dict[str, Any] = {"questions": len(rows), "batch": batch}
    prompts = [loaded.template.build_prompt(ex.question, ex.context) for ex in rows]
    for k in [1, *ks]:
        t0 = time.perf_counter()
        texts: list[list[str]] = []
        scores: list[list[float]] = []
        for s in range(0, len(prompts), batch):
            enc = generation.encode_batch(tok, prompts[s:s + batch]).to(loaded.device)
            with torch.inference_mode():
                gen = loaded.model.generate(**enc, max_new_tokens=max_tokens, num_beams=k, num_return_sequences=k,
                                            do_sample=False, temperature=None, top_p=None, top_k=None,
                                            pad_token_id=tok.pad_token_id, eos_token_id=eos,
                                            return_dict_in_generate=True, output_scores=k > 1,
                                            early_stopping=True if k > 1 else False)
            new = gen.sequences[:, enc["input_ids"].shape[1]:]
            decoded = [extract_sql(tok.decode(row, skip_special_tokens=True), tok.eos_token, loaded.template)
                       for row in new.tolist()]
            seq_scores = gen.sequences_scores.tolist() if k > 1 else [0.0] * len(decoded)
            for i in range(0, len(decoded), k):
                texts.append(decoded[i:i + k])
                scores.append(seq_scores[i:i + k])
        t1 = time.perf_counter()
        if k == 1:
            chosen = [t[0] for t in texts]
        else:  # beams come best first; their length-normalised scores break ties
            votes = cands.choose_all([(ex.question, ex.context) for ex in rows],
                                     [[Candidate(t, s) for t, s in zip(ts, ss, strict=True)]
                                      for ts, ss in zip(texts, scores, strict=True)], seed=42)
            chosen = [v.sql for v in votes]
        t2 = time.perf_counter()
        records = score(rows, chosen)
        entry = {"ex": ex_block(records), "wall_s_per_question": round((t2 - t0) / len(rows), 3),
                 "seconds": {"generate": round(t1 - t0, 2), "vote": round(t2 - t1, 2)}}
        if k > 1:
            top = score(rows, [t[0] for t in texts])
            entry["ex_top_beam"] = ex_block(top)
            entry["mean_distinct_sql"] = round(sum(len(set(t)) for t in texts) / len(texts), 3)
        out[f"k{k}" if k > 1 else "greedy"] = entry
        print(f"beams k={k}: {json.dumps(entry)}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="A finished model folder.")
    ap.add_argument("--limit", type=int, default=200, help="Questions of the eval split.")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8], help="Candidates per question, one run each.")
    ap.add_argument("--timing-limit", type=int, default=16, help="Questions each K is timed on by itself.")
    ap.add_argument("--beam-limit", type=int, default=16, help="Questions for the beam-search comparison (0: none).")
    ap.add_argument("--beam-k", type=int, nargs="+", default=[4])
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=None, help="Default: the config's candidate_temperature.")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    import torch

    from sqltune import config, prompts
    from sqltune.artifacts import manifests
    from sqltune.engines.transformers_engine import TransformersEngine

    torch.set_num_threads(2)
    model = Path(args.model).resolve()
    meta = manifests.read_meta(model)
    flags = ["--model", str(model), "--max-batch-size", str(args.max_batch_size)]
    if args.temperature is not None:
        flags += ["--candidate-temperature", str(args.temperature)]
    cfg, _ = config.load(flags, {})
    max_tokens = int(meta.get("max_new_tokens") or cfg.eval_max_new_tokens)
    rows = examples(args.limit, args.seed)
    engine = TransformersEngine(cfg, model, prompts.load_template(model), meta)
    asyncio.run(engine.start())
    results: dict[str, Any] = {
        "command": "python benchmarks/candidates.py " + " ".join(argv or sys.argv[1:]),
        "model": rel(model), "heldout_exact_match": meta.get("metrics", {}).get("heldout", {}).get("exact_match"),
        "data": f"{rel(DATA)} eval split (seed {args.seed}, {len(rows)} questions)",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sampling": {"temperature": cfg.candidate_temperature, "top_p": cfg.candidate_top_p, "seeds": "1..K-1",
                     "max_tokens": max_tokens, "max_batch_size": cfg.max_batch_size, "engine": "transformers"},
        "runs": []}
    # quality: the largest K generated once; each smaller K votes among its first K (greedy + samples 1..K-1,
    # the requests `--candidates K` sends: rows decode independently, so they are the same candidates)
    kmax = max(args.k)
    texts, errors, logprobs, seconds, tokens = candidates_for(engine, cfg, rows, kmax, max_tokens, one_at_a_time=False)
    results["generation"] = {"k": kmax, "seconds": round(seconds, 1), "completion_tokens": tokens,
                             "s_per_question": round(seconds / len(rows), 3)}
    for k in sorted(args.k):
        one = vote_k(rows, texts, errors, logprobs, k)
        results["runs"].append(one)
        print(f"k={k}: {json.dumps(one)}", flush=True)
    base = results["runs"][0]
    for r in results["runs"]:
        r["ex_points_vs_greedy"] = round(100 * (r["ex"]["all"]["value"] - base["ex"]["all"]["value"]), 1)
    save(results, Path(args.out))  # the quality figures are kept even if the timing runs are cut short
    # time: each K run on its own over the first --timing-limit questions, both ways of asking
    timing: dict[str, Any] = {"questions": min(args.timing_limit, len(rows))}
    for mode, alone in (("one_question_at_a_time", True), ("all_questions_at_once", False)):
        if args.timing_limit <= 0:
            break
        per = {}
        for k in sorted(args.k):
            _, _, _, secs, toks = candidates_for(engine, cfg, rows[:args.timing_limit], k, max_tokens, one_at_a_time=alone)
            per[f"k{k}"] = {"s_per_question": round(secs / timing["questions"], 3), "completion_tokens": toks}
            print(f"timing {mode} k={k}: {per[f'k{k}']}", flush=True)
        greedy_s = per[f"k{min(args.k)}"]["s_per_question"]
        for entry in per.values():
            entry["vs_greedy"] = round(entry["s_per_question"] / greedy_s, 2)
        timing[mode] = per
    results["timing"] = timing
    save(results, Path(args.out))
    asyncio.run(engine.close())
    if args.beam_limit > 0:
        results["beams"] = run_beams(str(model), rows[:args.beam_limit], args.beam_k, max_tokens, batch=4)
    save(results, Path(args.out))
    return 0


def save(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {rel(out)}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
