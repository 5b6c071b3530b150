"""`sqltune finetune`: the fine-tuning job.

    sqltune finetune --model google/gemma-2b --dataset b-mc2/sql-create-context --output ./models/gemma-2b-sql
    MODEL_NAME=google/gemma-2b LORA_R=8 LORA_ALPHA=16 DATASET_LIMIT=1000 sqltune finetune
"""

from __future__ import annotations

import argparse

from sqltune import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="Fine-tune a base model on text-to-SQL data and publish the merged model.")
    config.add_arguments(p, groups=["finetune"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError
