"""What one request can cost the server, measured: grammar compile time against a real vocabulary as a
schema+values question and a schema's distinct names grow (the caps of sqltune.constrain sit where the
growth turns steep), and database synthesis for /v1/sql/run and eval on schemas of same-named columns.

    python benchmarks/bounded_work.py                                  # the demo model's tokenizer
    python benchmarks/bounded_work.py --tokenizer models/smollm2-135m-sql

Each figure is one cold measurement (no cache) in seconds of wall time; other jobs on the machine
inflate them alike. Writes benchmarks/results/bounded_work.json (paths relative to the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "bounded_work.json"
HEAD = "CREATE TABLE head (age INTEGER, name VARCHAR)"


def _schema(tables: int, columns: int, shared: bool) -> str:
    return "; ".join(f"CREATE TABLE t{i} (" + ", ".join(f"c{j if shared else f'{i}_{j}'} INTEGER"
                                                         for j in range(columns)) + ")" for i in range(tables))


def grammar_costs(tokenizer_dir: str) -> dict:
    from transformers import AutoTokenizer

    from sqltune import constrain
    from sqltune.sql.grammar import schema_grammar
    from sqltune.sql.schema import parse_schema

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    compiler = constrain.Compiler(tok, len(tok), [tok.eos_token_id])

    def compile_s(grammar: str) -> float:
        started = time.perf_counter()
        compiler.compile(grammar + f"\n# {time.perf_counter_ns()}\n")  # a fresh text: never a cache hit
        return round(time.perf_counter() - started, 3)

    words = {}
    for n in (64, 256, 512, 1000, 2000):
        question = " ".join(f"word{i % 97} Carlton {i}" for i in range(n // 3 + 1)).split()[:n]
        grammar = schema_grammar(parse_schema(HEAD), " ".join(question))
        words[n] = {"chars": len(grammar), "compile_s": compile_s(grammar),
                    "capped": n > constrain.MAX_QUESTION_WORDS}
    names = {}
    for tables, columns in ((16, 16), (64, 16), (128, 16), (256, 16)):
        grammar = schema_grammar(parse_schema(_schema(tables, columns, shared=False)))
        count = tables * (columns + 1)
        names[count] = {"chars": len(grammar), "compile_s": compile_s(grammar), "capped": count > constrain.MAX_NAMES}
    return {"tokenizer": os.path.relpath(tokenizer_dir, ROOT), "vocab": len(tok),
            "caps": {"question_words": constrain.MAX_QUESTION_WORDS, "names": constrain.MAX_NAMES,
                     "grammar_chars": constrain.MAX_GRAMMAR_CHARS},
            "schema_values_question_words": words, "schema_distinct_names": names}


def synthesis_costs() -> dict:
    from sqltune.serve.sql_run import run_on_synthesised
    from sqltune.sql.schema import parse_schema

    out = {}
    for tables in (16, 64, 256):
        schema = parse_schema(_schema(tables, 16, shared=True))
        started = time.process_time()
        result = run_on_synthesised(schema, "SELECT t3.c1 FROM t3 JOIN t9 ON t3.c0 = t9.c0 WHERE t3.c2 > 5")
        out[f"{tables}x16_shared_names"] = {"cpu_s": round(time.process_time() - started, 3),
                                            "ok": result.result.ok}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(ROOT / "models" / "smollm2-135m-sql"),
                        help="A folder with a tokenizer (default: the demo model's).")
    args = parser.parse_args()
    results = {"grammar": grammar_costs(args.tokenizer), "sql_run_synthesis": synthesis_costs(),
               "load_average": os.getloadavg()[0]}
    print(json.dumps(results, indent=2))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
