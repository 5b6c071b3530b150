"""Real pretrained models end to end on CPU: SmolLM2-135M-Instruct and Gemma-3-270M, shipped inside PyPI
packages as GGUF files. One tokenization for training and inference, LoRA and QLoRA steps with merge
parity, and the fine-tuned artifact served by the transformers engine.

    pytest tests/test_finetune_real.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import finetune_real

from sqltune.prompts import DEFAULT_TEMPLATE, encode_completion, encode_prompt

QUESTION, CONTEXT = "How many heads are older than 56?", "CREATE TABLE head (name VARCHAR, age INTEGER)"
ANSWER = "SELECT COUNT(*) FROM head WHERE age > 56"


def _tokenizer(name: str, embedded, tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir if name == "tiny" else embedded(name))


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m", "gemma3-270m"])
def test_the_prompt_ids_trained_on_are_the_ids_every_inference_path_feeds(name, embedded, tiny_model_dir):
    from sqltune import generation
    from sqltune.engines.transformers_engine import TransformersEngine
    from sqltune.engines.vllm_engine import VllmEngine
    from sqltune.finetune.trainer import to_dataset

    tok = _tokenizer(name, embedded, tiny_model_dir)
    prompt = DEFAULT_TEMPLATE.build_prompt(QUESTION, CONTEXT)
    completion = DEFAULT_TEMPLATE.build_completion(ANSWER)
    ids = encode_prompt(tok, prompt)
    row = to_dataset([(prompt, completion)], tok, max_len=4096)[0][0]
    n_prompt = row["completion_mask"].index(1)
    assert row["input_ids"][:n_prompt] == ids  # training
    assert row["input_ids"][n_prompt:] == encode_completion(tok, completion)
    assert row["input_ids"][-1] == tok.eos_token_id  # the model learns to stop
    if tok.bos_token_id is not None and tok("x")["input_ids"][0] == tok.bos_token_id:
        assert ids[0] == tok.bos_token_id  # Gemma: <bos> in training, so at inference too

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = generation.encode_batch(tok, [prompt, "Question: a\nContext: b\nAnswer:"])  # eval, held-out check
    row0 = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row0 == ids
    for engine_cls in (TransformersEngine, VllmEngine):  # both serving engines, without loading weights
        engine = engine_cls.__new__(engine_cls)
        engine.tokenizer = tok
        engine.loaded = type("L", (), {"tokenizer": tok})()
        assert engine.encode(prompt) == ids, engine_cls.__name__


def test_gemma_tokenizer_adds_bos_and_smollm2_carries_a_chat_template(embedded):
    from transformers import AutoTokenizer

    gemma = AutoTokenizer.from_pretrained(embedded("gemma3-270m"))
    assert encode_prompt(gemma, "Question:")[0] == gemma.bos_token_id == 2
    smol = AutoTokenizer.from_pretrained(embedded("smollm2-135m"))
    assert smol.chat_template and len(smol) == 49152


def test_the_chat_style_prompt_is_the_tokenizers_own_chat_template(embedded):
    from transformers import AutoTokenizer

    from sqltune.prompts import chat_template

    tok = AutoTokenizer.from_pretrained(embedded("smollm2-135m"))
    template = chat_template(tok)
    question, context = "Which {name} is oldest?", "CREATE TABLE head (name VARCHAR, age INTEGER)"
    user = f"Schema:\n{context}\n\nQuestion: {question}"
    rendered = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    assert template.build_prompt(question, context) == rendered
    assert template.build_completion(ANSWER) == ANSWER  # then EOS (<|im_end|>) from encode_completion


@pytest.mark.slow
def test_lora_on_smollm2_merges_with_parity_and_records_its_base(smollm2_artifact):
    from sqltune.artifacts import manifests
    from sqltune.models.gguf import EMBEDDED

    manifests.verify(smollm2_artifact)
    meta = manifests.read_meta(smollm2_artifact)
    assert meta["base"]["source"] == "smollm2-135m" and meta["base"]["sha256"] == EMBEDDED["smollm2-135m"].sha256
    assert meta["method"] == "lora" and meta["metrics"]["steps"] == 3
    assert meta["prompt_template"]["name"] == "chat"  # prompt_style auto picks the instruct model's chat template
    assert all(s["predicted"] is not None for s in meta["metrics"]["heldout"]["samples"])
    cfg = json.loads((smollm2_artifact / "config.json").read_text())
    assert cfg["vocab_size"] == 49152 and cfg["model_type"] == "llama"


@pytest.mark.slow
def test_lora_on_gemma3_runs_and_keeps_bos(tmp_path, embedded, model_cache, shared_data):
    embedded("gemma3-270m")
    meta = finetune_real(tmp_path / "gemma", "gemma3-270m", "--method", "lora", "--max-steps", "2",
                     "--target-modules", "q_proj,v_proj", cache=model_cache, data=shared_data)
    assert meta["base"]["source"] == "gemma3-270m" and meta["eos_token"] == "<eos>"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "gemma")
    assert encode_prompt(tok, "Question: x")[0] == tok.bos_token_id


@pytest.mark.slow
def test_qlora_on_smollm2_merges_into_the_full_precision_base(tmp_path, embedded, model_cache, shared_data):
    pytest.importorskip("bitsandbytes")
    embedded("smollm2-135m")
    out = tmp_path / "qlora"
    proc_meta = finetune_real(out, "smollm2-135m", "--method", "qlora", "--max-steps", "2",
                          cache=model_cache, data=shared_data)
    assert proc_meta["method"] == "qlora" and (out / "adapter" / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())  # merged into fp32, not into 4-bit blocks
    assert not any("lora" in k or "absmax" in k or "quant" in k for k in weights)


@pytest.mark.slow
def test_the_transformers_engine_serves_the_fine_tuned_smollm2(smollm2_artifact):
    import httpx

    from sqltune.serve.process import ServerProcess

    server = ServerProcess(["--model", str(smollm2_artifact), "--engine", "transformers"]).launch()
    try:
        server.wait_ready()
        body = {"question": QUESTION, "context": CONTEXT, "max_tokens": 48}
        answer = httpx.post(server.url + "/v1/sql", json=body, timeout=120).json()
        # the server answers what the artifact itself generates from the same ids (3 steps of training
        # do not make good SQL yet; the same SQL on both paths is what is tested)
        from sqltune import generation
        from sqltune.engines import batch

        loaded = generation.load(smollm2_artifact)
        with batch.open_model(smollm2_artifact, engine="transformers") as llm:
            assert answer["sql"] == llm.generate_sql([(QUESTION, CONTEXT)], max_new_tokens=48)[0]
        assert answer["finish_reason"] in ("stop", "length") and answer["usage"]["prompt_tokens"] > 20
        card = httpx.get(server.url + "/v1/models").json()["data"][0]
        assert card["prompt_template"] == loaded.template.to_dict() and loaded.template.name == "chat"
    finally:
        server.stop()


@pytest.mark.slow
def test_bf16_lora_on_smollm2_merges_into_fp32_with_parity(tmp_path, embedded, model_cache, shared_data):
    """A few bf16 steps of SmolLM2 on a CPU publish: merged into the fp32 base, checked against fp32 base + adapter
    (a bf16 merge failed that check at 5.6e-02 of the logit scale)."""
    if torch.cuda.is_available():
        pytest.skip("the CPU bf16 path")
    embedded("smollm2-135m")
    out = tmp_path / "bf16"
    meta = finetune_real(out, "smollm2-135m", "--method", "lora", "--max-steps", "2", "--dtype", "bf16",
                         cache=model_cache, data=shared_data)
    assert meta["train_dtype"] == "bf16" and meta["dtype"] == "fp32" and meta["metrics"]["steps"] == 2
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(str(out / "model.safetensors")).values())
