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
import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any

from sqltune import artifacts, config, logs
from sqltune.config import Config
from sqltune.errors import ConfigError, DataError, TrainingInterrupted

log = logs.get("train")

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="Fine-tune a base model on text-to-SQL data and publish the merged model.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(p, groups=["finetune", "buckets"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sqltune import storage

    cfg, sources = config.from_namespace(args)
    logs.setup(cfg.log_level)
    storage.configure(cfg)
    final = finetune(cfg, sources)
    if is_main_process():
        print(summary(artifacts.read_meta(final), cfg.output_dir))
    return 0


def summary(meta: dict[str, Any], output: str) -> str:
    """What a person reads at the end of a run: where the model is, how training went, sample SQL."""
    from sqltune import heldout

    m = meta["metrics"]
    lines = [f"model: {output}  ({meta['method']}, {meta['dtype']}, base {meta['base_model']})",
             f"steps: {m['steps']}  train loss: {m['train_loss']:.3f}" +
             (f"  eval loss: {m['eval_loss']:.3f}" if "eval_loss" in m else "")]
    held = m.get("heldout")
    if held:
        for s in held["samples"]:
            mark = "ok " if heldout.normalise(s["predicted"]) == heldout.normalise(s["gold"]) else "   "
            lines += [f"\nQ: {s['question']}", f"{mark}predicted: {s['predicted']}", "   gold:      " + s["gold"]]
        lines.append(f"\nheld-out: exact match {held['exact_match']:.1%}, parseable SQL {held['parseable']:.1%} "
                     f"on {held['examples']} questions never seen in training")
    return "\n".join(lines)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def find_resume_checkpoint(checkpoints: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: newest complete one (auto), none (never), or an explicit path."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not artifacts.is_complete(path):
            raise ConfigError(f"--resume {resume}: not a complete checkpoint (missing or without manifest.json)",
                              "pass a checkpoint-<step> folder written by sqltune, or --resume auto")
        return path
    if not checkpoints.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in checkpoints.iterdir() if (m := _CKPT.match(p.name))), reverse=True)
    for _step, path in found:
        if artifacts.is_complete(path):
            return path
        log.warning(f"skipping incomplete checkpoint {path.name} (no manifest: the job died while saving it)")
    return None


def _stop_reason_message(reason: str) -> str:
    return {"sigterm": "SIGTERM received: checkpoint saved, exiting so the retry resumes here",
            "time": "max_train_minutes reached: training stops here, then merge and publish"}[reason]


