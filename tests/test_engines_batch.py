"""The offline path (sqltune.engines.batch) that eval, ask and the job's held-out check drive: its greedy
output is a plain `model.generate` greedy decode, its log-probabilities are the model's own, and
per-request sampling parameters (several candidates for one question) are honoured.

    pytest tests/test_engines_batch.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sqltune.engines import batch
from sqltune.engines.base import SamplingParams

QUESTIONS = [
    ("How many employees are older than 30?", "CREATE TABLE employees (name VARCHAR, age INTEGER)"),
    ("List all names", "CREATE TABLE employees (name VARCHAR, age INTEGER)"),
    ("What is the total revenue of region west?", "CREATE TABLE sales (region VARCHAR, revenue INTEGER)"),
    ("Which city has the largest population?", "CREATE TABLE city (name VARCHAR, population INTEGER, country VARCHAR)"),
    ("Count the orders shipped after 2020", "CREATE TABLE orders (id INTEGER, shipped INTEGER)"),
]
MAX_NEW = 32


def _plain_greedy(model_dir: Path, prompts_: list[str]) -> list[list[int]]:
    """One prompt at a time through transformers' own `generate`, greedy, cut before EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sqltune.prompts import encode_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    for p in prompts_:
        ids = torch.tensor([encode_prompt(tok, p)])
        with torch.inference_mode():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id or 0)
        row = new[0, ids.shape[1]:].tolist()
        out.append(row[: next((i for i, t in enumerate(row) if t in eos), len(row))])
    return out


@pytest.mark.slow
def test_engine_greedy_is_plain_model_generate(tiny_model_dir: Path) -> None:
    """`sqltune eval --model M --engine transformers` generates through this path: batched (rows of
    different lengths, finished rows leaving the batch), it decodes what transformers' generate does."""
    import torch

    from sqltune.evaluate import sources
    from sqltune.prompts import encode_prompt

    preds, info = sources.from_model(str(tiny_model_dir), QUESTIONS, batch_size=4, max_new_tokens=MAX_NEW,
                                     progress=lambda n: None, engine="transformers")
    assert info["engine"] == "transformers" and info["batch_size"] == 4
    with batch.open_model(tiny_model_dir, engine="transformers", batch_size=4) as llm:
        prompts_ = [llm.template.build_prompt(q, c) for q, c in QUESTIONS]
        done = llm.generate_text(prompts_, SamplingParams(max_tokens=MAX_NEW))
        tok, model = llm.engine.loaded.tokenizer, llm.engine.loaded.model
        [too_long] = llm.generate([batch.Request([1] * llm.max_model_len, SamplingParams(max_tokens=4))])
    expected = _plain_greedy(tiny_model_dir, prompts_)
    plain = [tok.decode(ids, skip_special_tokens=True) for ids in expected]
    assert [p.raw for p in preds] == [c.text for c in done] == plain
    assert all(c.finish_reason in ("stop", "length") and not c.error for c in done)
    assert too_long.finish_reason == "error" and "context" in too_long.error
    # the cumulative log-probability is the model's own, token by token, EOS included when it stopped there
    for prompt, ids, c in zip(prompts_, expected, done, strict=True):
        full = encode_prompt(tok, prompt)
        gen = ids + ([tok.eos_token_id] if c.finish_reason == "stop" else [])
        with torch.inference_mode():
            logits = model(torch.tensor([full + gen])).logits[0, len(full) - 1:-1]
        want = float(torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(gen)[:, None]).sum())
        assert c.logprob < 0 and math.isclose(c.logprob, want, rel_tol=1e-4, abs_tol=1e-4), (c.logprob, want)


@pytest.mark.slow
def test_candidates_are_requests_with_their_own_params(tiny_model_dir: Path) -> None:
    """Greedy + seeded samples of one question in one call, back in input order: a seed repeats its
    sample, different seeds give different samples, and each carries its own log-probability."""
    with batch.open_model(tiny_model_dir, engine="transformers", batch_size=8) as llm:
        ids = llm.encode(llm.template.build_prompt(*QUESTIONS[0]))
        params = [SamplingParams(max_tokens=MAX_NEW)] + [
            SamplingParams(max_tokens=MAX_NEW, temperature=1.5, seed=s) for s in (1, 2, 3, 1)]
        done = llm.generate([batch.Request(ids, p) for p in params])
        [alone] = llm.generate([batch.Request(ids, params[0])])
    greedy, *samples = done
    assert greedy.text == alone.text and greedy.logprob == pytest.approx(alone.logprob, abs=1e-4)
    assert samples[0].text == samples[3].text and samples[0].logprob == pytest.approx(samples[3].logprob, abs=1e-4)
    assert len({s.text for s in samples[:3]}) > 1
    assert all(math.isfinite(c.logprob) and c.logprob < 0 for c in done)


def test_eval_logs_generation_progress_without_a_terminal() -> None:
    """With no progress bar (stderr not a TTY, or SQLTUNE_NO_PROGRESS=1) eval logs done/total, rate and
    ETA as JSON, counted from the first answer (not from loading the model), and a last line at the end."""
    import logging
    import time

    from sqltune.evaluate.sources import GenerateProgress

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("sqltune.eval")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        with GenerateProgress(10, every_s=0.05) as progress:
            for _ in range(10):
                time.sleep(0.02)
                progress.update(1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    lines = [r.fields for r in records if r.getMessage() == "generating"]  # type: ignore[attr-defined]
    assert 2 <= len(lines) < 10 and lines[-1]["done"] == lines[-1]["total"] == 10 and lines[-1]["eta_s"] == 0
    assert all(0 < line["per_s"] < 100 for line in lines[1:]) and lines[1]["eta_s"] > 0


def test_engine_flags_read_the_factory_s_choices() -> None:
    """serve, eval and ask take --engine with the factory's names; anything else is refused at once (exit 2)."""
    from conftest import run_sqltune

    from sqltune.engines import factory
    from sqltune.errors import ConfigError

    for command in ("serve", "eval", "ask"):
        shown = run_sqltune(command, "--help", timeout=60).stdout
        assert "--engine" in shown and ", ".join(factory.ENGINES) in " ".join(shown.split()), command
    bad = run_sqltune("eval", "--model", "m", "--engine", "tpu", timeout=60, check=False)
    assert bad.returncode == 2 and "invalid choice: 'tpu'" in bad.stderr
    with pytest.raises(ConfigError, match="not an engine"):
        factory.choose_engine("tpu")  # a YAML or environment value, which argparse never sees
