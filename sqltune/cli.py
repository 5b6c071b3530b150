"""`sqltune <command>`: a thin dispatcher. Each command lives in its own module, which exposes
`register(subparsers)`; heavy imports (torch, transformers) happen inside the command, so
`sqltune --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sqltune import __version__, logs
from sqltune.errors import SqltuneError, disk_full

# command modules, one `cli.py` per stage, in the order `sqltune --help` lists them
COMMAND_MODULES = (
    "sqltune.finetune.cli",
    "sqltune.export.cli",
    "sqltune.data.cli",
    "sqltune.artifacts.cli",
    "sqltune.evaluate.cli",
    "sqltune.ask.cli",
    "sqltune.serve.cli",
    "sqltune.deploy.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sqltune", description="Fine-tune an open LLM into a text-to-SQL model, publish, serve and evaluate it.")
    parser.add_argument("--version", action="version", version=f"sqltune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    _register_config(sub)
    return parser


def _register_config(sub: argparse._SubParsersAction) -> None:
    """`sqltune config show`: the resolved config and where each non-default came from.

        MODEL_NAME=google/gemma-2b sqltune config show --config configs/gemma-2b-qlora.yaml --lora-r 16
    """
    from sqltune import config

    p = sub.add_parser("config", help="Show the resolved config.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="Print every field's value and, for non-defaults, its source.")
    config.add_arguments(show)
    show.set_defaults(func=_run_config_show)


def _run_config_show(args: argparse.Namespace) -> int:
    from sqltune import config

    cfg, sources = config.from_namespace(args)
    print(config.render(cfg, sources))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logs.quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SqltuneError as e:
        print(f"sqltune: {e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("sqltune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not disk_full(e):
            raise
        print(f"sqltune: error: the disk filled up ({e})\n  fix: free space on that disk and rerun; a fine-tuning "
              "job resumes from its last complete checkpoint", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
