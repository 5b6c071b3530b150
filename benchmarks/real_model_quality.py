"""Does sqltune make a pretrained LLM write correct SQL? EX on the shared rows' held-out split, by recipe.

    nice python benchmarks/real_model_quality.py --minutes 10 --eval-limit 200     # about 40 minutes on 2 cores
    python benchmarks/real_model_quality.py --model gemma3-270m --minutes 20

Same base model (an embedded GGUF, converted once), same rows, same held-out split (the question hash of
training, --eval-fraction 0.05), same wall-clock training budget for each recipe:

  zero-shot  the base model as it is, prompted with sqltune's template
  reference  the reference tutorial's recipe: LoRA r=8, alpha=16 on q_proj,v_proj, loss on the whole text,
             no EOS after the answer, and at inference its prompt (the context, no `Answer:`); scored as
             served and leniently (cut at the first statement by sqltune's extract_sql)
  sqltune    `sqltune finetune` with configs/<model>-cpu.yaml's recipe (LoRA on every linear layer, loss on
             the SQL only, EOS learned), then its checkpoints and the published model generating with
             the template stored in the artifact

Each recipe is scored at --points checkpoints spread over its budget with `sqltune eval --predictions`
(execution accuracy on synthesised databases). Writes benchmarks/results/real_model_quality_<model>.json
and .png (EX against minutes of training). Figures are reported, never asserted.
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


def sqltune(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "sqltune", *args], cwd=ROOT, text=True, capture_output=True,
                          env={**os.environ, "SQLTUNE_NO_PROGRESS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"sqltune {' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def by_kind(report_dir: Path) -> dict[str, Any]:
    """EX of a report's scored rows split into single-table (WikiSQL-style) and multi-table (Spider-style)."""
    from sqltune.data.loading import table_kind

    records = [json.loads(line) for line in (report_dir / "predictions.jsonl").read_text().splitlines() if line]
    out = {}
    for kind in ("single_table", "multi_table"):
        rows = [r for r in records if r["gold_ok"] and table_kind(r["context"], r["gold"]) == kind]
        out[kind] = {"n": len(rows), "ex": round(sum(bool(r["ex"]) for r in rows) / len(rows), 4) if rows else None,
                     "executable": round(sum(bool(r["executable"]) for r in rows) / len(rows), 4) if rows else None}
    return out


def report_figures(report_dir: Path) -> dict[str, Any]:
    metrics = json.loads((report_dir / "report.json").read_text())["results"]["metrics"]
    return {**{m: round(metrics[m]["value"], 4) for m in ("ex", "em_norm", "valid", "executable")},
            "by_kind": by_kind(report_dir)}


def score(name: str, rows: list[dict[str, Any]], common: list[str], work: Path) -> dict[str, Any]:
    """EX / EM / valid of predictions, through `sqltune eval --predictions` (the evaluation users run)."""
    path = work / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sqltune("eval", "--predictions", str(path), *common, "--report-dir", str(work / f"{name}-report"))
    return report_figures(work / f"{name}-report")


def generate(model: Any, tok: Any, prompts_: list[str], max_new_tokens: int) -> list[str]:
    from sqltune import generation
    from sqltune.engines import batch
    from sqltune.prompts import DEFAULT_TEMPLATE

    loaded = generation.Loaded(model.eval(), tok, DEFAULT_TEMPLATE, Path("."))
    texts = []
    for i in range(0, len(prompts_), 16):
        texts += [c.text for c in batch.generate(loaded, prompts_[i:i + 16], max_new_tokens)]
    return texts


