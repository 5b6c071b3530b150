from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import HF_TOKEN_SENTINEL, ROOT, run_sqltune, sqltune_cmd

from sqltune import generation
from sqltune.artifacts import manifests
from sqltune.config import Config
from sqltune.finetune.trainer import build_trainer, to_dataset
from sqltune.models import base_models

QUICK = ["--model", "tiny", "--tiny-layers", "2", "--dataset", "synthetic:400", "--train-batch-size", "8",
         "--max-seq-length", "256", "--eval-generate-limit", "0", "--logging-steps", "1", "--learning-rate", "0.003"]


def _events(stderr: str) -> list[dict]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _steps(stderr: str) -> list[int]:
    return [e["step"] for e in _events(stderr) if e.get("message") == "train step"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_loss_is_on_the_completion_only_and_eos_is_learned(tmp_path: Path) -> None:
    from sqltune.prompts import DEFAULT_TEMPLATE, encode_prompt

    prompt = DEFAULT_TEMPLATE.build_prompt("How many heads are older than 56?", "CREATE TABLE head (age INTEGER)")
    completion = DEFAULT_TEMPLATE.build_completion("SELECT COUNT(*) FROM head WHERE age > 56")
    assert prompt.endswith("Answer:") and completion.startswith(" SELECT")
    model, tok = base_models.build_tiny([prompt + completion] * 20, layers=1, vocab_size=300)
    ds, too_long = to_dataset([(prompt, completion), (prompt * 40, completion)], tok, max_len=128)
    assert too_long == 1 and len(ds) == 1  # long rows are dropped and counted, never truncated
    cfg = Config(max_steps=1, max_seq_length=128)
    trainer = build_trainer(cfg, "full", generation.choose_precision("fp32"), model, tok, ds, None, tmp_path, [])
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    n_prompt = len(encode_prompt(tok, prompt))
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:-1]) == completion


