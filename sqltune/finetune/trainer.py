"""Trainer construction for the fine-tuning job: prompt/completion pairs, the tokenized dataset, and
TRL's SFTTrainer with every setting taken from the Config.

    python benchmarks/train_throughput.py     # builds trainers with these functions and times steps
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqltune import logs
from sqltune.artifacts import manifests
from sqltune.config import Config
from sqltune.errors import ConfigError


def build_pairs(examples: list[Any], template: Any) -> list[tuple[str, str]]:
    return [(template.build_prompt(ex.question, ex.context), template.build_completion(ex.answer)) for ex in examples]


def device_map() -> Any:
    import torch

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return None


def to_dataset(pairs: list[tuple[str, str]], tokenizer: Any, max_len: int, per_row: int = 1) -> tuple[Any, int]:
    """The training rows as token ids, without the rows longer than max_len (counted, never truncated:
    a cut-off answer would teach the model to stop mid-query).

    Tokenized here rather than by TRL so that the prompt's ids are exactly `prompts.encode_prompt`,
    which every inference path feeds (special tokens such as Gemma's `<bos>` included); the
    completion is the SQL, then EOS, and `completion_mask` puts the loss on it alone. With `per_row` > 1,
    questions whose prompts begin with the same context share a row (`shared_context.pack_rows`).
    """
    from datasets import Dataset

    from sqltune.finetune.shared_context import pack_rows
    from sqltune.prompts import encode_completion, encode_prompt

    encoded = [(encode_prompt(tokenizer, prompt), encode_completion(tokenizer, completion)) for prompt, completion in pairs]
    fitting = [(p, c) for p, c in encoded if len(p) + len(c) <= max_len]
    if per_row > 1:
        rows = pack_rows(fitting, per_row, max_len)
    else:
        rows = [{"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)} for p, c in fitting]
    empty = {"input_ids": [], "completion_mask": []}
    return Dataset.from_list(rows) if rows else Dataset.from_dict(empty), len(pairs) - len(fitting)


# TRL computes the loss through a fused lm_head in [tokens x vocab] tiles; its defaults (4096 x 32768)
# suit a GPU, but on a CPU each fp32 temporary of a tile is 512 MiB and several live at once.
CPU_LOSS_TILE = (1024, 8192)


def limit_loss_tiles(tokens: int, vocab: int) -> dict[str, int]:
    """Set the size of TRL's fused-lm_head loss tiles (process-wide); returns what was set.

    Module constants read at call time (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE and
    trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE); absent in another TRL release, nothing is changed.
    """
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    done = {}
    if hasattr(kernel, "TOKEN_CHUNK_SIZE"):
        kernel.TOKEN_CHUNK_SIZE = done["tokens"] = tokens
    if hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = done["vocab"] = vocab
    return done


def score_labelled_only(enabled: bool = True) -> bool:
    """Make TRL's fused LM head score only the positions that carry a label (the SQL) on every device (process-wide);
    returns whether the switch was found.

    TRL compacts the hidden states to the labelled positions on Triton devices only, and elsewhere scores every
    position, prompt included, then zeroes the unlabelled ones. On a CPU that is the [tokens x vocabulary]
    projection, its softmax and their backward over a schema prompt several times longer than its answer: the
    same loss and gradient for a fraction of the work. The decision is `trl.trainer.utils._use_triton`, read at
    each forward; the kernel keeps its own copy of that function, so its tiles still run in torch here. In another
    TRL release without it, nothing is changed.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        return False
    original = getattr(original, "__wrapped__", original)
    if not enabled:
        trl_utils._use_triton = original
        return True

    def compact(device: Any) -> bool:
        return True

    compact.__wrapped__ = original  # type: ignore[attr-defined]
    trl_utils._use_triton = compact
    return True


def fit_loss_to_cpu(precision: Any) -> None:
    """On a CPU, TRL's fused loss (SFT's and GRPO's) in tiles sized for its memory, over the labelled positions
    only."""
    if precision.device == "cpu":
        limit_loss_tiles(*CPU_LOSS_TILE)
        score_labelled_only()


def split_rows(inputs: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    """A padded batch as consecutive groups of rows of at most `budget` tokens each (at least one row per group):
    the whole batch when it fits."""
    ids = inputs["input_ids"]
    rows, length = ids.shape[0], ids.shape[1]
    if budget <= 0 or rows * length <= budget:
        return [inputs]
    per = max(1, budget // length)
    return [{k: v[i:i + per] if hasattr(v, "shape") and v.shape[:1] == ids.shape[:1] else v for k, v in inputs.items()}
            for i in range(0, rows, per)]


def token_budget_trainer(base: type) -> type:
    """`base` (TRL's SFTTrainer) whose step runs a batch longer than `token_budget` tokens as several forward and
    backward passes over groups of its rows. The loss of each group is its completion tokens' summed loss over the
    whole batch's count (`num_items_in_batch`, which the Trainer computes before the step), so the gradient is the
    batch's own: the same rows, the same update, and activation memory bounded by the budget instead of growing
    with the longest rows (a Spider schema of 700 tokens at batch 8 held 10 GB)."""

    class TokenBudgetTrainer(base):  # type: ignore[misc, valid-type]
        token_budget = 0

        def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            if "segment_ids" not in inputs:
                return super().compute_loss(model, inputs, *args, **kwargs)
            # rows packed behind a shared context (shared_context.py): the mask that keeps their questions apart
            from sqltune.finetune.shared_context import attention_mask

            eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
            padding = inputs["attention_mask"]
            packed = {k: v for k, v in inputs.items() if k != "segment_ids"}
            packed["attention_mask"] = attention_mask(inputs["segment_ids"], model.dtype if eager else None)
            result = super().compute_loss(model, packed, *args, **kwargs)
            if model.training and hasattr(self, "_total_train_tokens"):
                # TRL counts tokens as the sum of the mask it was given: count the real ones
                self._total_train_tokens += int(padding.sum()) - int(packed["attention_mask"].bool().sum())
            return result

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            groups = split_rows(inputs, self.token_budget)
            if len(groups) == 1:
                return super().training_step(model, inputs, num_items_in_batch)
            if num_items_in_batch is None:  # each group's mean would then weigh its few rows as a whole batch
                num_items_in_batch = int((inputs["labels"][:, 1:] != -100).sum())
            total = None
            for group in groups:
                loss = super().training_step(model, group, num_items_in_batch)
                total = loss if total is None else total + loss
            return total

    return TokenBudgetTrainer


def build_trainer(cfg: Config, method: str, precision: Any, model: Any, tokenizer: Any, train_ds: Any,
                   eval_ds: Any, run_dir: Path, callbacks: list[Any], extra_args: dict[str, Any] | None = None) -> Any:
    """TRL's SFTTrainer for the Config; `extra_args` (SFTConfig fields) are for benchmarks measuring a change."""
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from sqltune.finetune.schedule import budget_trainer

    fit_loss_to_cpu(precision)

    # Every value set from our Config: TRL/transformers defaults (bf16, gradient checkpointing, lr 2e-5)
    # change between releases and would silently change the recipe.
    args = SFTConfig(**{**dict(
        output_dir=str(run_dir / manifests.CHECKPOINTS),
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.train_batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5 name; gradient_checkpointing warns
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
    ), **(extra_args or {})})
    peft_config = None
    if method in ("lora", "qlora"):
        from peft import LoraConfig

        targets: Any = cfg.target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets, bias="none", task_type="CAUSAL_LM")
    collator = None
    if "segments" in train_ds.column_names:
        from sqltune.finetune.shared_context import SharedContextCollator

        if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
            raise ConfigError(f"shared_context_rows > 1 needs a per-row attention mask, which "
                              f"{model.config._attn_implementation} attention does not take",
                              "set shared_context_rows: 1, or load the model with sdpa attention")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        collator = SharedContextCollator(pad)
        args.remove_unused_columns = False  # the collator reads each row's `segments`
    trainer_class = budget_trainer(token_budget_trainer(SFTTrainer), cfg)
    trainer = trainer_class(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
                            data_collator=collator)
    trainer.token_budget = cfg.batch_token_budget
    trainer.remove_callback(PrinterCallback)  # our JSON lines replace the raw dict prints
    if not logs.show_progress():
        trainer.remove_callback(ProgressCallback)
    return trainer