def finetune(cfg: Config, sources: dict[str, str] | None = None) -> Path:
    """Run the whole job; returns the local folder of the finished model."""
    import torch
    import transformers

    from sqltune import data, export, modeling, prompts
    from sqltune.callbacks import CheckpointManifest, JsonLogs, StopControl

    started = time.time()
    transformers.set_seed(cfg.seed)
    transformers.logging.set_verbosity_error()
    if not logs.show_progress():
        transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    if not logs.show_progress():
        datasets.utils.logging.set_verbosity_error()

    precision = modeling.choose_precision(cfg.dtype)
    method, why = modeling.choose_method(cfg.method, cfg.model_name)
    if not cfg.learning_rate:
        cfg = dataclasses.replace(cfg, learning_rate=modeling.default_learning_rate(method, cfg.model_name))
    if method == "qlora" and precision.device == "cpu":
        log.warning("qlora on CPU: bitsandbytes' CPU kernels work but are slow; use a GPU for real models")
    logs.event(log, "finetune starting", model=cfg.model_name, method=method, method_reason=why,
               dtype=precision.name, dtype_reason=precision.reason, learning_rate=cfg.learning_rate,
               output=cfg.output_dir,
               overrides=sources or {}, torch=torch.__version__)

    run_dir = artifacts.work_dir(cfg.output_dir)
    ckpt_root = run_dir / artifacts.CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    from accelerate import PartialState

    # one process per machine restores from the bucket while the others wait; they then find the same
    # checkpoint on the local disk, so every rank resumes at the same step
    with PartialState().local_main_process_first():
        restored = artifacts.restore_checkpoints(cfg.output_dir, ckpt_root)
    if restored:
        logs.event(log, "restored checkpoints from the output", count=restored)
    if cfg.resume == "auto" and int(os.environ.get("CLOUD_RUN_TASK_ATTEMPT", "0") or 0) > 0:
        logs.event(log, "retried task: resuming", attempt=os.environ["CLOUD_RUN_TASK_ATTEMPT"])
    resume_from = find_resume_checkpoint(ckpt_root, cfg.resume)

    splits = data.load_splits(cfg.dataset, split=cfg.dataset_split, columns=cfg.column_map, limit=cfg.dataset_limit,
                              eval_fraction=cfg.eval_fraction, seed=cfg.seed)
    template = prompts.DEFAULT_TEMPLATE
    pairs = _pairs(splits.train, template)

    if cfg.model_name == modeling.TINY:
        base_name = str(run_dir / ".tiny-base")
        tiny = {"layers": cfg.tiny_layers, "seed": cfg.seed, "max_positions": max(1024, cfg.max_seq_length)}
        if resume_from is not None:
            # resume with the first attempt's tokenizer; Trainer then loads the trained weights
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resume_from)
            if method == "full":
                model = AutoModelForCausalLM.from_pretrained(resume_from)
            else:
                model = modeling.build_tiny_model(tokenizer, **tiny)
        else:
            tokenizer = modeling.train_tokenizer((p + c for p, c in pairs), cfg.tiny_vocab_size)
            model = modeling.build_tiny_model(tokenizer, **tiny)
        if method != "full" and is_main_process():
            model.save_pretrained(base_name)  # the merge reloads this base in full precision
            tokenizer.save_pretrained(base_name)
    else:
        base_name = cfg.model_name
        tokenizer = modeling.load_tokenizer(cfg.model_name, cfg.trust_remote_code)
        model = modeling.load_base(cfg.model_name, precision, quantize_4bit=method == "qlora",
                                   trust_remote_code=cfg.trust_remote_code,
                                   device_map=_device_map() if method == "qlora" else None)
        if method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model.config.use_cache = False

    train_ds, too_long = _to_dataset(pairs, tokenizer, cfg.max_seq_length)
    eval_pairs = _pairs(splits.eval, template)
    eval_ds, eval_too_long = _to_dataset(eval_pairs, tokenizer, cfg.max_seq_length) if eval_pairs else (None, 0)
    if too_long:
        splits.report.skipped["too_long"] += too_long
    splits.report.train = len(train_ds)
    logs.event(log, "data ready", **splits.report.to_dict(), eval_too_long=eval_too_long)
    if len(train_ds) == 0:
        raise DataError(f"every training row is longer than max_seq_length={cfg.max_seq_length} tokens",
                        "raise --max-seq-length")

    stop = StopControl(cfg.max_train_minutes)
    trainer = _build_trainer(cfg, method, precision, model, tokenizer, train_ds, eval_ds, run_dir,
                             callbacks=[JsonLogs(), CheckpointManifest(), stop])
    remote_cb = artifacts.checkpoint_callback(cfg.output_dir, ckpt_root, cfg.save_total_limit)
    if remote_cb is not None and is_main_process():
        trainer.add_callback(remote_cb)
    if resume_from is not None:
        logs.event(log, "resuming", checkpoint=str(resume_from))
    with stop.installed():
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stop.reason == "sigterm":
        raise TrainingInterrupted(_stop_reason_message("sigterm"), "rerun with the same --output to resume")
    if stop.reason:
        logs.event(log, _stop_reason_message(stop.reason), step=trainer.state.global_step)

    metrics: dict[str, Any] = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
                               "train_runtime_s": round(time.time() - started, 1)}
    if eval_ds is not None:
        metrics.update({k: v for k, v in trainer.evaluate().items() if k == "eval_loss"})
    if not is_main_process():
        return run_dir
    final = export.export(trainer, cfg, method=method, precision=precision, base_name=base_name, run_dir=run_dir,
                          template=template, data_report=splits.report.to_dict(), metrics=metrics,
                          eval_examples=splits.eval)
    where = artifacts.publish(final, cfg.output_dir)
    logs.event(log, "finetune finished", output=where, wall_s=round(time.time() - started, 1),
               **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    return final


def _pairs(examples: list[Any], template: Any) -> list[tuple[str, str]]:
    return [(template.build_prompt(ex.question, ex.context), template.build_completion(ex.answer)) for ex in examples]


def _device_map() -> Any:
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return None


def _to_dataset(pairs: list[tuple[str, str]], tokenizer: Any, max_len: int) -> tuple[Any, int]:
    """A prompt/completion Dataset without the rows longer than max_len (counted, never truncated:
    a cut-off answer would teach the model to stop mid-query)."""
    from datasets import Dataset

    eos = tokenizer.eos_token or ""
    texts = [p + c + eos for p, c in pairs]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    kept = [{"prompt": p, "completion": c} for (p, c), n in zip(pairs, lengths, strict=True) if n <= max_len]
    return Dataset.from_list(kept) if kept else Dataset.from_dict({"prompt": [], "completion": []}), len(pairs) - len(kept)


def _build_trainer(cfg: Config, method: str, precision: Any, model: Any, tokenizer: Any, train_ds: Any,
                   eval_ds: Any, run_dir: Path, callbacks: list[Any]) -> Any:
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    # Every value set from our Config: TRL/transformers defaults (bf16, gradient checkpointing, lr 2e-5)
    # change between releases and would silently change the recipe.
    args = SFTConfig(
        output_dir=str(run_dir / artifacts.CHECKPOINTS),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=precision.name == "bf16",
        fp16=precision.name == "fp16",
        use_cpu=precision.device == "cpu",
        max_length=cfg.max_seq_length,
        packing=False,
        # batches of similar length: far less padding than random batches, still shuffled across megabatches
        train_sampling_strategy="group_by_length",
        completion_only_loss=True,  # loss on the SQL only: the prompt is given at inference
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not logs.show_progress(),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    peft_config = None
    if method in ("lora", "qlora"):
        from peft import LoraConfig

        targets: Any = cfg.target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets, bias="none", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # our JSON lines replace the raw dict prints
    if not logs.show_progress():
        trainer.remove_callback(ProgressCallback)
    return trainer
