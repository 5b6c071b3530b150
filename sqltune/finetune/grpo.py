"""`sqltune finetune --method grpo`: reinforcement from execution. The model samples SQL for each training question,
each completion is executed (sqltune.finetune.rewards) and rewarded by what it returns, and TRL's GRPOTrainer moves
the policy toward the completions that beat their group.

    sqltune finetune --config configs/smollm2-135m-grpo-cpu.yaml
    sqltune finetune --method grpo --model models/smollm2-135m-sql --dataset spider:../shared/data/spider-train

It starts from a model that already writes SQL (a finished sqltune model, or any instruct base), with the prompts
sqltune.prompts builds for SFT (a sqltune model's own template), and keeps every guarantee of the SFT job
(sqltune.finetune.job): checkpoints with manifests, resume after a kill or SIGTERM, attempts on Cloud Run, a time
budget, JSON log lines, tracking, the merge and parity check, the held-out check, the manifest written last.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.artifacts import manifests, registry
from sqltune.config import Config
from sqltune.errors import ConfigError, DataError
from sqltune.finetune.callbacks import JsonLogs, _round

log = logs.get("train")

# a policy's default peak learning rate: RL steps follow the model's own samples, far smaller than SFT's
DEFAULT_LR = {"full": 2e-6, "lora": 2e-5}


def check_config(cfg: Config) -> None:
    """Everything that can be refused before a model is loaded."""
    from sqltune.finetune import rewards
    from sqltune.models import base_models

    rewards.parse_rewards(cfg.grpo_rewards)
    if cfg.model_name == base_models.TINY:
        raise ConfigError("--method grpo improves a model that already writes SQL; `tiny` starts from random weights",
                          "pass --model a finished sqltune model (e.g. models/tiny-sql from "
                          "`sqltune finetune --config configs/tiny-cpu.yaml`) or an instruct model")
    completions = cfg.train_batch_size * cfg.gradient_accumulation_steps
    if completions % cfg.grpo_num_generations:
        raise ConfigError(f"--train-batch-size x --gradient-accumulation-steps = {completions} completions per step is "
                          f"not a multiple of --grpo-num-generations {cfg.grpo_num_generations}",
                          "each question's group must fit one step: e.g. --train-batch-size "
                          f"{cfg.grpo_num_generations}")


def start_template(base_name: str, tokenizer: Any, cfg: Config) -> tuple[Any, int | None]:
    """The prompt template the policy is sampled with: a sqltune model's own (it was trained on exactly these
    prompts), else the one SFT would choose for this base; and a sqltune model's answer length."""
    from sqltune import prompts

    if (Path(base_name) / manifests.SQLTUNE_META).is_file():
        return prompts.load_template(base_name), manifests.read_meta(base_name).get("max_new_tokens")
    return prompts.template_for(cfg.prompt_style, tokenizer)[0], None


def to_dataset(examples: list[Any], template: Any, tokenizer: Any, max_len: int) -> tuple[Any, int]:
    """Prompt rows built exactly as SFT builds its prompts, with what the rewards need beside each; a prompt longer
    than max_len tokens is left out and counted (a cut schema would reward guessing at the missing tables)."""
    from datasets import Dataset

    from sqltune.finetune.trainer import build_pairs
    from sqltune.prompts import encode_prompt

    rows = [{"prompt": prompt, "gold": ex.answer, "context": ex.context, "database": ex.database,
             "question": ex.question} for (prompt, _), ex in zip(build_pairs(examples, template), examples, strict=True)
            if len(encode_prompt(tokenizer, prompt)) <= max_len]
    empty = {k: [] for k in ("prompt", "gold", "context", "database", "question")}
    return (Dataset.from_list(rows) if rows else Dataset.from_dict(empty)), len(examples) - len(rows)


def check_databases(examples: list[Any]) -> int:
    """Rows whose real database is missing would score None forever: refuse them at start. Returns how many rows
    have a real database."""
    missing = sorted({ex.database for ex in examples if ex.database and "://" not in ex.database
                      and not Path(ex.database).is_file()})
    if missing:
        raise DataError(f"{len(missing)} databases of the training rows do not exist, e.g. {missing[0]}",
                        "check the dataset folder (Spider: database/<db_id>/<db_id>.sqlite)")
    return sum(1 for ex in examples if ex.database)


