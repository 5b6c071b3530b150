"""`sqltune data`: write synthetic examples, or validate a dataset and print its counts by reason.

    sqltune data synth --n 2000 --out data/synthetic.jsonl
    sqltune data check --dataset ../shared/data/sql-create-context/train.jsonl
"""

from __future__ import annotations

import argparse
import json

from sqltune import config
from sqltune.data.loading import database_options, load_splits, write_jsonl
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
    config.add_arguments(check, groups=[], fields={"dataset": "Hub id, local file, spider:DIR, synthetic:N, or several "
                                                              "(a.jsonl,spider:DIR*2).", "column_map": "",
                                                   "dataset_split": "", "eval_fraction": "",
                                                   "keep_literal_case": "", "database": "", "db_schema": "",
                                                   "db_dialect": "", "db_keys": "", "db_context_chars": "",
                                                   "heldout_databases": "", "question_syn": ""})
    check.set_defaults(func=_run_check)


def _run_synth(args: argparse.Namespace) -> int:
    from sqltune.data import synthetic

    if args.n < 1:
        raise DataError(f"--n {args.n} must be at least 1", "use e.g. --n 1000")
    count = write_jsonl(synthetic.generate(args.n, seed=args.seed), args.out)
    print(f"wrote {count} examples to {args.out}")
    return 0


def _run_check(args: argparse.Namespace) -> int:
    cfg, sources = config.from_namespace(args)
    if "dataset" not in sources:
        raise DataError("no dataset to check", "pass --dataset (a hub id, a local file or synthetic:N)")
    splits = load_splits(cfg.dataset, split=cfg.dataset_split, columns=cfg.column_map, eval_fraction=cfg.eval_fraction,
                         keep_literal_case=cfg.keep_literal_case, db=database_options(cfg))
    print(json.dumps(splits.report.to_dict(), indent=2))
    return 0
