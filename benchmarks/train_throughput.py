"""Training throughput: the tutorial's recipe against sqltune's default, same tiny model, same rows.

    python benchmarks/train_throughput.py                # 1,000 rows of ../shared data (synthetic if absent)
    python benchmarks/train_throughput.py --examples 256
    BENCH_BATCH=4 BENCH_CKPT=1 python benchmarks/train_throughput.py   # sqltune's batch size / checkpointing

Tutorial recipe, reproduced faithfully: batch 1, gradient checkpointing, group_by_length, no packing,
loss on the whole text (TRL appends one EOS per example where the tutorial had none: one token in ~60,
no effect on throughput). sqltune's: batch 16, no checkpointing (the model fits), loss on the SQL only.
Each recipe runs in its own process (peak RSS is per process) over the same examples; figures go
to benchmarks/results/train_throughput.json. Timings are reported, never asserted.

The demo recipe's per-step cost, one change at a time (configs/smollm2-135m-cpu.yaml on SmolLM2-135M,
the same rows in the same order, a fixed number of steps, each variant in its own process, side by side):

    python benchmarks/train_throughput.py --variants fp32-ckpt,bf16-ckpt,bf16,bf16-padfree --steps 8

  fp32-ckpt     the recipe as it was: LoRA, fp32, gradient checkpointing, length-grouped padded batches
  bf16-ckpt     LoRA, bf16 compute (AMX / AVX512-BF16), checkpointing on
  bf16          LoRA, bf16, no checkpointing
  bf16-padfree  LoRA, bf16, no checkpointing, padding-free batches (one flattened row, position_ids mark the
                boundaries; transformers builds the block-diagonal mask from them)
  bf16-full     bf16, no checkpointing, full fine-tune (every weight trained; the SmolLM2 demo recipe)
  fp32-full     the same in fp32
  *-bN          any variant at batch size N (the demo's is 8), e.g. bf16-full-b16
  *-gaN         any variant accumulating the gradients of N batches per optimizer step, e.g. bf16-full-ga2
  *-allpos      any variant with the LM head over every position, prompt included (TRL's default off Triton
                devices; sqltune's CPU runs score the labelled positions only): -bN / -gaN go before it
  *-compile     any variant with torch.compile (inductor) on the model, after -allpos
  *-eval        any variant + the end-of-training eval-loss pass over the job's 256 eval rows, timed apart

Reported per variant: input tokens/s and s/step over the steps after the first (warm-up), CPU-seconds of
the process (user + system: what a busy machine does not change), peak RSS. Written to
benchmarks/results/train_throughput_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def _rows(n: int) -> tuple[str, list]:
    from sqltune.data import loading

    source = str(SHARED) if SHARED.is_file() else f"synthetic:{n * 2}"
    splits = loading.load_splits(source, limit=n, eval_fraction=0.0, seed=0)
    return source, splits.train


def run_recipe(recipe: str, n: int, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from sqltune import generation
    from sqltune.config import Config
    from sqltune.finetune.trainer import build_trainer, to_dataset
    from sqltune.models import base_models
    from sqltune.prompts import DEFAULT_TEMPLATE as T

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    source, examples = _rows(n)
    pairs = [(T.build_prompt(e.question, e.context), T.build_completion(e.answer)) for e in examples]
    model, tok = base_models.build_tiny((p + c for p, c in pairs), layers=4, vocab_size=2048, seed=0)
    precision = generation.choose_precision("fp32")
    if recipe == "tutorial":
        # the tutorial's SFT: one text column, loss on every token, batch 1, checkpointing, length grouping
        ds = Dataset.from_list([{"text": p + c} for p, c in pairs])
        args = SFTConfig(output_dir=str(workdir), per_device_train_batch_size=1, gradient_accumulation_steps=1,
                         gradient_checkpointing=True, train_sampling_strategy="group_by_length", packing=False,
                         max_length=512, learning_rate=2e-4, num_train_epochs=1, max_steps=-1, logging_steps=10**6,
                         save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
                         dataset_text_field="text", completion_only_loss=False, disable_tqdm=True,
                         include_num_input_tokens_seen="non_padding", seed=0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        trainer.remove_callback(PrinterCallback)
    else:
        cfg = Config(train_batch_size=int(os.environ.get("BENCH_BATCH", "16")), gradient_checkpointing=os.environ.get("BENCH_CKPT") == "1", max_seq_length=512, learning_rate=3e-3, num_train_epochs=1,
                     save_steps=10**6, logging_steps=10**6, eval_generate_limit=0)
        ds, _ = to_dataset(pairs, tok, cfg.max_seq_length)
        trainer = build_trainer(cfg, "full", precision, model, tok, ds, None, workdir, [])
    loader = trainer.get_train_dataloader()
    supervised = sum(int((b["labels"] != -100).sum()) for b in loader)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    tokens = int(trainer.state.num_input_tokens_seen)
    # recorded relative to the repository, so the figures read the same on every machine
    shown = os.path.relpath(source, ROOT) if source == str(SHARED) else source
    return {"recipe": recipe, "source": shown, "examples": len(pairs), "steps": trainer.state.global_step,
            "wall_s": round(wall, 2), "input_tokens": tokens, "input_tokens_per_s": round(tokens / wall, 1),
            "supervised_tokens": supervised, "supervised_tokens_per_s": round(supervised / wall, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


VARIANTS = {  # name -> (dtype, gradient checkpointing, padding-free, method)
    "fp32-ckpt": ("fp32", True, False, "lora"), "bf16-ckpt": ("bf16", True, False, "lora"),
    "fp32": ("fp32", False, False, "lora"), "bf16": ("bf16", False, False, "lora"),
    "bf16-padfree": ("bf16", False, True, "lora"), "fp32-padfree": ("fp32", False, True, "lora"),
    "bf16-full": ("bf16", False, False, "full"), "fp32-full": ("fp32", False, False, "full"),
}
# any variant at another batch size or with gradient accumulation: bf16-full-b16, bf16-full-ga2
BATCH_SUFFIX = re.compile(r"-(b|ga)(\d+)$")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_recipe(model_name: str, overrides: dict[str, Any], dtype: str | None = None,
                mix: bool = False) -> tuple[Any, ...]:
    """configs/<model>-cpu.yaml with `overrides` (no saves, no logging) on the shared rows, or with `mix` on the
    config's own sources (the demo's: single-table rows and Spider's databases): (config, precision, splits,
    tokenizer, model, train dataset), as the job builds them."""
    from sqltune import config, generation
    from sqltune.data import loading
    from sqltune.finetune import common
    from sqltune.finetune import trainer as sft
    from sqltune.models import base_models
    from sqltune.prompts import DEFAULT_TEMPLATE

    cfg, _ = config.resolve(str(ROOT / "configs" / f"{model_name}-cpu.yaml"), {},
                            {"save_steps": "100000", "logging_steps": "100000", **overrides,
                             **({} if mix else {"dataset": str(SHARED)})})
    precision = generation.choose_precision(dtype or cfg.dtype, training=True)
    splits = (common.load_data(cfg) if mix else
              loading.load_splits(str(SHARED), eval_fraction=cfg.eval_fraction, seed=cfg.seed))
    base_name, _ = base_models.resolve_source(model_name)
    tok = base_models.load_tokenizer(base_name)
    model = base_models.load_base(base_name, base_models.weight_precision(precision, cfg.method))
    model.config.use_cache = False
    train_ds, _ = sft.to_dataset(sft.build_pairs(splits.train, DEFAULT_TEMPLATE), tok, cfg.max_seq_length)
    return cfg, precision, splits, tok, model, train_ds


def run_variant(name: str, model_name: str, steps: int, workdir: Path, mix: bool = False) -> dict:
    """One variant of the demo recipe for `steps` steps; per-step times from a callback."""
    import torch
    from transformers import TrainerCallback

    from sqltune.finetune import trainer as sft
    from sqltune.prompts import DEFAULT_TEMPLATE

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    base_variant, with_eval = name.removesuffix("-eval"), name.endswith("-eval")
    base_variant, compiled = base_variant.removesuffix("-compile"), base_variant.endswith("-compile")
    base_variant, all_positions = base_variant.removesuffix("-allpos"), base_variant.endswith("-allpos")
    batch = BATCH_SUFFIX.search(base_variant)
    dtype, ckpt, padfree, method = VARIANTS[BATCH_SUFFIX.sub("", base_variant)]
    cfg, precision, splits, tok, model, train_ds = load_recipe(
        model_name, {"max_steps": str(steps), "gradient_checkpointing": ckpt, "method": method,
                     **({{"b": "train_batch_size", "ga": "gradient_accumulation_steps"}[batch.group(1)]: batch.group(2)}
                        if batch else {})}, dtype, mix)
    eval_ds, _ = sft.to_dataset(sft.build_pairs(splits.eval, DEFAULT_TEMPLATE), tok, cfg.max_seq_length)
    eval_ds = eval_ds.shuffle(seed=cfg.seed).select(range(min(256, len(eval_ds))))

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float, int]] = []

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            self.marks.append((time.perf_counter(), _cpu_s(), int(state.num_input_tokens_seen)))

    clock = Clock()
    trainer = sft.build_trainer(cfg, cfg.method, precision, model, tok, train_ds, eval_ds, workdir, [clock],
                                extra_args={**({"padding_free": True, "max_length": None} if padfree else {}),
                                            **({"torch_compile": True} if compiled else {})} or None)
    if all_positions:  # as TRL does off Triton devices: the LM head and its softmax over every position
        sft.score_labelled_only(False)
    t0, c0 = time.perf_counter(), _cpu_s()
    trainer.train()
    (t1, c1, n1), (tn, cn, nn) = clock.marks[0], clock.marks[-1]
    out = {"variant": name, "model": model_name, "method": cfg.method, "dtype": precision.name,
           "gradient_checkpointing": ckpt,
           "rows": "the config's sources" if mix else "sql-create-context", "padding_free": padfree,
           "torch_compile": compiled,
           "lm_head_positions": "all" if all_positions else "labelled", "steps": len(clock.marks), "batch_size": cfg.train_batch_size,
           "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
           "s_per_step": round((tn - t1) / (len(clock.marks) - 1), 3),
           "cpu_s_per_step": round((cn - c1) / (len(clock.marks) - 1), 3),
           "input_tokens_per_s": round((nn - n1) / (tn - t1), 1),
           "input_tokens_per_cpu_s": round((nn - n1) / (cn - c1), 1),
           "train_wall_s": round(tn - t0, 1), "train_cpu_s": round(cn - c0, 1),
           "final_loss": round(float(trainer.state.log_history[-1].get("train_loss", float("nan"))), 4)}
    if with_eval:
        e0, ec0 = time.perf_counter(), _cpu_s()
        out["eval_loss"] = round(trainer.evaluate()["eval_loss"], 4)
        out["eval_pass_s"], out["eval_pass_cpu_s"] = round(time.perf_counter() - e0, 1), round(_cpu_s() - ec0, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def _save_variants(args: argparse.Namespace, results: list[dict]) -> None:
    first = results[0]
    for r in results:
        r["speedup_tokens_per_s"] = round(r["input_tokens_per_s"] / first["input_tokens_per_s"], 2)
        r["speedup_tokens_per_cpu_s"] = round(r["input_tokens_per_cpu_s"] / first["input_tokens_per_cpu_s"], 2)
    run = {"command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]), "created": args.created,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "model": args.model,
           "steps": args.steps, "baseline": first["variant"], "variants": results,
           "load_average_at_end": os.getloadavg()[0]}  # other work on the machine inflates both wall and CPU time
    # every run is kept beside the earlier ones (compare variants within one run: the machine is shared)
    path = RESULTS / f"train_throughput_{args.model}.json"
    runs = json.loads(path.read_text()).get("runs", []) if path.is_file() else []
    runs = [r for r in runs if r.get("created") != args.created] + [run]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


def run_variants(args: argparse.Namespace) -> int:
    args.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results = []
    for name in args.variants.split(","):
        base = name.removesuffix("-eval").removesuffix("-compile").removesuffix("-allpos")
        if BATCH_SUFFIX.sub("", base) not in VARIANTS:
            raise SystemExit(f"unknown variant {name}; known: {', '.join(VARIANTS)} (each optionally with -bN or "
                             "-gaN, then -allpos, -compile, -eval)")
        out = subprocess.run([sys.executable, __file__, "--variant", name, "--model", args.model, "--steps",
                              str(args.steps), "--workdir", args.workdir, *(["--mix"] if args.mix else [])],
                             capture_output=True, text=True,
                             env={**os.environ, "SQLTUNE_NO_PROGRESS": "1"})
        if out.returncode != 0:
            raise SystemExit(f"variant {name} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
        _save_variants(args, results)  # after each variant: a long run stopped half-way keeps what it measured
    for r in results:
        print(f"{r['variant']:>18}  {r['s_per_step']:6.2f} s/step  {r['input_tokens_per_s']:7.1f} tok/s "
              f"({r['speedup_tokens_per_s']}x)  {r['input_tokens_per_cpu_s']:7.1f} tok/CPU-s "
              f"({r['speedup_tokens_per_cpu_s']}x)  RSS {r['peak_rss_mb']:.0f} MB")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--recipe", choices=["tutorial", "sqltune"], help=argparse.SUPPRESS)
    parser.add_argument("--variants", help="Comma-separated variants of the demo recipe (see above).")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per variant (the first is warm-up).")
    parser.add_argument("--mix", action="store_true",
                        help="Train on the config's own sources (the demo's mix with Spider's schemas), not the "
                             "single-table rows alone.")
    parser.add_argument("--workdir", default="/tmp/sqltune-bench-train")
    args = parser.parse_args()
    if args.variant:  # child process: one variant, result as JSON on stdout
        print(json.dumps(run_variant(args.variant, args.model, args.steps, Path(args.workdir) / args.variant,
                                            args.mix)))
        return 0
    if args.variants:
        return run_variants(args)
    if args.recipe:  # child process: one recipe, result as JSON on stdout
        print(json.dumps(run_recipe(args.recipe, args.examples, Path(args.workdir) / args.recipe)))
        return 0
    results = {}
    for recipe in ("tutorial", "sqltune"):
        out = subprocess.run([sys.executable, __file__, "--recipe", recipe, "--examples", str(args.examples),
                              "--workdir", args.workdir], capture_output=True, text=True, check=True,
                             env={**os.environ, "SQLTUNE_NO_PROGRESS": "1"})
        results[recipe] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[recipe]))
    t, s = results["tutorial"], results["sqltune"]
    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "recipes": results,
        "ratio_input_tokens_per_s": round(s["input_tokens_per_s"] / t["input_tokens_per_s"], 2),
        "ratio_supervised_tokens_per_s": round(s["supervised_tokens_per_s"] / t["supervised_tokens_per_s"], 2),
        "ratio_wall": round(t["wall_s"] / s["wall_s"], 2),
        "ratio_peak_rss": round(s["peak_rss_mb"] / t["peak_rss_mb"], 2),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(summary, indent=2))
    print(f"tokens/s  tutorial {t['input_tokens_per_s']}  sqltune {s['input_tokens_per_s']}  "
          f"ratio {summary['ratio_input_tokens_per_s']}x;  supervised ratio {summary['ratio_supervised_tokens_per_s']}x;  "
          f"wall {t['wall_s']}s vs {s['wall_s']}s;  peak RSS {t['peak_rss_mb']} vs {s['peak_rss_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