class GrpoLogs(JsonLogs):
    """One JSON line per logging step: the SFT fields plus reward mean / std, the share of groups whose rewards
    were all equal (they teach nothing), KL, completion length, and the step's seconds split into generation,
    reward and update."""

    def on_log(self, args: Any, state: Any, control: Any, logs_: dict[str, Any] | None = None, **kw: Any) -> None:
        entry = dict(kw.get("logs") or logs_ or {})
        if not state.is_world_process_zero or "loss" not in entry:
            return
        now = time.time()
        fields: dict[str, Any] = {
            "step": state.global_step, "max_steps": state.max_steps, "loss": _round(entry["loss"]),
            "lr": entry.get("learning_rate"), "grad_norm": _round(entry.get("grad_norm")),
            "reward": _round(entry.get("reward")), "reward_std": _round(entry.get("reward_std")),
            "zero_std_groups": _round(entry.get("frac_reward_zero_std")), "kl": _round(entry.get("kl")),
            "completion_length": _round(entry.get("completions/mean_length")),
            "ex": _round(entry.get("execution/ex")), "runs": _round(entry.get("execution/runs")),
            "timeouts": _round(entry.get("execution/timeouts"))}
        for key, value in entry.items():
            if key.startswith("rewards/") and key.endswith("/mean"):
                fields[f"reward_{key.split('/')[1]}"] = _round(value)
        step_s, gen_s, reward_s = (entry.get(k) for k in ("step_time", "time/generation_s", "time/reward_s"))
        if step_s is not None:
            fields["step_s"] = round(step_s, 3)
            if gen_s is not None and reward_s is not None:
                fields.update(generation_s=round(gen_s, 3), reward_s=round(reward_s, 3),
                              update_s=round(max(0.0, step_s - gen_s - reward_s), 3),
                              reward_share=round(reward_s / step_s, 4) if step_s else None)
        fields["eta_s"] = self.eta_s(state, now)
        fields = {k: v for k, v in fields.items() if v is not None}
        logs.event(log, "train step", **fields)
        if self.tracker is not None:
            self.tracker.log_metrics({k: v for k, v in fields.items() if k not in ("step", "max_steps")},
                                     state.global_step, prefix="train/")


