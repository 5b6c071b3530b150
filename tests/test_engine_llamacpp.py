"""`--engine llamacpp`: llama.cpp in-process (xllamacpp) behind the engine contract, on the tiny model.

    python -m pytest -q tests/test_engine_llamacpp.py      # ~1 min (the tiny model, one GGUF export)

Real llama.cpp throughout: a served tiny model answers as the transformers path does (f16), streams,
cancels a slot when the client goes away, keeps one bad request from failing another, and decodes
under the schema grammar translated to GBNF.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("xllamacpp", reason="--engine llamacpp needs xllamacpp")

from sqltune import config, constrain, generation, prompts  # noqa: E402
from sqltune.engines import batch  # noqa: E402
from sqltune.engines import llamacpp_engine as L  # noqa: E402
from sqltune.engines.base import SamplingParams, complete  # noqa: E402
from sqltune.serve.process import ServerProcess  # noqa: E402

SCHEMA = "CREATE TABLE head (age INTEGER, name VARCHAR)"
QUESTIONS = ["How many heads are older than 56?", "List the names of heads older than 30.",
             "What is the maximum age of the heads?"]
GOLD = ["SELECT COUNT(*) FROM head WHERE age > 56", "SELECT name FROM head WHERE age > 30",
        "SELECT max(age) FROM head"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llamacpp-cache")


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, cache: Path):
    args = ["--model", str(tiny_model_dir), "--engine", "llamacpp", "--gguf-quant", "f16", "--served-model-name",
            "tiny-sql", "--max-batch-size", "4", "--max-model-len", "256", "--default-max-tokens", "24"]
    with ServerProcess(args, env={"SQLTUNE_CACHE": str(cache)}) as s:
        yield s


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, cache: Path, server):
    """The engine in this process, on the GGUF the server exported (the cache hit is part of the test)."""
    import os

    exported = next((cache / "gguf-export").rglob("model.f16.gguf"))  # written by the server above
    written = exported.stat().st_mtime_ns
    old, os.environ["SQLTUNE_CACHE"] = os.environ.get("SQLTUNE_CACHE"), str(cache)
    try:
        cfg = config.Config(serve_engine="llamacpp", gguf_quant="f16", max_batch_size=2)
        eng = L.LlamaCppEngine(cfg, tiny_model_dir, prompts.load_template(tiny_model_dir), {})
        asyncio.run(eng.start())
    finally:
        if old is None:
            os.environ.pop("SQLTUNE_CACHE", None)
        else:
            os.environ["SQLTUNE_CACHE"] = old
    assert eng.gguf_path == exported and exported.stat().st_mtime_ns == written  # reused, not exported again
    yield eng
    asyncio.run(eng.close())


def test_served_answers_equal_the_transformers_path(server, tiny_model_dir: Path) -> None:
    source = generation.load(tiny_model_dir, dtype="fp32")
    texts = [source.template.build_prompt(q, SCHEMA) for q in QUESTIONS]
    reference = [c.text for c in batch.generate(source, texts, 24)]
    got = [httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny-sql", "prompt": t, "max_tokens": 24}).json()["choices"][0]["text"] for t in texts]
    # f16 weights may part a near-tie of the fp32 model: the answers must agree token for token up to the first
    # step where the fp32 model's two best next tokens are within f16's rounding (a fixed margin)
    for prompt, ours, theirs in zip(texts, got, reference, strict=True):
        agreed = _tokens_before_a_near_tie(source, prompt, theirs)
        assert agreed >= 4, f"a near-tie within the first tokens of {theirs!r}"
        ids = source.tokenizer(theirs, add_special_tokens=False)["input_ids"][:agreed]
        assert ours.startswith(source.tokenizer.decode(ids)), (ours, theirs, agreed)
    exact = got[0]
    streamed = []
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "tiny-sql", "prompt": texts[0], "max_tokens": 24, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                import json

                streamed.append(json.loads(line[6:])["choices"][0]["text"])
    assert len(streamed) > 2 and "".join(streamed) == exact
    ready = httpx.get(server.url + "/ready").json()
    assert ready["engine"] == "llamacpp"
    assert "sqltune_generation_tokens_total" in httpx.get(server.url + "/metrics").text


NEAR_TIE = 0.05  # logits; f16 weights move the tiny model's logits by well under this


def _tokens_before_a_near_tie(source, prompt: str, completion: str) -> int:
    """How many tokens of `completion` the fp32 model chose by more than NEAR_TIE over its second choice."""
    import torch

    tok = source.tokenizer
    prompt_ids = prompts.encode_prompt(tok, prompt)
    ids = tok(completion, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = source.model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1:-1].float()
    top2 = logits.topk(2, dim=-1).values
    close = (top2[:, 0] - top2[:, 1] < NEAR_TIE).nonzero()
    return int(close[0]) if len(close) else len(ids)


def test_client_going_away_frees_the_slot(server, tiny_model_dir: Path) -> None:
    prompt = prompts.load_template(tiny_model_dir).build_prompt(QUESTIONS[0], SCHEMA)
    body = {"model": "tiny-sql", "prompt": prompt, "max_tokens": 200, "min_tokens": 200, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as s:
        assert next(s.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 30
    gauge = "sqltune_sequences_in_flight"
    while time.monotonic() < deadline:
        text = httpx.get(server.url + "/metrics").text
        if any(line.startswith(gauge) and float(line.split()[-1]) == 0 for line in text.splitlines()):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the abandoned stream still holds its slot")
    r = httpx.post(server.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 8, "min_tokens": 8},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8  # min_tokens through llama.cpp


def test_one_bad_request_never_fails_another(engine) -> None:
    ids = engine.encode(engine.template.build_prompt(QUESTIONS[0], SCHEMA))

    async def both():
        bad = complete(engine, ids, SamplingParams(16, grammar='root ::= "SELECT" undefined_rule'))
        good = complete(engine, ids, SamplingParams(16))
        return await asyncio.gather(bad, good)

    bad, good = asyncio.run(both())
    assert bad.finish_reason == "error" and bad.error
    assert good.finish_reason in ("stop", "length") and good.completion_tokens > 0 and not good.error
    if hasattr(good, "logprob"):  # cumulative log-prob, from llama.cpp's per-token probabilities
        assert good.logprob < 0


def test_schema_grammar_in_gbnf_accepts_the_same_gold_sql(engine) -> None:
    for question, gold in zip(QUESTIONS, GOLD, strict=True):
        ebnf = constrain.build("schema", question, SCHEMA).grammar
        gbnf = L.to_gbnf(ebnf)
        assert "query_0" in ebnf and "query_0" not in gbnf and "query-0" in gbnf
        # the same language: xgrammar reads the GBNF spelling too, and both take the gold query
        assert constrain.accepts(ebnf, gold) and constrain.accepts(gbnf, gold)
        assert not constrain.accepts(gbnf, gold.replace("head", "heads"))
        # llama.cpp parses the GBNF and decodes inside it: what it writes is in the xgrammar language
        ids = engine.encode(engine.template.build_prompt(question, SCHEMA))
        out = asyncio.run(complete(engine, ids, SamplingParams(40, grammar=ebnf)))
        assert out.finish_reason in ("stop", "length") and not out.error
        if out.finish_reason == "stop":
            assert constrain.accepts(ebnf, out.text), out.text
        else:
            assert out.text.strip().upper().startswith("SELECT")


def test_literals_keep_their_underscores() -> None:
    assert L.to_gbnf('a_b ::= "x_y" [a_z] c_d') == 'a-b ::= "x_y" [a_z] c-d'


def test_a_gguf_file_serves_and_other_engines_refuse_it(tmp_path: Path, tiny_model_dir: Path, cache: Path) -> None:
    from tests.conftest import run_sqltune

    gguf = next((cache / "gguf-export").rglob("model.f16.gguf"))
    proc = run_sqltune("serve", "--model", str(gguf), "--engine", "transformers", check=False)
    assert proc.returncode == 2 and "--engine llamacpp" in proc.stderr
    with ServerProcess(["--model", str(gguf), "--engine", "llamacpp", "--max-batch-size", "1"]) as s:
        r = httpx.post(s.url + "/v1/sql", json={"question": QUESTIONS[0], "context": SCHEMA}, timeout=60)
        assert r.status_code == 200 and r.json()["sql"]


def test_missing_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from sqltune.engines import factory
    from sqltune.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xllamacpp" else real(name, *a))
    with pytest.raises(ConfigError, match="xllamacpp"):
        factory.choose_engine("llamacpp")
