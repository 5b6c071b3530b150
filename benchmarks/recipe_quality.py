"""Does the recipe matter? The tiny model trained twice on ../shared data, then EX on one held-out split.

    nice -n 10 python benchmarks/recipe_quality.py --steps 300 --eval-limit 200

Same base (sqltune.models.base_models.build_tiny with the same texts and seed, so the same tokenizer and
initial weights), same rows, same optimiser settings and number of steps; only the recipe differs:

  tutorial  loss on the whole text, no EOS after the answer, and at inference the prompt stops
            after the context (no `Answer:`), as the tutorial's curl sends it. TRL appends EOS to a
            plain text column by itself, so the text is tokenised here and handed over as input_ids.
  sqltune   `sqltune finetune`: loss on the SQL only, EOS after it, the prompt ends with `Answer:`,
            and `sqltune eval --model` generates with the template stored in the artifact.

The tutorial model's output is scored twice: as served (the whole continuation is the answer) and
leniently (a leading `Answer:` dropped and the text cut at the first statement by sqltune's own
extract_sql). Writes benchmarks/results/recipe_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "sql-create-context" / "train.jsonl"
RESULTS = ROOT / "benchmarks" / "results"
# one thread: on a shared 2-core machine a second thread mostly waits (0.47 s/step vs 2.3 s/step measured)
THREADS = "1"


def sqltune(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "sqltune", *args], cwd=ROOT, text=True, capture_output=True,
                          env={**os.environ, "SQLTUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": THREADS})
    if proc.returncode != 0:
        raise SystemExit(f"sqltune {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def train_tutorial(args: argparse.Namespace, out: Path) -> float:
    """The tutorial's SFT on the same base: whole-text loss, no EOS. Returns the training seconds."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from sqltune.data import loading
    from sqltune.models import base_models
    from sqltune.prompts import DEFAULT_TEMPLATE as T

    torch.set_num_threads(args.threads)
    splits = loading.load_splits(str(DATA), eval_fraction=args.eval_fraction, seed=args.seed)
    pairs = [(T.build_prompt(e.question, e.context), T.build_completion(e.answer)) for e in splits.train]
    # exactly what `sqltune finetune --model tiny` builds, so both runs start from the same weights
    model, tok = base_models.build_tiny((p + c for p, c in pairs), layers=args.layers, vocab_size=2048,
                                     seed=args.seed, max_positions=1024)
    ids = [tok(p + c)["input_ids"] for p, c in pairs]
    ds = Dataset.from_list([{"input_ids": x} for x in ids if len(x) <= 512])
    cfg = SFTConfig(output_dir=str(out / "checkpoints"), learning_rate=args.lr, lr_scheduler_type="cosine",
                    warmup_steps=0.03, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    max_length=512, packing=False, completion_only_loss=False, use_cpu=not torch.cuda.is_available(),
                    bf16=False, fp16=False, save_strategy="no", report_to="none", logging_steps=50, seed=args.seed,
                    data_seed=args.seed, disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return seconds


def tutorial_predictions(args: argparse.Namespace, model_dir: Path, examples: list[Any]) -> list[dict[str, Any]]:
    """Greedy completions of `Question: ...\\nContext: ...\\n` (no `Answer:`), as the tutorial serves."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sqltune.prompts import DEFAULT_TEMPLATE as T
    from sqltune.prompts import extract_sql

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    served = [T.build_prompt(e.question, e.context).removesuffix("Answer:") for e in examples]
    rows = []
    for i in range(0, len(served), 16):
        batch = tok(served[i:i + 16], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for e, seq in zip(examples[i:i + 16], out[:, batch["input_ids"].shape[1]:], strict=True):
            text = tok.decode(seq, skip_special_tokens=True)
            rows.append({"question": e.question, "context": e.context, "raw": text,
                         "as_served": text.strip(),
                         "lenient": extract_sql(text.strip().removeprefix("Answer:"))})
    return rows


def ex_of(report_dir: Path) -> dict[str, Any]:
    report = json.loads((report_dir / "report.json").read_text())
    return {m: report["results"]["metrics"][m] for m in ("ex", "em_norm", "valid", "executable")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="Optimizer steps for each recipe.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="Peak LR (sqltune's default for the tiny model).")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--eval-limit", type=int, default=200, help="Held-out examples scored.")
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/sqltune-recipe-quality")
    args = parser.parse_args(argv)
    global THREADS
    THREADS = str(args.threads)
    if not DATA.is_file():
        print(f"no data at {DATA}", file=sys.stderr)
        return 1
    from sqltune import config
    from sqltune.evaluate.cli import load_examples

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--dataset", str(DATA), "--split", "eval", "--limit", str(args.eval_limit),
              "--eval-fraction", str(args.eval_fraction), "--seed", str(args.seed)]
    cfg, sources = config.load(common, {})
    examples, _ = load_examples(cfg, sources, {})

    # sqltune's recipe, exactly as a user runs it
    t0 = time.perf_counter()
    sqltune("finetune", "--model", "tiny", "--method", "full", "--dataset", str(DATA), "--max-steps", str(args.steps),
            "--learning-rate", str(args.lr), "--train-batch-size", str(args.batch_size), "--tiny-layers",
            str(args.layers), "--eval-fraction", str(args.eval_fraction), "--seed", str(args.seed),
            "--eval-generate-limit", "0", "--save-steps", "100000", "--logging-steps", "50",
            "--output", str(work / "sqltune-model"))
    sqltune_train_s = time.perf_counter() - t0
    sqltune("eval", "--model", str(work / "sqltune-model"), *common, "--report-dir", str(work / "sqltune-report"),
            "--eval-max-new-tokens", str(args.max_new_tokens))

    # the tutorial's recipe
    tutorial_train_s = train_tutorial(args, work / "tutorial")
    rows = tutorial_predictions(args, work / "tutorial" / "model", examples)
    results: dict[str, Any] = {}
    for variant in ("as_served", "lenient"):
        path = work / f"tutorial-{variant}.jsonl"
        path.write_text("".join(json.dumps({"question": r["question"], "context": r["context"],
                                            "predicted": r[variant]}) + "\n" for r in rows))
        sqltune("eval", "--predictions", str(path), *common, "--report-dir", str(work / f"tutorial-{variant}-report"))
        results[f"tutorial_{variant}"] = ex_of(work / f"tutorial-{variant}-report")
    results["sqltune"] = ex_of(work / "sqltune-report")
    summary = {
        "data": str(DATA.relative_to(ROOT.parent)), "held_out_examples": len(examples), "steps": args.steps,
        "batch_size": args.batch_size, "learning_rate": args.lr, "layers": args.layers, "seed": args.seed,
        "train_seconds": {"tutorial": round(tutorial_train_s, 1), "sqltune_finetune_wall": round(sqltune_train_s, 1)},
        "results": results,
        "tutorial_output_sample": rows[0]["raw"][:300] if rows else "",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recipe_quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    for name, r in results.items():
        print(f"{name:22s} EX {r['ex']['value']:.1%} ({r['ex']['count']}/{r['ex']['total']})  "
              f"valid {r['valid']['value']:.1%}  executable {r['executable']['value']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
