"""Training throughput: the tutorial's recipe against sqltune's default, same tiny model, same rows.

    python benchmarks/train_throughput.py                # 1,000 rows of ../shared data (synthetic if absent)
    python benchmarks/train_throughput.py --examples 256
    BENCH_BATCH=4 BENCH_CKPT=1 python benchmarks/train_throughput.py   # sqltune's batch size / checkpointing

Tutorial recipe, reproduced faithfully: batch 1, gradient checkpointing, group_by_length, no packing,
loss on the whole text (TRL appends one EOS per example where the tutorial had none: one token in ~60,
no effect on throughput). sqltune's: batch 16, no checkpointing (the model fits), loss on the SQL only.
Each recipe runs in its own process (peak RSS is per process) over the same examples; figures go
to benchmarks/results/train_throughput.json. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--recipe", choices=["tutorial", "sqltune"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default="/tmp/sqltune-bench-train")
    args = parser.parse_args()
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
