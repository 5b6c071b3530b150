"""`sqltune data`: write synthetic examples, or validate a dataset and print its counts by reason.

    sqltune data synth --n 2000 --out data/synthetic.jsonl
    sqltune data check --dataset ../shared/data/sql-create-context/train.jsonl
"""

from __future__ import annotations

import argparse
import json

from sqltune.data.loading import load_splits, write_jsonl
from sqltune.errors import DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="Generate or check datasets.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = dsub.add_parser("synth", help="Write N synthetic examples as JSON lines.")
    synth.add_argument("--n", type=int, default=1000, help="Number of examples.")
    synth.add_argument("--seed", type=int, default=0, help="Generator seed.")
    synth.add_argument("--out", required=True, help="Output .jsonl path.")
    synth.set_defaults(func=_run_synth)
    check = dsub.add_parser("check", help="Validate a dataset and print the counts by reason.")
    check.add_argument("--dataset", required=True, help="Hub id, local file, or synthetic:N.")
    check.add_argument("--column-map", dest="columns", default="", help="Column mapping: question=q,context=schema,answer=sql.")
    check.add_argument("--eval-fraction", type=float, default=0.05)
    check.set_defaults(func=_run_check)


def _run_synth(args: argparse.Namespace) -> int:
    from sqltune.data import synthetic

    if args.n < 1:
        raise DataError(f"--n {args.n} must be at least 1", "use e.g. --n 1000")
    count = write_jsonl(synthetic.generate(args.n, seed=args.seed), args.out)
    print(f"wrote {count} examples to {args.out}")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    splits = load_splits(args.dataset, columns=args.columns, eval_fraction=args.eval_fraction)
    print(json.dumps(splits.report.to_dict(), indent=2))
    return 0