@pytest.mark.slow
def test_tiny_model_learns_sql(tiny_model_dir: Path) -> None:
    meta = manifests.read_meta(tiny_model_dir)
    losses = [h["loss"] for h in meta["loss_history"]]
    assert losses[-1] < losses[0] * 0.5, losses
    # an untrained model writes ~0% parseable SQL; 120 steps on two layers gets well past a quarter
    assert meta["metrics"]["heldout"]["parseable"] >= 0.25, meta["metrics"]["heldout"]
    manifests.verify(tiny_model_dir)
    assert meta["prompt_template"]["prompt"].endswith("Answer:")
    assert HF_TOKEN_SENTINEL not in "".join(p.read_text(errors="ignore") for p in tiny_model_dir.rglob("*.json"))
    assert (tiny_model_dir / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_artifact_loads_in_plain_transformers(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer


    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    from sqltune.engines import batch

    with batch.open_model(str(tiny_model_dir), engine="transformers") as llm:
        [sql] = llm.generate_sql([("How many employees are older than 30?",
                                   "CREATE TABLE employees (name VARCHAR, age INTEGER)")])
    assert sql.upper().startswith("SELECT")


@pytest.mark.slow
def test_killed_job_resumes_with_optimizer_state(tmp_path: Path) -> None:
    """SIGKILL after a checkpoint, rerun: it continues at that step, and ends with the same weights as
    an uninterrupted run (only possible when optimizer, scheduler and data order are restored)."""
    common = [*QUICK, "--max-steps", "16", "--save-steps", "6", "--save-total-limit", "3", "--lr-scheduler-type", "linear"]
    run_sqltune("finetune", *common, "--output", str(tmp_path / "straight"))

    out = tmp_path / "killed"
    proc = subprocess.Popen(sqltune_cmd("finetune", *common, "--output", str(out)), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "checkpoints" / "checkpoint-6" / "manifest.json"
    deadline = time.time() + 300
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert manifest.exists()
    assert not (out / "manifest.json").exists()  # no finished model after a crash

    resumed = run_sqltune("finetune", *common, "--output", str(out))
    events = _events(resumed.stderr)
    assert any(e.get("message") == "resuming" for e in events)
    first = _steps(resumed.stderr)[0]
    assert first > 6, f"resumed run restarted at step {first}"
    straight, again = _weights(tmp_path / "straight"), _weights(out)
    for name, tensor in straight.items():
        torch.testing.assert_close(again[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_nonzero(tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = subprocess.Popen(sqltune_cmd("finetune", *QUICK, "--max-steps", "500", "--save-steps", "1000",
                                        "--output", str(out)),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if '"train step"' in line and '"step": 3' in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, "".join(lines[-5:])
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert ckpts and manifests.is_complete(ckpts[-1]), ckpts
    assert 3 <= int(ckpts[-1].name.split("-")[1]) < 500
    assert not (out / "manifest.json").exists()


@pytest.mark.slow
def test_lora_merge_matches_base_plus_adapter(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sqltune.export.merge import parity_prompts
    from sqltune.prompts import DEFAULT_TEMPLATE, encode_prompt

    out = tmp_path / "lora"
    run_sqltune("finetune", *QUICK, "--method", "lora", "--max-steps", "4", "--learning-rate", "0.01",
                "--target-modules", "q_proj,v_proj", "--output", str(out))
    meta = manifests.read_meta(out)
    assert meta["method"] == "lora" and meta["config"]["target_modules"] == ["q_proj", "v_proj"]
    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(out / ".tiny-base")
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / ".tiny-base"), out / "adapter")
    ids = {"input_ids": torch.tensor([encode_prompt(tok, parity_prompts(DEFAULT_TEMPLATE)[0])])}
    with torch.inference_mode():
        a, b, c = (m(**ids).logits for m in (with_adapter, merged, base))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(c, a, atol=1e-4), "the adapter changed nothing: the test would not catch a bad merge"


def test_parity_check_refuses_a_mismatch() -> None:
    from sqltune.errors import ModelError
    from sqltune.export.merge import check_parity

    ref = [torch.randn(1, 4, 10)]
    assert check_parity(ref, [ref[0] + 1e-7], 1e-4) < 1e-4
    with pytest.raises(ModelError, match="disagrees"):
        check_parity(ref, [ref[0] + 0.5], 1e-4)


@pytest.mark.slow
def test_qlora_on_cpu_with_bitsandbytes(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    run_sqltune("finetune", "--model", str(tiny_model_dir), "--method", "qlora", "--dataset", "synthetic:200",
                "--max-steps", "3", "--train-batch-size", "4", "--eval-generate-limit", "0", "--output", str(out))
    meta = manifests.read_meta(out)
    assert meta["method"] == "qlora" and (out / "adapter" / "adapter_model.safetensors").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg  # merged into a full-precision base, never into 4-bit weights
    manifests.verify(out)


@pytest.mark.slow
def test_demo_command_runs(tmp_path: Path) -> None:
    """The README's demo, with a shorter budget through the environment (env beats the YAML)."""
    env = {"SQLTUNE_MAX_STEPS": "30", "SQLTUNE_EVAL_GENERATE_LIMIT": "10", "SQLTUNE_OUTPUT": str(tmp_path / "demo"),
           "SQLTUNE_DATASET": "synthetic:600"}
    proc = run_sqltune("finetune", "--config", "configs/tiny-cpu.yaml", env=env)
    assert "questions never seen in training: execution accuracy" in proc.stdout and "predicted:" in proc.stdout
    assert "single-table" in proc.stdout and "exact match" in proc.stdout
    manifests.verify(tmp_path / "demo")
    assert "sqltune finetune --config configs/tiny-cpu.yaml" in (ROOT / "Makefile").read_text()


def test_resume_path_must_be_a_complete_checkpoint(tmp_path: Path) -> None:
    from sqltune.errors import ConfigError
    from sqltune.finetune.common import find_resume_checkpoint

    ckpts = tmp_path / "checkpoints"
    for step in (5, 10):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        (ckpts / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x" * step)
    manifests.write_manifest(ckpts / "checkpoint-5", exclude=())
    # checkpoint-10 has no manifest: the job died while saving it
    assert find_resume_checkpoint(ckpts, "auto") == ckpts / "checkpoint-5"
    assert find_resume_checkpoint(ckpts, "never") is None
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        find_resume_checkpoint(ckpts, str(ckpts / "checkpoint-10"))


def test_a_checkpoint_of_another_method_is_refused_and_kept(tmp_path: Path) -> None:
    """An output folder that holds a LoRA run's checkpoints, rerun as a full fine-tune (a changed recipe)."""
    out = tmp_path / "model"
    run_sqltune("finetune", *QUICK, "--method", "lora", "--max-steps", "2", "--save-steps", "1", "--output", str(out))
    before = sorted(p.name for p in (out / manifests.CHECKPOINTS).glob("checkpoint-*"))
    proc = run_sqltune("finetune", *QUICK, "--method", "full", "--max-steps", "4", "--output", str(out), check=False)
    assert proc.returncode != 0
    assert "holds a LoRA adapter, and this run's method is full" in proc.stderr
    assert "pass a new --output" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / manifests.CHECKPOINTS).glob("checkpoint-*")) == before
    manifests.verify(out)  # the published LoRA model is untouched


def test_bad_dataset_fails_before_training(tmp_path: Path) -> None:
    proc = run_sqltune("finetune", *QUICK, "--dataset", str(tmp_path / "missing.jsonl"), "--output",
                       str(tmp_path / "m"), check=False)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_every_command_has_help() -> None:
    from sqltune.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "finetune" in commands
    for name in commands:
        proc = subprocess.run(sqltune_cmd(name, "--help"), capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ}, timeout=60)
        assert proc.returncode == 0 and "usage:" in proc.stdout, name


def test_help_is_instant_without_torch() -> None:
    code = "import sys; from sqltune.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([*sqltune_cmd()[:1], "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_the_artifact_carries_its_longest_answer_as_max_new_tokens(tiny_model_dir: Path) -> None:
    meta = manifests.read_meta(tiny_model_dir)
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == meta["max_new_tokens"]
    assert 5 < meta["max_new_tokens"] < 128  # measured from the training answers, not a fixed 128
    assert meta["prompt_template"]["name"] == "question-context-answer"  # the default, plain


def test_a_model_with_non_finite_loss_or_weights_is_never_published() -> None:
    from sqltune.errors import ModelError
    from sqltune.export.merge import check_finite

    net = torch.nn.Linear(2, 2)
    check_finite(net, {"train_loss": 0.5})
    with pytest.raises(ModelError, match="loss is nan"):
        check_finite(net, {"train_loss": float("nan")})
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(ModelError, match="weight weight holds NaN or infinite"):
        check_finite(net, {"train_loss": 0.5})


@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_an_unwritable_output_is_a_one_line_error_at_once(tmp_path: Path, where: str) -> None:
    existing = tmp_path / "model.txt"
    existing.write_text("not a folder")
    output = {"file": existing, "under-file": existing / "sub", "proc": Path("/proc/sqltune-output")}[where]
    started = time.monotonic()
    proc = run_sqltune("finetune", "--model", "tiny", "--dataset", "synthetic:50", "--max-steps", "1",
                       "--output", str(output), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"--output {output}" in proc.stderr and "fix:" in proc.stderr
    assert time.monotonic() - started < 8  # before any model or data is loaded


def test_auto_dtype_trains_in_bf16_only_on_a_cpu_with_native_bf16(monkeypatch) -> None:
    from sqltune.generation import cpu_bf16_support

    amx = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile\n"
    avx512 = "flags\t\t: fpu avx512f avx512_bf16\n"
    plain = "flags\t\t: fpu sse avx2 avx512f\n"
    assert cpu_bf16_support(amx, "AVX512") == "amx_bf16"
    assert cpu_bf16_support(avx512, "AVX512") == "avx512_bf16"
    assert cpu_bf16_support(plain, "AVX512") is None
    assert cpu_bf16_support("", "AMX") == "AMX"  # torch's own capability where /proc/cpuinfo says nothing
    if torch.cuda.is_available():
        pytest.skip("CPU precision rules")
    monkeypatch.setattr(generation, "cpu_bf16_support", lambda: "amx_bf16")
    assert generation.choose_precision("auto", training=True).name == "bf16"
    assert generation.choose_precision("auto").name == "fp32"  # serving and eval: the published fp32 model
    monkeypatch.setattr(generation, "cpu_bf16_support", lambda: None)
    assert generation.choose_precision("auto", training=True).name == "fp32"


@pytest.mark.slow
def test_bf16_lora_on_cpu_publishes_fp32_that_matches_fp32_base_plus_adapter(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sqltune.export.merge import parity_prompts
    from sqltune.prompts import DEFAULT_TEMPLATE, encode_prompt

    out = tmp_path / "lora-bf16"
    proc = run_sqltune("finetune", *QUICK, "--method", "lora", "--max-steps", "4", "--learning-rate", "0.01",
                       "--dtype", "bf16", "--output", str(out))
    meta = manifests.read_meta(out)
    assert meta["train_dtype"] == "bf16" and meta["dtype"] == "fp32"
    assert any(e.get("message") == "merge parity ok" and e["tolerance"] == 1e-4 for e in _events(proc.stderr))
    assert all(t.dtype == torch.float32 for t in _weights(out).values())
    tok = AutoTokenizer.from_pretrained(out)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / ".tiny-base"), out / "adapter")
    ids = {"input_ids": torch.tensor([encode_prompt(tok, parity_prompts(DEFAULT_TEMPLATE)[0])])}
    with torch.inference_mode():
        a, b = (m(**ids).logits for m in (with_adapter, AutoModelForCausalLM.from_pretrained(out)))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bf16_full_fine_tune_on_cpu_publishes_fp32(tmp_path: Path) -> None:
    out = tmp_path / "full-bf16"
    run_sqltune("finetune", *QUICK, "--method", "full", "--max-steps", "3", "--dtype", "bf16", "--output", str(out))
    meta = manifests.read_meta(out)
    assert meta["train_dtype"] == "bf16" and meta["dtype"] == "fp32"
    assert all(t.dtype == torch.float32 for t in _weights(out).values())


def test_a_run_cut_short_by_max_train_minutes_says_so_and_how_to_finish(tmp_path: Path) -> None:
    out = tmp_path / "cut"
    proc = run_sqltune("finetune", *QUICK, "--max-steps", "500", "--max-train-minutes", "0.001", "--output", str(out))
    cut = manifests.read_meta(out)["metrics"]["cut_short"]
    assert cut["planned_steps"] == 500 and 1 <= cut["steps_run"] < 500
    assert f"after {cut['steps_run']} of 500 planned steps" in proc.stdout
    assert "--max-train-minutes 0" in proc.stdout and f"step {cut['steps_run']}" in proc.stdout
    finished = tmp_path / "whole"
    proc = run_sqltune("finetune", *QUICK, "--max-steps", "2", "--output", str(finished))
    assert "cut short" not in proc.stdout and "cut_short" not in manifests.read_meta(finished)["metrics"]


def test_the_heldout_check_scores_by_execution_and_by_kind_of_question() -> None:
    from sqltune.data.loading import Example
    from sqltune.finetune.heldout import summarise

    single = "CREATE TABLE table_name_1 (team VARCHAR, city VARCHAR)"
    multi = "CREATE TABLE player (name VARCHAR, team_id INTEGER); CREATE TABLE team (id INTEGER, name VARCHAR)"
    join = "SELECT T1.name FROM player AS T1 JOIN team AS T2 ON T1.team_id = T2.id WHERE T2.name = 'Celtics'"
    examples = [Example("Which team is from Boston?", single, "SELECT team FROM table_name_1 WHERE city = 'Boston'"),
                Example("Which team is from Paris?", single, "SELECT team FROM table_name_1 WHERE city = 'Paris'"),
                Example("Who plays for the Celtics?", multi, join)]
    predicted = ["SELECT team FROM table_name_1 WHERE 'Boston' = city",  # same result, not the same text
                 "SELECT team FROM table_name_1 WHERE city = 'paris'",  # wrong case: selects nothing
                 join]
    result = summarise(examples, predicted)
    assert result["ex"] == round(2 / 3, 4) and result["exact_match"] == round(2 / 3, 4)
    assert result["by_kind"]["single_table"] == {"examples": 2, "ex": 0.5, "ex_scored": 2, "exact_match": 0.5,
                                                 "parseable": 1.0}
    assert result["by_kind"]["multi_table"]["ex"] == 1.0
    assert [s["ex"] for s in result["samples"]] == [True, False, True]


def test_the_job_repeats_multi_table_rows_and_reports_how_many(tmp_path: Path) -> None:
    once, thrice = tmp_path / "once", tmp_path / "thrice"
    run_sqltune("finetune", *QUICK, "--max-steps", "1", "--output", str(once))
    run_sqltune("finetune", *QUICK, "--max-steps", "1", "--multi-table-repeat", "3", "--output", str(thrice))
    a, b = manifests.read_meta(once)["data"], manifests.read_meta(thrice)["data"]
    assert a["multi_table_repeated"] == 0
    assert b["multi_table_repeated"] > 0 and b["multi_table_repeated"] % 2 == 0
    assert b["train"] == a["train"] + b["multi_table_repeated"]
    assert manifests.read_meta(once)["metrics"]["peak_rss_train_mb"] > 100  # the training process's peak, recorded


def test_the_optimizer_state_is_freed_before_the_export(tmp_path: Path) -> None:
    """AdamW keeps twice the trained weights; the export loads more models, so the job lets it go first."""
    import gc
    import weakref

    from sqltune import config
    from sqltune.data import loading
    from sqltune.finetune import trainer as sft
    from sqltune.finetune.common import peak_rss_mb, release_training_state
    from sqltune.prompts import DEFAULT_TEMPLATE

    cfg, _ = config.resolve(None, {}, {"max_steps": "1", "train_batch_size": "4", "save_steps": "1000",
                                       "logging_steps": "1000", "method": "full"})
    pairs = sft.build_pairs(loading.load_splits("synthetic:40", eval_fraction=0.0).train, DEFAULT_TEMPLATE)
    tok = base_models.train_tokenizer((p + c for p, c in pairs), 400)
    model = base_models.build_tiny_model(tok, layers=1)
    train_ds, _ = sft.to_dataset(pairs, tok, 256)
    trainer = build_trainer(cfg, "full", generation.choose_precision("fp32", training=True), model, tok, train_ds,
                            None, tmp_path, [])
    trainer.train()
    state = weakref.ref(next(iter(trainer.optimizer.optimizer.state.values()))["exp_avg"])
    release_training_state(trainer)
    gc.collect()
    assert state() is None, "the optimizer's state outlived training"
    assert trainer.model is not None and peak_rss_mb() > 0


def test_a_full_disk_stops_the_job_clearly_and_the_rerun_publishes(tmp_path: Path) -> None:
    """A real small disk (tmpfs): no room for the checkpoint, then none for the merged model, then room."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        out = disk / "model"
        job = ("finetune", "--model", "tiny", "--dataset", "synthetic:50", "--method", "lora", "--max-steps", "2",
               "--output", str(out))
        proc = run_sqltune(*job, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "sqltune: error: checkpoint-2 needs about" in proc.stderr and "MB is free on that disk" in proc.stderr
        assert "rerun with the same --output" in proc.stderr
        assert not list((out / "checkpoints").glob("checkpoint-*"))  # refused before a byte of it was written

        subprocess.run(["mount", "-o", "remount,size=10m", str(disk)], check=True)
        proc = run_sqltune(*job, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "the merged model needs about" in proc.stderr and f"in {out}," in proc.stderr
        assert (out / "checkpoints" / "checkpoint-2" / manifests.MANIFEST).is_file()  # the training is kept
        assert not (out / manifests.MANIFEST).exists() and not list(out.glob(".export-*"))

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = run_sqltune(*job)
        assert "publishing without training" in proc.stderr
        manifests.verify(out)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_trim_heap_hands_freed_memory_back() -> None:
    """What a long batch freed stays resident under glibc until malloc_trim: 8,000 tensors of 64 KB (on the heap,
    below the mmap threshold) with one kept above them, so the heap cannot shrink from its top by itself."""
    script = """
import psutil, torch
from sqltune.finetune.callbacks import trim_heap
proc = psutil.Process()
blocks = [torch.ones(16 * 1024) for _ in range(8000)]
top = torch.ones(16 * 1024)
del blocks
before = proc.memory_info().rss
trim_heap()
print(before >> 20, proc.memory_info().rss >> 20)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = map(int, proc.stdout.split())
    assert before - after > 300, (before, after)  # of the 500 MB freed
