"""The fine-tuning job as a function: `finetune(cfg)` loads the data and the base model, trains with
checkpoints, merges and checks, and publishes; `sqltune finetune` (cli.py) is its command line.

    python -c "from sqltune.config import Config; from sqltune.finetune.job import finetune; finetune(Config())"

A rerun with the same output resumes from the newest complete checkpoint (restored from the bucket
first when the output is remote); SIGTERM saves a checkpoint and raises TrainingInterrupted (exit 143).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.artifacts import manifests, registry
from sqltune.config import Config
from sqltune.errors import ConfigError, DataError

# shared with the GRPO job (sqltune.finetune.grpo), which imports them from there
from sqltune.finetune.common import (
    as_start_model,
    heldout_check,
    load_data,
    peak_rss_mb,
    prepare_run,
    release_training_state,
    train,
)

log = logs.get("train")


EVAL_LOSS_ROWS = 256  # rows of the eval split the eval loss is computed on


def check_output(output: str) -> None:
    """Fail at once, not after loading a model, when a local output cannot be written."""
    if manifests.is_remote(output):
        return  # a bucket is checked by its first write; credentials live in the environment
    path = manifests.local_path(output)
    hint = "pass --output a folder you can write (e.g. ./models/<name>), or a gs:// / s3:// URL"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output {output} is an existing file, not a folder", hint)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".sqltune-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output {output} is not writable: {e.strerror or e}", hint) from None


def finetune(cfg: Config, sources: dict[str, str] | None = None) -> Path:
    """Run the whole job; returns the local folder of the finished model."""
    check_output(cfg.output_dir)
    cfg = as_start_model(cfg, sources or {})
    if cfg.method == "grpo":  # reinforcement from execution: its own trainer, the same checkpoints and export
        from sqltune.finetune import grpo

        return grpo.run(cfg, sources)
    import torch
    import transformers

    from sqltune import generation, prompts
    from sqltune.data import loading
    from sqltune.export import merge
    from sqltune.finetune import attempts
    from sqltune.finetune import trainer as sft
    from sqltune.finetune.callbacks import CheckpointManifest, DiskSpaceCheck, HeapTrim, JsonLogs, StopControl
    from sqltune.finetune.shared_context import longest_answer
    from sqltune.models import base_models

    started = time.time()
    transformers.set_seed(cfg.seed)
    transformers.logging.set_verbosity_error()
    if not logs.show_progress():
        transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    if not logs.show_progress():
        datasets.utils.logging.set_verbosity_error()

    precision = generation.choose_precision(cfg.dtype, training=True)
    method, why = base_models.choose_method(cfg.method, cfg.model_name)
    if not cfg.learning_rate:
        cfg = dataclasses.replace(cfg, learning_rate=base_models.default_learning_rate(method, cfg.model_name))
    if method == "qlora" and precision.device == "cpu":
        log.warning("qlora on CPU: bitsandbytes' CPU kernels work but are slow; use a GPU for real models")
    logs.event(log, "finetune starting", model=cfg.model_name, method=method, method_reason=why,
               dtype=precision.name, dtype_reason=precision.reason, learning_rate=cfg.learning_rate,
               output=cfg.output_dir,
               overrides=sources or {}, torch=torch.__version__)

    run_dir, ckpt_root, resume_from = prepare_run(cfg, method)
    splits = load_data(cfg)
    # the tiny model's tokenizer is trained on the plain template's text; a chat template needs a real tokenizer
    template = prompts.DEFAULT_TEMPLATE
    train_rows, splits.report.multi_table_repeated = loading.repeat_multi_table(splits.train, cfg.multi_table_repeat)
    pairs = sft.build_pairs(train_rows, template)

    base_info: dict[str, Any] = {"source": cfg.model_name}
    if cfg.model_name == base_models.TINY:
        base_name = str(run_dir / ".tiny-base")
        tiny = {"layers": cfg.tiny_layers, "seed": cfg.seed, "max_positions": max(1024, cfg.max_seq_length)}
        if resume_from is not None:
            # resume with the first attempt's tokenizer; Trainer then loads the trained weights
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resume_from)
            if method == "full":
                model = AutoModelForCausalLM.from_pretrained(resume_from)
            else:
                model = base_models.build_tiny_model(tokenizer, **tiny)
        else:
            tokenizer = base_models.train_tokenizer((p + c for p, c in pairs), cfg.tiny_vocab_size)
            model = base_models.build_tiny_model(tokenizer, **tiny)
        if method != "full" and logs.is_rank0():
            model.save_pretrained(base_name)  # the merge reloads this base in full precision
            tokenizer.save_pretrained(base_name)
    else:
        base_name, base_info = base_models.resolve_source(cfg.model_name)
        tokenizer = base_models.load_tokenizer(base_name, cfg.trust_remote_code)
        model = base_models.load_base(base_name, base_models.weight_precision(precision, method),
                                   quantize_4bit=method == "qlora",
                                   trust_remote_code=cfg.trust_remote_code,
                                   device_map=sft.device_map() if method == "qlora" else None)
        if method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model.config.use_cache = False
    template, style = prompts.template_for(cfg.prompt_style, tokenizer)
    if template != prompts.DEFAULT_TEMPLATE:
        pairs = sft.build_pairs(train_rows, template)
    logs.event(log, "prompt template", style=style, requested=cfg.prompt_style, prompt=template.prompt,
               stops=list(template.stops))

    train_ds, too_long = sft.to_dataset(pairs, tokenizer, cfg.max_seq_length, cfg.shared_context_rows)
    eval_pairs = sft.build_pairs(splits.eval, template)
    eval_ds, eval_too_long = sft.to_dataset(eval_pairs, tokenizer, cfg.max_seq_length) if eval_pairs else (None, 0)
    if eval_ds is not None and len(eval_ds) > EVAL_LOSS_ROWS:
        # the eval loss is a sanity figure, not the score (that is the held-out check and `sqltune eval`):
        # a fixed seeded sample keeps it to seconds on a CPU instead of minutes
        eval_ds = eval_ds.shuffle(seed=cfg.seed).select(range(EVAL_LOSS_ROWS))
    if too_long:
        splits.report.skipped["too_long"] += too_long
    splits.report.train = len(pairs) - too_long
    packed = {}
    if "segments" in train_ds.column_names:  # questions behind a shared context: rows, and tokens a pass computes
        packed = {"packed_rows": len(train_ds), "packed_tokens": sum(len(x) for x in train_ds["input_ids"])}
        if len(train_ds) == len(pairs) - too_long:
            log.warning("shared_context_rows=%d: no two questions share a context in the %s prompt layout; "
                        "prompt_style schema-first puts the schema first", cfg.shared_context_rows, style)
    logs.event(log, "data ready", **splits.report.to_dict(), eval_too_long=eval_too_long, **packed)
    if len(train_ds) == 0:
        raise DataError(f"every training row is longer than max_seq_length={cfg.max_seq_length} tokens",
                        "raise --max-seq-length")

    stop = StopControl(cfg.max_train_minutes)
    budget = attempts.from_config(cfg)
    from sqltune import tracking

    tracker = tracking.for_finetune(cfg, ckpt_root, resuming=resume_from is not None)
    trainer = sft.build_trainer(cfg, method, precision, model, tokenizer, train_ds, eval_ds, run_dir,
                             callbacks=[JsonLogs(tracker, cfg.max_train_minutes), CheckpointManifest(), stop, budget,
                                        attempts.EpochSeededOrder(), HeapTrim(), DiskSpaceCheck()])
    metrics = train(trainer, cfg, ckpt_root, resume_from, stop, budget, started)
    if eval_ds is not None:
        metrics.update({k: v for k, v in trainer.evaluate().items() if k == "eval_loss"})
    metrics["peak_rss_train_mb"] = peak_rss_mb()
    release_training_state(trainer)
    if not logs.is_rank0():
        return run_dir
    final = merge.export(trainer, cfg, method=method, precision=precision, base_name=base_name, run_dir=run_dir,
                         template=template, data_report=splits.report.to_dict(), metrics=metrics, base=base_info,
                         max_new_tokens=longest_answer(train_ds["completion_mask"]),
                         check=heldout_check(cfg, splits.eval, splits.train), tracking=tracking.describe(tracker))
    if tracker is not None:
        tracker.log_metrics({**metrics, **(metrics.get("heldout") or {})}, trainer.state.global_step, prefix="final/")
        tracker.close()
    where = registry.publish(final, cfg.output_dir)
    logs.event(log, "finetune finished", output=where, wall_s=round(time.time() - started, 1), peak_rss_mb=peak_rss_mb(),
               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return final
