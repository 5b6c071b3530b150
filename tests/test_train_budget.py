"""A batch longer than --batch-token-budget runs as several passes over groups of its rows with the batch's own
gradient: the same weights as whole batches, with less memory per pass.

    pytest tests/test_train_budget.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sqltune.finetune.trainer import split_rows
from tests.conftest import log_events, run_sqltune

pytestmark = pytest.mark.slow


def test_split_rows_keeps_every_row_once_within_the_budget() -> None:
    batch = {"input_ids": torch.arange(40).reshape(8, 5), "labels": torch.ones(8, 5), "flag": True}
    groups = split_rows(batch, 12)
    assert [g["input_ids"].shape[0] for g in groups] == [2, 2, 2, 2]
    assert torch.equal(torch.cat([g["input_ids"] for g in groups]), batch["input_ids"])
    assert all(g["flag"] is True for g in groups)
    assert split_rows(batch, 40) == [batch] and split_rows(batch, 0) == [batch]
    assert [g["input_ids"].shape[0] for g in split_rows(batch, 3)] == [1] * 8  # a row longer than the budget: alone


def _train(out: Path, budget: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    done = run_sqltune("finetune", "--model", "tiny", "--method", "full", "--dataset", "synthetic:96",
                       "--max-steps", "3", "--train-batch-size", "8", "--tiny-layers", "1", "--max-seq-length", "128",
                       "--save-steps", "1000", "--logging-steps", "1", "--eval-generate-limit", "0", "--dtype", "fp32",
                       "--batch-token-budget", str(budget), "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    losses = [e["loss"] for e in log_events(done.stderr, "train step") if "loss" in e]
    return load_file(next(out.glob("*.safetensors"))), losses


def test_a_token_budget_gives_the_same_weights_as_whole_batches(tmp_path: Path) -> None:
    whole, whole_losses = _train(tmp_path / "whole", 0)
    split, split_losses = _train(tmp_path / "split", 64)  # rows of ~30 tokens: groups of 1-2 rows
    assert whole_losses and split_losses == pytest.approx(whole_losses, rel=1e-4)
    assert whole.keys() == split.keys()
    for name in whole:
        assert torch.allclose(whole[name], split[name], atol=1e-5), name


def test_the_eta_is_the_time_cap_when_it_comes_before_the_steps() -> None:
    from types import SimpleNamespace

    from sqltune.finetune.callbacks import JsonLogs

    state = SimpleNamespace(global_step=0, max_steps=100_000)
    capped, uncapped = JsonLogs(max_minutes=10), JsonLogs()
    for cb in (capped, uncapped):
        cb.on_train_begin(SimpleNamespace(per_device_train_batch_size=8, world_size=1), state, None)
        cb._t0 = 1000.0
    state.global_step = 2  # two steps in the first minute: 30 s a step
    now = 1060.0
    assert uncapped.eta_s(state, now) == 30 * 99_998
    assert capped.eta_s(state, now) == 9 * 60  # the cap ends training in nine minutes
    state.global_step = 0
    assert capped.eta_s(state, now) is None  # no step done: no pace yet


def test_the_cpu_loss_scores_only_the_labelled_positions_with_the_same_loss_and_gradient(monkeypatch) -> None:
    import trl.trainer.utils as trl_utils
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from sqltune.finetune.trainer import score_labelled_only

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 300, (3, 40))
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :28] = -100  # a long prompt, then the answer
    labels[mask == 0] = -100
    scored = []
    kernel = trl_utils._ChunkedLogProbFunction

    class Recording:
        @staticmethod
        def apply(hidden, *rest):
            scored.append(hidden.shape[0])
            return kernel.apply(hidden, *rest)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Recording)

    def loss_and_grad(labelled_only: bool) -> tuple[float, torch.Tensor]:
        assert score_labelled_only(labelled_only)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        return out.loss.item(), model.model.layers[0].mlp.up_proj.weight.grad.clone()

    try:
        every_loss, every_grad = loss_and_grad(False)
        labelled_loss, labelled_grad = loss_and_grad(True)
    finally:
        score_labelled_only(False)
    assert scored == [3 * 39, int((labels[:, 1:] != -100).sum())]  # every position, then the 29 with a label
    assert labelled_loss == pytest.approx(every_loss, rel=1e-5)
    assert torch.allclose(labelled_grad, every_grad, atol=1e-6)
