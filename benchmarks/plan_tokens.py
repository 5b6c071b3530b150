"""Tokens per training row of sql-create-context, the figure the deployment plan's step time rests on.

    python benchmarks/plan_tokens.py                 # the Gemma tokenizer of the embedded gemma3-270m
    python benchmarks/plan_tokens.py --model smollm2-135m

Each row of ../shared/data/sql-create-context is laid out as training lays it out (sqltune's plain
template: prompt ids with the tokenizer's special tokens, then the SQL and EOS) and counted. The mean
is `sqltune.deploy.plan.TOKENS_PER_ROW`; the plan multiplies it by the rows per step and divides by
the assumed tokens per second. gemma-2b's own tokenizer is gated on the hub; Gemma 3's (262k pieces)
comes from the same SentencePiece family as gemma-2b's (256k). Figures go to
benchmarks/results/plan_tokens_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m", help="embedded model whose tokenizer counts")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from sqltune.models import gguf
    from sqltune.prompts import DEFAULT_TEMPLATE, encode_completion, encode_prompt

    path = gguf.locate_gguf(args.model)
    started = time.time()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # the tokenizer alone
    counts = []
    for line in SHARED.read_text().splitlines():
        row = json.loads(line)
        prompt = DEFAULT_TEMPLATE.build_prompt(row["question"], row["context"])
        counts.append(len(encode_prompt(tok, prompt)) + len(encode_completion(tok, DEFAULT_TEMPLATE.build_completion(row["answer"]))))
    counts.sort()
    result = {"tokenizer": args.model, "vocab": len(tok), "source": f"../{SHARED.relative_to(ROOT.parent)}",
              "template": "plain", "rows": len(counts), "mean_tokens": round(statistics.mean(counts), 1),
              "median_tokens": statistics.median(counts), "p95_tokens": counts[int(0.95 * len(counts))],
              "max_tokens": counts[-1], "seconds": round(time.time() - started, 1)}
    print(json.dumps(result))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"plan_tokens_{args.model}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
