"""`sqltune ask`: a question answered on a real database, read-only.

    sqltune ask --model ./models/sql --database postgresql://reader@localhost/shop "How many orders shipped in May?"
    sqltune ask --endpoint http://127.0.0.1:8000 --database ./chinook.sqlite "Top 5 artists by tracks"
    sqltune ask --database ./shop.sqlite --sql "SELECT COUNT(*) FROM orders" --format json
    sqltune ask --model ./models/sql --engine vllm --database ./shop.sqlite "Top 5 customers by spend"
    sqltune ask --database ./shop.sqlite --schema-only          # the CREATE TABLE context the model gets

Prints the SQL (the model's and the one run, when the dialects differ), then the rows as an
aligned table; --format json|csv for scripts (csv: the rows only, the SQL in the logs). Exits 1
when the SQL is refused, does not translate, or fails on the database; 2 when it cannot connect.
"""

from __future__ import annotations

import argparse
import sys

from sqltune import config, logs
from sqltune.engines import factory
from sqltune.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="Ask a question of a real database (PostgreSQL or SQLite file), read-only.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("question", nargs="?", default="", help="The question, in words.")
    p.add_argument("--sql", default=None, help="Run this SQL (in --db-dialect) instead of generating it; it passes "
                   "the same gate and read-only execution.")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="Output: an aligned table "
                   "(default), one JSON object, or CSV rows.")
    p.add_argument("--schema-only", action="store_true", help="Print the CREATE TABLE context read from the "
                   "database and exit.")
    config.add_arguments(p, groups=["db"], fields={
        "model_name": "A finished model folder or bucket URL that writes the SQL.",
        "eval_endpoint": "A running sqltune (or OpenAI-compatible) server that writes the SQL.",
        "eval_max_new_tokens": "Tokens generated for the SQL; default: the model's own.",
        "eval_retries": "", "eval_request_timeout": "",
        "serve_engine": "Engine that generates with --model, as in `sqltune serve`; auto = vllm when CUDA and "
                        "vllm are installed, else transformers."})
    factory.engine_choices(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sqltune.ask import answer as asking

    cfg, sources = config.from_namespace(args)
    logs.setup(cfg.log_level)
    if not cfg.database:
        raise ConfigError("no database to ask", "pass --database postgresql://user@host/db or a SQLite file path")
    if args.schema_only:
        return _schema_only(cfg)
    result = asking.ask(cfg, args.question, sources=dict(sources), sql=args.sql)
    if args.format == "json":
        print(asking.render_json(result))
    elif args.format == "csv":
        for w in result.warnings:
            print(f"warning: {w}", file=sys.stderr)
        if result.translation.sql:
            print(f"-- {result.translation.sql}", file=sys.stderr)
        if result.ok:
            sys.stdout.write(asking.render_csv(result))
        else:
            print(f"sqltune: error: {result.error}", file=sys.stderr)
    else:
        print(asking.render_table(result))
    return 0 if result.ok else 1


def _schema_only(cfg: config.Config) -> int:
    from sqltune.db import connect, introspect

    db = connect.connect(cfg.database, schema=cfg.db_schema)
    try:
        schema = introspect.introspect(db, keys=cfg.db_keys)
        desc = db.describe()
        print(f"-- {desc['engine']} {desc['database']} ({desc.get('server_version', '')}): "
              f"{len(schema.tables)} tables and views")
        for table in schema.tables:
            print(table.ddl(cfg.db_keys) + ";")
    finally:
        db.close()
    return 0
