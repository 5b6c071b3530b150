"""`sqltune config show`: print the resolved config and where each non-default came from.

    MODEL_NAME=google/gemma-2b sqltune config show --config configs/gemma-2b-qlora.yaml --lora-r 16
"""

from __future__ import annotations

import argparse

from sqltune import config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="Show the resolved config.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="Print every field's value and, for non-defaults, its source.")
    config.add_arguments(show)
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    cfg, sources = config.from_namespace(args)
    print(config.render(cfg, sources))
    return 0
