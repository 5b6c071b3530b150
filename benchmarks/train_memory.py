"""Where a LoRA run's memory goes on CPU: peak RSS of a few training steps of a real model, by variant.

    python benchmarks/train_memory.py                      # smollm2-135m, batch 8, 4 steps per variant
    python benchmarks/train_memory.py --model gemma3-270m --steps 3

Each variant runs in its own process (peak RSS is per process) on the same rows of ../shared data:
  trl-tiles     TRL's own fused-lm_head tile size (4096 tokens x 32768 vocab per tile)
  sqltune       sqltune's CPU tiles (sqltune.finetune.trainer.CPU_LOSS_TILE), as `sqltune finetune` runs
  checkpointing sqltune's tiles plus gradient checkpointing (activations recomputed in backward)
RSS is sampled every 20 ms: after loading (model, tokenizer, rows), the peak over training steps, and the
peak over an evaluation pass of 64 rows. Figures go to benchmarks/results/train_memory.json; timings are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("trl-tiles", "sqltune", "checkpointing")


class PeakRss:
    """The largest RSS seen since the last `reset`, sampled in a thread."""

    def __init__(self) -> None:
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def reset(self) -> int:
        seen, self.peak = self.peak, self.proc.memory_info().rss
        return seen


def one(variant: str, model: str, steps: int, batch: int, workdir: Path) -> dict:
    import torch

    from sqltune.config import Config
    from sqltune.data import loading
    from sqltune.finetune.trainer import build_pairs, build_trainer, limit_loss_tiles, to_dataset
    from sqltune.generation import choose_precision
    from sqltune.models import base_models
    from sqltune.prompts import DEFAULT_TEMPLATE

    rss = PeakRss()
    folder, _ = base_models.resolve_source(model)
    splits = loading.load_splits(str(SHARED), limit=batch * steps + 64, eval_fraction=0.0, seed=0)
    cfg = Config(model_name=model, method="lora", lora_r=16, lora_alpha=32, target_modules=["all-linear"],
                 max_steps=steps, train_batch_size=batch, eval_batch_size=batch, max_seq_length=384,
                 gradient_checkpointing=variant == "checkpointing", logging_steps=1000, save_steps=100000)
    precision = choose_precision("fp32")
    tok = base_models.load_tokenizer(folder)
    net = base_models.load_base(folder, precision)
    net.config.use_cache = False
    pairs = build_pairs(splits.train, DEFAULT_TEMPLATE)
    train_ds, _ = to_dataset(pairs[: batch * steps], tok, cfg.max_seq_length)
    eval_ds, _ = to_dataset(pairs[batch * steps:], tok, cfg.max_seq_length)
    trainer = build_trainer(cfg, "lora", precision, net, tok, train_ds, eval_ds, workdir, callbacks=[])
    if variant == "trl-tiles":
        limit_loss_tiles(4096, 32768)  # TRL's defaults, read at call time
    loaded = rss.reset()
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    train_peak = rss.reset()
    trainer.evaluate()
    eval_peak = rss.reset()
    rss.stop = True
    return {"variant": variant, "model": model, "steps": steps, "batch_size": batch, "threads": torch.get_num_threads(),
            "rss_after_load_gb": round(loaded / 2**30, 2), "rss_peak_train_gb": round(train_peak / 2**30, 2),
            "rss_peak_eval_gb": round(eval_peak / 2**30, 2), "s_per_step": round(train_s / steps, 2),
            "fp32_weights_gb": round(sum(p.numel() for p in net.parameters()) * 4 / 2**30, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", default="/tmp/sqltune-bench-memory")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not SHARED.is_file():
        print(f"no data at {SHARED}: nothing to measure", file=sys.stderr)
        return 1
    if args.one:
        print(json.dumps(one(args.one, args.model, args.steps, args.batch_size, Path(args.workdir) / args.one)))
        return 0
    rows = []
    for variant in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", variant, "--model", args.model, "--steps",
                               str(args.steps), "--batch-size", str(args.batch_size), "--workdir", args.workdir],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"train_memory_{args.model}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
