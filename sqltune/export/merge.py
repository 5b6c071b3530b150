"""Export: merge the adapter into a full-precision base, check parity, write a complete model folder.

The folder is written into a staging directory beside the output, then moved in file by file
with the old manifest removed first and the new one written last: at every moment the output
is either a finished model (manifest present and matching) or visibly unfinished.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqltune import __version__, logs
from sqltune.artifacts import manifests
from sqltune.artifacts.storage import ensure_space
from sqltune.config import Config
from sqltune.errors import DISK_FULL_FIX, ArtifactError, ModelError, disk_full
from sqltune.prompts import TEMPLATE_KEY, PromptTemplate

log = logs.get("export")

# (question, context) pairs whose prompts, built with the model's own template, the merge check compares
PARITY_QUESTIONS = (
    ("How many heads of the departments are older than 56?", "CREATE TABLE head (age INTEGER)"),
    ("What is the name of the oldest singer?", "CREATE TABLE singer (name VARCHAR, age INTEGER)"),
    ("List all cities.", "CREATE TABLE city (name VARCHAR, population INTEGER)"),
)


def parity_prompts(template: PromptTemplate) -> list[str]:
    return [template.build_prompt(q, c) for q, c in PARITY_QUESTIONS]


def _versions() -> dict[str, str]:
    out = {"sqltune": __version__}
    for pkg in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _logits(model: Any, tokenizer: Any, template: PromptTemplate) -> Any:
    import torch

    from sqltune.prompts import encode_prompt

    device = next(model.parameters()).device
    with torch.inference_mode():
        outs = []
        for text in parity_prompts(template):
            ids = torch.tensor([encode_prompt(tokenizer, text)], device=device)
            outs.append(model(input_ids=ids).logits.float().cpu())
        return outs


def check_parity(reference: list[Any], candidate: list[Any], tolerance: float) -> float:
    """Max abs logit difference relative to the logit scale; raise when above tolerance."""
    worst = 0.0
    for a, b in zip(reference, candidate, strict=True):
        scale = float(a.abs().max()) or 1.0
        worst = max(worst, float((a - b).abs().max()) / scale)
    if worst > tolerance:
        raise ModelError(f"merged model disagrees with base+adapter: relative logit difference {worst:.2e} "
                         f"> tolerance {tolerance:.0e}",
                         "the merge or save is broken; the adapter is kept in adapter/ for a manual merge")
    return worst


def publish_precision(train: Any) -> Any:
    """The dtype a trained model is merged, checked and published in: fp32 on a CPU (what CPU serving loads;
    merging into a bf16 base there moves the logits by several % of their scale: 5.6e-02 measured on
    SmolLM2), the training dtype on a GPU."""
    from sqltune.generation import Precision

    if train.device == "cpu" and train.name != "fp32":
        return Precision("fp32", "cpu", f"trained in {train.name} on CPU: merged and published in fp32")
    return train


def _merge(trainer: Any, method: str, precision: Any, base_name: str, run_dir: Path, template: PromptTemplate,
           trust_remote_code: bool) -> tuple[Any, list[Any], float]:
    """Save the adapter, reload the base un-quantised in the published dtype (fp32 on a CPU, 16-bit on a GPU),
    merge; returns (merged, reference logits of that base + the adapter, tolerance)."""
    import torch
    from peft import PeftModel

    from sqltune.generation import Precision
    from sqltune.models.base_models import load_base

    tokenizer = trainer.processing_class
    publish = publish_precision(precision)
    if method == "full":
        # without accelerate's mixed-precision wrapper (its forward runs under bf16 autocast), in the published dtype
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).to(publish.torch_dtype)
        return model, _logits(model, tokenizer, template), 1e-4
    adapter_dir = run_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    # never merge into 4-bit weights: the base is reloaded un-quantised in the compute dtype
    merge_precision = Precision(publish.name, publish.device, "merge")
    del trainer.model
    trainer.model = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    base = load_base(base_name, merge_precision, trust_remote_code=trust_remote_code)
    base.to(precision.device)
    peft_model = PeftModel.from_pretrained(base, adapter_dir)
    reference = _logits(peft_model, tokenizer, template)
    merged = peft_model.merge_and_unload()
    tolerance = 1e-4 if publish.name == "fp32" else 2e-2
    return merged, reference, tolerance


def check_finite(model: Any, metrics: dict[str, Any]) -> None:
    """Refuse to publish a model whose loss or weights are NaN or infinite: it would serve garbage."""
    import math

    import torch

    loss = metrics.get("train_loss")
    if loss is not None and not math.isfinite(float(loss)):
        raise ModelError(f"training loss is {loss}: the run diverged, and the model is not published",
                         "lower --learning-rate (and check the data); the checkpoints are kept for inspection")
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise ModelError(f"weight {name} holds NaN or infinite values: the model is not published",
                             "lower --learning-rate and rerun; the checkpoints are kept for inspection")


def _model_bytes(model: Any) -> int:
    # the weights as saved (shared tensors once), plus room for the tokenizer and the small files
    seen, total = set(), 0
    for param in model.state_dict().values():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel() * param.element_size()
    return int(total * 1.02) + 16 * 2**20


def export(trainer: Any, cfg: Config, *, method: str, precision: Any, base_name: str, run_dir: Path,
           template: PromptTemplate, data_report: dict[str, Any], metrics: dict[str, Any],
           check: Callable[[Path, Any], dict[str, Any]] | None = None, base: dict[str, Any] | None = None,
           max_new_tokens: int = 128, tracking: dict[str, Any] | None = None) -> Path:
    """Merge, check parity, stage and publish into `run_dir`. `check(stage, precision)`, when given, scores the
    staged model before it is moved in (the job passes its held-out check: the job sits above the export)."""
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    stage = run_dir / f".export-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    tokenizer = trainer.processing_class
    merged, reference, tolerance = _merge(trainer, method, precision, base_name, run_dir, template, cfg.trust_remote_code)
    publish = publish_precision(precision)
    check_finite(merged, metrics)
    merged.config.use_cache = True
    gen = merged.generation_config
    gen.eos_token_id, gen.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    # the longest answer trained on (EOS included): serving and eval default to it, not to a guess
    gen.do_sample, gen.max_new_tokens = False, max_new_tokens
    for attr in ("temperature", "top_p", "top_k"):
        if hasattr(gen, attr):
            setattr(gen, attr, None)
    try:
        ensure_space(run_dir, _model_bytes(merged), "the merged model")
        merged.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    except Exception as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, ArtifactError) or not disk_full(e):
            raise
        raise ArtifactError(f"the disk of {run_dir} filled up while the model was written ({e})", DISK_FULL_FIX) from e

    reloaded = AutoModelForCausalLM.from_pretrained(stage, dtype=publish.torch_dtype).to(publish.device)
    worst = check_parity(reference, _logits(reloaded, tokenizer, template), tolerance)
    logs.event(log, "merge parity ok", max_relative_logit_diff=f"{worst:.2e}", tolerance=tolerance)
    del reloaded

    history = [h for h in trainer.state.log_history if "loss" in h]
    _plot_loss(history, stage / "loss.png")
    meta = {
        "name": cfg.new_model,
        "base_model": cfg.model_name,
        "base": base or {"source": cfg.model_name},
        "method": method,
        "dtype": publish.name,
        "train_dtype": precision.name,
        TEMPLATE_KEY: template.to_dict(),
        "eos_token": tokenizer.eos_token,
        "max_new_tokens": max_new_tokens,
        "config": cfg.to_dict(),
        "data": data_report,
        "metrics": metrics,
        "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in history],
        "tracking": tracking or {"report_to": "none"},  # the run `sqltune eval --run-id` can log into
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (stage / manifests.SQLTUNE_META).write_text(json.dumps(meta, indent=2, default=str))

    if check is not None:
        metrics["heldout"] = check(stage, publish)
        (stage / manifests.SQLTUNE_META).write_text(json.dumps(meta, indent=2, default=str))

    _move_in(stage, run_dir)
    manifests.write_manifest(run_dir, exclude=(manifests.CHECKPOINTS, "adapter"), name=cfg.new_model)
    logs.event(log, "model exported", path=str(run_dir), export_s=round(time.time() - t0, 1))
    return run_dir


def _move_in(stage: Path, run_dir: Path) -> None:
    """Replace the previous model's files with the staged ones; the manifest goes first, so a crash
    here leaves a folder that readers refuse rather than a mix they accept."""
    (run_dir / manifests.MANIFEST).unlink(missing_ok=True)
    keep = {manifests.CHECKPOINTS, "adapter", stage.name}
    for old in run_dir.iterdir():
        if old.name not in keep and not old.name.startswith("."):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    for item in stage.iterdir():
        os.replace(item, run_dir / item.name)
    stage.rmdir()


def _plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title("sqltune finetune")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