def trainer_class() -> Any:
    """TRL's GRPOTrainer, timing the generation and the rewards of each step (TRL itself logs `step_time`)."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def _timed(self, name: str, fn: Any, *a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._metrics["train" if self.model.training else "eval"][name].append(time.perf_counter() - t0)

        def _generate_single_turn(self, *a: Any, **kw: Any) -> Any:
            return self._timed("time/generation_s", super()._generate_single_turn, *a, **kw)

        def _calculate_rewards(self, *a: Any, **kw: Any) -> Any:
            return self._timed("time/reward_s", super()._calculate_rewards, *a, **kw)

    return TimedGRPOTrainer


def build_trainer(cfg: Config, policy: str, precision: Any, model: Any, tokenizer: Any, train_ds: Any, template: Any,
                  run_dir: Path, callbacks: list[Any], scorer: Any, extra_args: dict[str, Any] | None = None) -> Any:
    """The GRPOTrainer for the Config; `extra_args` (GRPOConfig fields) are for benchmarks measuring a change."""
    from transformers import PrinterCallback, ProgressCallback
    from trl import GRPOConfig

    from sqltune import prompts
    from sqltune.finetune import rewards
    from sqltune.finetune.schedule import budget_trainer
    from sqltune.finetune.trainer import fit_loss_to_cpu

    fit_loss_to_cpu(precision)  # the policy's log-probabilities of its completions, not of the schema prompt
    # every value set from our Config, as the SFT trainer does: TRL's defaults change between releases
    args = GRPOConfig(**{**dict(
        output_dir=str(run_dir / manifests.CHECKPOINTS),
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.train_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        activation_checkpointing=cfg.gradient_checkpointing,
        bf16=precision.name == "bf16", fp16=precision.name == "fp16", use_cpu=precision.device == "cpu",
        num_generations=cfg.grpo_num_generations, temperature=cfg.grpo_temperature, top_p=1.0, top_k=0,
        max_completion_length=cfg.grpo_max_completion_length, beta=cfg.grpo_beta, loss_type=cfg.grpo_loss_type,
        scale_rewards="group", num_iterations=1, epsilon=0.2, mask_truncated_completions=False,
        use_vllm=cfg.grpo_vllm != "off", vllm_mode=cfg.grpo_vllm if cfg.grpo_vllm != "off" else "colocate",
        remove_unused_columns=False, shuffle_dataset=True, disable_dropout=True, log_completions=False,
        logging_strategy="steps", logging_steps=cfg.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        eval_strategy="no", report_to="none", seed=cfg.seed, data_seed=cfg.seed,
        disable_tqdm=not logs.show_progress(), dataloader_num_workers=0, ddp_find_unused_parameters=False,
    ), **(extra_args or {})})
    eos_ids = sorted({tokenizer.eos_token_id, *_ids(model.generation_config.eos_token_id)} - {None})

    def extract(text: str) -> str:
        return prompts.extract_sql(text, tokenizer.eos_token, template)

    funcs, weights = rewards.build(cfg.grpo_rewards, scorer, runs=cfg.grpo_reward_runs, extract=extract,
                                   eos_ids=eos_ids)
    args.reward_weights = weights
    peft_config = None
    if policy == "lora":
        from peft import LoraConfig

        targets: Any = "all-linear" if cfg.target_modules == ["all-linear"] else cfg.target_modules
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets, bias="none", task_type="CAUSAL_LM")
    trainer = budget_trainer(trainer_class(), cfg)(
        model=model, reward_funcs=funcs, args=args, train_dataset=train_ds, processing_class=tokenizer,
        peft_config=peft_config, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    if not logs.show_progress():
        trainer.remove_callback(ProgressCallback)
    return trainer


def _ids(value: Any) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def scorer_for(cfg: Config) -> Any:
    from sqltune.finetune import rewards

    return rewards.Scorer(rewards.Limits(timeout_s=cfg.grpo_reward_timeout, row_cap=cfg.grpo_reward_row_cap),
                          workers=cfg.grpo_reward_workers)


def run(cfg: Config, sources: dict[str, str] | None = None) -> Path:
    """The GRPO job, from the Config to a published merged model; returns the local folder of the model."""
    check_config(cfg)
    import datasets
    import torch
    import transformers

    from sqltune import generation, tracking
    from sqltune.export import merge
    from sqltune.finetune import attempts, common
    from sqltune.finetune.callbacks import CheckpointManifest, DiskSpaceCheck, HeapTrim, StopControl
    from sqltune.models import base_models

    started = time.time()
    transformers.set_seed(cfg.seed)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if not logs.show_progress():
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
    precision = generation.choose_precision(cfg.dtype, training=True)
    policy = cfg.grpo_policy
    if not cfg.learning_rate:
        cfg = dataclasses.replace(cfg, learning_rate=DEFAULT_LR[policy])
    logs.event(log, "finetune starting", model=cfg.model_name, method="grpo", policy=policy, dtype=precision.name,
               dtype_reason=precision.reason, learning_rate=cfg.learning_rate, output=cfg.output_dir,
               num_generations=cfg.grpo_num_generations, temperature=cfg.grpo_temperature, beta=cfg.grpo_beta,
               rewards=cfg.grpo_rewards, generation="vllm " + cfg.grpo_vllm if cfg.grpo_vllm != "off" else "transformers",
               overrides=sources or {}, torch=torch.__version__)

    run_dir, ckpt_root, resume_from = common.prepare_run(cfg, policy)
    splits = common.load_data(cfg)
    real = check_databases(splits.train)
    base_name, base_info = base_models.resolve_source(cfg.model_name)
    tokenizer = base_models.load_tokenizer(base_name, cfg.trust_remote_code)
    template, answer_tokens = start_template(base_name, tokenizer, cfg)
    train_ds, too_long = to_dataset(splits.train, template, tokenizer, cfg.max_seq_length)
    if too_long:
        splits.report.skipped["too_long"] += too_long
    splits.report.train = len(train_ds)
    logs.event(log, "prompt template", prompt=template.prompt, stops=list(template.stops))
    logs.event(log, "data ready", **splits.report.to_dict(), rows_with_real_database=real)
    if len(train_ds) == 0:
        raise DataError(f"no training rows (longer than max_seq_length={cfg.max_seq_length} tokens: {too_long})",
                        "check --dataset and --dataset-limit, or raise --max-seq-length")
    model = base_models.load_base(base_name, base_models.weight_precision(precision, policy),
                                  trust_remote_code=cfg.trust_remote_code)

    stop = StopControl(cfg.max_train_minutes)
    budget = attempts.from_config(cfg)
    tracker = tracking.for_finetune(cfg, ckpt_root, resuming=resume_from is not None)
    scorer = scorer_for(cfg)
    try:
        trainer = build_trainer(cfg, policy, precision, model, tokenizer, train_ds, template, run_dir, scorer=scorer,
                                callbacks=[GrpoLogs(tracker, cfg.max_train_minutes), CheckpointManifest(), stop, budget, HeapTrim(),
                                           DiskSpaceCheck()])
        metrics = common.train(trainer, cfg, ckpt_root, resume_from, stop, budget, started)
    finally:
        scorer.close()
    history = [h for h in trainer.state.log_history if "reward" in h]
    metrics.update({
        "reward_history": [{"step": h["step"], "reward": round(h["reward"], 4),
                            **({"ex": round(h["execution/ex"], 4)} if "execution/ex" in h else {})} for h in history],
        "grpo": {"policy": policy, "num_generations": cfg.grpo_num_generations, "temperature": cfg.grpo_temperature,
                 "beta": cfg.grpo_beta, "loss_type": cfg.grpo_loss_type, "rewards": list(cfg.grpo_rewards)}})
    metrics["peak_rss_train_mb"] = common.peak_rss_mb()
    trainer.ref_model = None  # the KL reference (a full policy's second copy) is not needed to export
    common.release_training_state(trainer)
    if not logs.is_rank0():
        return run_dir
    final = merge.export(trainer, cfg, method=policy, precision=precision, base_name=base_name, run_dir=run_dir,
                         template=template, data_report=splits.report.to_dict(), metrics=metrics, base=base_info,
                         max_new_tokens=answer_tokens or cfg.grpo_max_completion_length,
                         check=common.heldout_check(cfg, splits.eval, splits.train), tracking=tracking.describe(tracker))
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, trainer.state.global_step,
                            prefix="final/")
        tracker.close()
    where = registry.publish(final, cfg.output_dir)
    logs.event(log, "finetune finished", output=where, method="grpo", wall_s=round(time.time() - started, 1),
               peak_rss_mb=common.peak_rss_mb(), steps=trainer.state.global_step)
    return final