def load(folder: Path | str, adapter: Path | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model, tok


def predictions(examples: list[Any], texts: list[str], cut: Any) -> list[dict[str, Any]]:
    return [{"question": e.question, "context": e.context, "predicted": cut(t)} for e, t in zip(examples, texts,
                                                                                               strict=True)]


def checkpoints_of(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*") if (p / "adapter_config.json").exists()]
    return sorted(found)


def spread(found: list[tuple[int, Path]], points: int) -> list[tuple[int, Path]]:
    if len(found) <= points:
        return found
    if points <= 1:
        return found[-1:] if points == 1 else []
    step = (len(found) - 1) / (points - 1)
    return [found[round(i * step)] for i in range(points)]


def train_reference(args: argparse.Namespace, base: Path, work: Path) -> dict[str, Any]:
    """The tutorial's SFT on the same base and rows: whole-text loss, no EOS, q_proj/v_proj r=8."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sqltune.data import loading
    from sqltune.finetune.callbacks import StopControl
    from sqltune.finetune.trainer import CPU_LOSS_TILE, limit_loss_tiles
    from sqltune.prompts import DEFAULT_TEMPLATE as T

    limit_loss_tiles(*CPU_LOSS_TILE)  # the same memory bound as sqltune's run, so only the recipe differs
    splits = loading.load_splits(str(DATA), eval_fraction=args.eval_fraction, seed=args.seed)
    model, tok = load(base)
    texts = [T.build_prompt(e.question, e.context) + T.build_completion(e.answer) for e in splits.train]
    ids = [x for x in tok(texts)["input_ids"] if len(x) <= args.max_seq_length]
    ds = Dataset.from_list([{"input_ids": x} for x in ids])
    cfg = SFTConfig(output_dir=str(work / "reference"), learning_rate=args.reference_lr, lr_scheduler_type="constant",
                    max_steps=args.reference_steps or 100_000, per_device_train_batch_size=args.batch_size, max_length=args.max_seq_length,
                    packing=False, completion_only_loss=False, use_cpu=True, bf16=False, fp16=False,
                    gradient_checkpointing=False, save_strategy="steps", save_steps=args.save_steps,
                    report_to="none", logging_steps=10, seed=args.seed, data_seed=args.seed, disable_tqdm=True,
                    dataloader_num_workers=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    stop = StopControl(0 if args.reference_steps else args.minutes)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora,
                         callbacks=[stop])
    start = time.perf_counter()
    trainer.train()
    return {"steps": trainer.state.global_step, "train_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--minutes", type=float, default=10.0, help="Training wall-clock budget of each recipe.")
    parser.add_argument("--points", type=int, default=3, help="Checkpoints scored per recipe (EX vs minutes).")
    parser.add_argument("--save-steps", type=int, default=25)
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--reference-lr", type=float, default=2e-4, help="The tutorial's learning rate.")
    parser.add_argument("--reference-steps", type=int, default=0,
                        help="Train the reference recipe for exactly this many steps (e.g. the sqltune run's) "
                             "instead of --minutes: the fair budget when other work shares the machine.")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", choices=["zero-shot", "reference", "sqltune"], action="append")
    parser.add_argument("--sqltune-model", help="A finished `sqltune finetune --config configs/<model>-cpu.yaml` "
                        "output (with its checkpoints) to score instead of training the sqltune recipe again.")
    parser.add_argument("--workdir", default="/tmp/sqltune-real-quality")
    parser.add_argument("--label", default="sqltune", help="Name of the sqltune curve in the results (one per "
                        "candidate recipe, e.g. demo-bf16-200)")
    parser.add_argument("--keep-literal-case", action="store_true", help="Score against the dataset's own "
                        "(lowercased) literals, as before data/literals.py")
    parser.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                        help="Override a field of the recipe's config for a candidate, e.g. --set max_steps=600")
    args = parser.parse_args(argv)
    if not DATA.is_file():
        print(f"no data at {DATA}", file=sys.stderr)
        return 1
    only = set(args.only or ["zero-shot", "reference", "sqltune"])
    from sqltune import config
    from sqltune.evaluate.cli import load_examples
    from sqltune.models import base_models
    from sqltune.prompts import DEFAULT_TEMPLATE as T
    from sqltune.prompts import extract_sql

    work = Path(args.workdir) / args.model
    work.mkdir(parents=True, exist_ok=True)
    common = ["--dataset", str(DATA), "--split", "eval", "--limit", str(args.eval_limit),
              "--eval-fraction", str(args.eval_fraction), "--seed", str(args.seed),
              *(["--keep-literal-case"] if args.keep_literal_case else [])]
    cfg, sources = config.load(common, {})
    examples, _ = load_examples(cfg, sources, {})
    base, base_info = base_models.resolve_source(args.model)
    plain = [T.build_prompt(e.question, e.context) for e in examples]
    out_path = RESULTS / f"real_model_quality_{args.model}.json"
    summary: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() else {}
    summary.update({"model": args.model, "base_sha256": base_info.get("sha256"), "minutes": args.minutes,
                    "data": str(DATA.relative_to(ROOT.parent)), "held_out_examples": len(examples),
                    "eval_fraction": args.eval_fraction, "threads": os.cpu_count()})
    curves = summary.setdefault("curves", {})

    def save() -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(summary, indent=2) + "\n")

    if "zero-shot" in only:
        model, tok = load(base)
        texts = generate(model, tok, plain, args.max_new_tokens)
        summary["zero_shot"] = score("zero-shot", predictions(examples, texts, extract_sql), common, work)
        print("zero-shot", summary["zero_shot"], flush=True)
        save()

    if "reference" in only:
        info = train_reference(args, base, work)
        served = [p.removesuffix("Answer:") for p in plain]  # the tutorial's prompt: no `Answer:`
        points = []
        for step, ckpt in spread(checkpoints_of(work / "reference"), args.points):
            model, tok = load(base, ckpt)
            texts = generate(model, tok, served, args.max_new_tokens)
            point = {"step": step, "minutes": round(info["train_s"] / 60 * step / max(info["steps"], 1), 2),
                     "as_served": score(f"reference-{step}", predictions(examples, texts, str.strip), common, work),
                     "lenient": score(f"reference-{step}-lenient", predictions(
                         examples, texts, lambda t: extract_sql(t.strip().removeprefix("Answer:"))), common, work)}
            points.append(point)
            print("reference", point, flush=True)
        curves["reference"] = {**info, "points": points}
        save()

    if "sqltune" in only:
        recipe = ROOT / "configs" / f"{args.model}-cpu.yaml"
        t0, cpu0 = time.perf_counter(), _children_cpu_s()
        overrides = [x for kv in args.set for x in _flag(*kv.split("=", 1))]
        if args.sqltune_model:
            out = Path(args.sqltune_model)
        else:
            out = work / f"{args.label}-model"
            # the config's own steps and schedule; the budget caps its wall clock like the reference's
            sqltune("finetune", "--config", str(recipe), "--dataset", str(DATA), "--eval-fraction",
                    str(args.eval_fraction), "--max-train-minutes", str(args.minutes), "--save-steps",
                    str(args.save_steps), "--save-total-limit", "1000", "--eval-generate-limit", "0",
                    "--seed", str(args.seed), *overrides, "--output", str(out))
        wall, cpu_minutes = time.perf_counter() - t0, (_children_cpu_s() - cpu0) / 60
        meta = json.loads((out / "sqltune.json").read_text())
        steps = meta["metrics"]["steps"]
        points = []
        for step, ckpt in spread(checkpoints_of(out / "checkpoints"), args.points - 1):
            if step == steps:
                continue  # the published model below is this step, merged
            model, tok = load(base, ckpt)
            texts = generate(model, tok, plain, args.max_new_tokens)
            point = {"step": step, "minutes": round(meta["metrics"]["train_runtime_s"] / 60 * step / max(steps, 1), 2),
                     "ex": score(f"{args.label}-{step}", predictions(examples, texts, extract_sql), common, work)}
            points.append(point)
            print("sqltune", point, flush=True)
        sqltune("eval", "--model", str(out), *common, "--report-dir", str(work / f"{args.label}-final-report"),
                "--eval-max-new-tokens", str(args.max_new_tokens))
        points.append({"step": steps, "minutes": round(meta["metrics"]["train_runtime_s"] / 60, 2),
                       "ex": report_figures(work / f"{args.label}-final-report"), "published": True})
        print(args.label, points[-1], flush=True)
        curves[args.label] = {"steps": steps, "finetune_wall_s": round(wall, 1), "points": points,
                              # CPU-minutes of the whole finetune process (a busy machine changes wall time)
                              "finetune_cpu_minutes": None if args.sqltune_model else round(cpu_minutes, 1),
                              "model": str(out), "overrides": args.set, "keep_literal_case": args.keep_literal_case,
                              "train_dtype": meta.get("train_dtype", meta.get("dtype")),
                              "cut_short": meta["metrics"].get("cut_short"),
                              "heldout_check": {k: v for k, v in meta["metrics"].get("heldout", {}).items()
                                                if k != "samples"}}
        save()
    plot(summary, RESULTS / f"real_model_quality_{args.model}.png")
    print(json.dumps(summary, indent=2))
    return 0


def _flag(name: str, value: str) -> list[str]:
    flag = name.replace("_", "-")
    if value.lower() in ("true", "false"):  # boolean fields are --x / --no-x
        return [f"--{flag}" if value.lower() == "true" else f"--no-{flag}"]
    return [f"--{flag}", value]


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    zero = summary.get("zero_shot", {}).get("ex")
    curves = summary.get("curves", {})
    for label, curve in curves.items():
        if label == "reference":
            continue
        pts = curve["points"]
        ax.plot([0] + [p["minutes"] for p in pts], [zero or 0] + [p["ex"]["ex"] for p in pts], "o-", label=label)
    if "reference" in curves:
        pts = curves["reference"]["points"]
        for key, style in (("as_served", "s--"), ("lenient", "s:")):
            ax.plot([0] + [p["minutes"] for p in pts], [zero or 0] + [p[key]["ex"] for p in pts], style,
                    label=f"reference ({key.replace('_', ' ')})")
    ax.set_xlabel("minutes of training (2 CPU cores)")
    ax.set_ylabel("execution accuracy (held-out)")
    ax.set_title(f"{summary['model']}: EX on {summary['held_out_examples']} held-out questions")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
