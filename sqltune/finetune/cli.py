"""`sqltune finetune`: the fine-tuning job, from config to a published merged model.

    sqltune finetune --config configs/tiny-cpu.yaml
    sqltune finetune --model google/gemma-2b --dataset b-mc2/sql-create-context --output ./models/gemma-2b-sql
    MODEL_NAME=google/gemma-2b LORA_R=8 LORA_ALPHA=16 DATASET_LIMIT=1000 sqltune finetune
    torchrun --nproc-per-node 4 -m sqltune finetune --config configs/gemma-2b-qlora.yaml

Rerunning with the same output resumes from the newest complete checkpoint; SIGTERM saves a
checkpoint and exits 143, so a retried Cloud Run task loses at most one interval.
"""

from __future__ import annotations

import argparse
from typing import Any

from sqltune import config, logs
from sqltune.artifacts import manifests
from sqltune.finetune.job import finetune

DATABASE_FIELDS = ("database", "db_schema", "db_dialect", "db_keys", "db_context_chars")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="Fine-tune a base model on text-to-SQL data and publish the merged model.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # rows on a real database (--database pairs, spider:DIR) get their contexts as `ask` builds them
    config.add_arguments(p, groups=["finetune", "buckets", "tracking"], fields=dict.fromkeys(DATABASE_FIELDS, ""))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sqltune.artifacts import storage

    cfg, sources = config.from_namespace(args)
    logs.setup(cfg.log_level)
    storage.configure(cfg)
    final = finetune(cfg, sources)
    if logs.is_rank0():
        print(summary(manifests.read_meta(final), cfg.output_dir))
    return 0


def summary(meta: dict[str, Any], output: str) -> str:
    """What a person reads at the end of a run: where the model is, how training went, sample SQL."""
    from sqltune.finetune import heldout

    m = meta["metrics"]
    lines = [f"model: {output}  ({meta['method']}, {meta['dtype']}, base {meta['base_model']})",
             f"steps: {m['steps']}  train loss: {m['train_loss']:.3f}" +
             (f"  eval loss: {m['eval_loss']:.3f}" if "eval_loss" in m else "")]
    run = meta.get("tracking") or {}
    if run.get("run_id"):  # what `sqltune eval --run-id` takes to log its report into the same run
        lines.append(f"tracking: {run['report_to']} run {run['run_id']}")
    held = m.get("heldout")
    if held:
        for s in held["samples"]:
            ok = s["ex"] if "ex" in s else heldout.normalise(s["predicted"]) == heldout.normalise(s["gold"])
            lines += [f"\nQ: {s['question']}", f"{'ok ' if ok else '   '}predicted: {s['predicted']}",
                      "   gold:      " + s["gold"]]
        tutorial = held.get("tutorial")
        if tutorial:
            seen = {True: "a training question", False: "never seen in training"}.get(tutorial["seen_in_training"], "")
            lines += [f"\nThe reference tutorial's question ({seen}), on its two tables: {tutorial['question']}",
                      f"{'ok ' if tutorial['ex'] else '   '}predicted: {tutorial['predicted']}",
                      "   gold:      " + tutorial["gold"]]
        lines.append("\n" + heldout_line(held))
    cut = m.get("cut_short")
    if cut:
        lines.append(cut_short_note(cut, output))
    return "\n".join(lines)


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "n/a"


def heldout_line(held: dict[str, Any]) -> str:
    """EX (executed on synthesised databases) first, per kind of question, then exact match and parse rate."""
    line = f"held-out, {held['examples']} questions never seen in training: "
    if "ex" in held:
        kinds = held.get("by_kind", {})
        parts = [f"{kind.replace('_', '-')} {_pct(k['ex'])} of {k['examples']}" for kind, k in kinds.items()
                 if k["examples"]]
        line += f"execution accuracy {_pct(held['ex'])} ({', '.join(parts)}), "
    line += f"exact match {_pct(held['exact_match'])}, parseable SQL {_pct(held['parseable'])}"
    dbs, other = held.get("held_out_databases"), held.get("other_rows")
    if dbs and other:
        line += (f"\n  on held-out real databases: {_pct(dbs['all']['ex'])} of {dbs['all']['examples']} "
                 f"(multi-table {_pct(dbs['multi_table']['ex'])} of {dbs['multi_table']['examples']}, single-table "
                 f"{_pct(dbs['single_table']['ex'])} of {dbs['single_table']['examples']})"
                 f"\n  on the other sources' eval split: {_pct(other['all']['ex'])} of {other['all']['examples']} "
                 f"(single-table {_pct(other['single_table']['ex'])} of {other['single_table']['examples']})")
    joined = held.get("joins_completed")
    if joined:
        line += (f"\n  joins completed from the foreign keys in {joined['answers']} answers, {joined['right']} of them "
                 "now right" + (f" (held-out real databases without completion: "
                                f"{_pct(joined['ex_model_sql_held_out_databases'])})" if dbs else ""))
    return line


def cut_short_note(cut: dict[str, Any], output: str) -> str:
    """What a person needs when max_train_minutes ended training before the planned steps."""
    run, planned = cut["steps_run"], cut["planned_steps"]
    return (f"\nNOTE: training was cut short: max_train_minutes={cut['max_train_minutes']:g} ended it after {run} of "
            f"{planned} planned steps ({run / planned:.0%}; the machine was slower than the recipe expects, often "
            f"because other work shares its cores). The figures above are those of a model trained on {run / planned:.0%}"
            f" of its plan and are lower than the recipe reaches. To finish the plan, rerun the same command with "
            f"--max-train-minutes 0 (it resumes from the checkpoint at step {run} in {output}), or run it on a "
            f"quieter machine.")
