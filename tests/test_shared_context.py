"""Questions that share a context, packed behind one copy of it: every question in exactly one row, and the loss
and gradient of a packed row equal to those of the separate rows, in the model and through a real training step.

    pytest tests/test_shared_context.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sqltune.finetune.shared_context import MIN_SHARED_TOKENS, SharedContextCollator, attention_mask, pack_rows
from tests.conftest import log_events, run_sqltune

CONTEXT = list(range(100, 100 + 2 * MIN_SHARED_TOKENS))


def _pairs() -> list[tuple[list[int], list[int]]]:
    return [
        (CONTEXT + [7, 8, 9], [40, 41, 2]),
        ([5] * (2 * MIN_SHARED_TOKENS), [42, 2]),  # another context
        (CONTEXT + [7, 3], [43, 44, 45, 2]),
        (CONTEXT + [6], [46, 2]),
        (CONTEXT[:MIN_SHARED_TOKENS - 2] + [1, 1, 1], [47, 2]),  # too short a common start to share
    ]


def test_rows_with_a_common_context_share_one_copy_and_every_question_is_kept_once() -> None:
    pairs = _pairs()
    rows = pack_rows(pairs, per_row=4, max_len=512)
    assert len(rows) == 3
    shared = next(r for r in rows if len(r["segments"]) > 2)
    assert shared["segments"][0] == len(CONTEXT) and shared["input_ids"][:len(CONTEXT)] == CONTEXT
    assert len(shared["segments"]) == 4 and sum(shared["segments"]) == len(shared["input_ids"])
    # each question's part, put back behind the context, is the pair it came from
    parts, at = [], len(CONTEXT)
    for length in shared["segments"][1:]:
        parts.append(CONTEXT + shared["input_ids"][at:at + length])
        at += length
    whole = sorted(p + c for p, c in pairs)
    rebuilt = sorted(parts + [r["input_ids"] for r in rows if r is not shared])
    assert rebuilt == whole
    assert sum(shared["completion_mask"]) == 3 + 4 + 2
    # a part keeps its prompt's last token: the answer is predicted from inside the part
    assert pack_rows([(CONTEXT, [40, 2]), (CONTEXT, [41, 2])], 4, 512)[0]["segments"] == [len(CONTEXT) - 1, 3, 3]


def test_packing_respects_the_row_count_and_the_length_limit() -> None:
    pairs = [(CONTEXT + [i], [40 + i, 2]) for i in range(7)]
    assert [len(r["segments"]) - 1 for r in pack_rows(pairs, 3, 512)] == [3, 3, 1]
    fit = len(CONTEXT) + 2 * 3  # the context and two parts
    assert all(len(r["input_ids"]) <= fit for r in pack_rows(pairs, 8, fit))
    assert [len(r["segments"]) - 1 for r in pack_rows(pairs, 1, 512)] == [1] * 7


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_has_the_loss_and_gradient_of_its_separate_rows(attention: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attention))
    pairs = [p for p in _pairs() if p[0][:len(CONTEXT)] == CONTEXT]
    collate = SharedContextCollator(pad_token_id=0)

    def loss_and_grad(rows: list[dict]) -> tuple[float, torch.Tensor]:
        for r in rows:
            r["labels"] = [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"], strict=True)]
        batch = collate(rows)
        mask = attention_mask(batch["segment_ids"], None if attention == "sdpa" else torch.float32)
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum")
        loss.backward()
        return loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    separate = [{"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)} for p, c in pairs]
    packed = pack_rows(pairs, 4, 512)
    assert len(packed) == 1 and len(packed[0]["input_ids"]) < sum(len(r["input_ids"]) for r in separate)
    separate_loss, separate_grad = loss_and_grad(separate)
    packed_loss, packed_grad = loss_and_grad(packed)
    assert packed_loss == pytest.approx(separate_loss, rel=1e-5)
    assert torch.allclose(packed_grad, separate_grad, atol=1e-6)


@pytest.mark.slow
def test_a_training_step_on_packed_rows_is_the_step_on_the_separate_rows(tmp_path: Path) -> None:
    """One step over the same four questions on one database: a batch of four rows, then one packed row."""
    context = ("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER, "
               "is_male TEXT); CREATE TABLE concert (concert_id INTEGER PRIMARY KEY, concert_name TEXT, "
               "stadium_id INTEGER, year TEXT)")
    rows = [{"question": q, "context": context, "answer": a} for q, a in [
        ("How many singers are there?", "SELECT count(*) FROM singer"),
        ("List the names of singers from France.", "SELECT name FROM singer WHERE country = 'France'"),
        ("What is the average age of singers?", "SELECT avg(age) FROM singer"),
        ("How many concerts were there in 2014?", "SELECT count(*) FROM concert WHERE year = '2014'"),
    ]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def step(out: str, batch: int, per_row: int) -> tuple[dict, dict]:
        done = run_sqltune("finetune", "--model", "tiny", "--method", "full", "--dataset", str(data),
                           "--eval-fraction", "0", "--max-steps", "1", "--train-batch-size", str(batch),
                           "--tiny-layers", "1", "--max-seq-length", "256", "--logging-steps", "1",
                           "--eval-generate-limit", "0", "--dtype", "fp32", "--prompt-style", "schema-first",
                           "--shared-context-rows", str(per_row), "--output", str(tmp_path / out))
        ready = log_events(done.stderr, "data ready")[0]
        first = next(e for e in log_events(done.stderr, "train step") if "loss" in e)
        return ready, first

    separate_data, separate = step("separate", 4, 1)
    packed_data, packed = step("packed", 1, 4)
    assert separate_data["train"] == packed_data["train"] == 4
    assert packed_data["packed_rows"] == 1 and "packed_rows" not in separate_data
    assert packed["loss"] == pytest.approx(separate["loss"], rel=1e-4)
    assert packed["grad_norm"] == pytest.approx(separate["grad_norm"], rel=1e-4)
