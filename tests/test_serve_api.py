"""`sqltune serve` as a real process on 127.0.0.1 with the tiny trained model: the official openai
client, raw HTTP for /generate, /v1/sql and /predict, 32 concurrent clients, every bad input.

    pytest tests/test_serve_api.py
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from sqltune.data import synthetic
from sqltune.prompts import extract_sql, load_template
from sqltune.serve.process import ServerProcess

SCHEMA = "CREATE TABLE head (age INTEGER, name VARCHAR)"
QUESTION = "How many heads are older than 56?"
MAX_MODEL_LEN = 256
MAX_TOKENS_LIMIT = 300
MAX_BODY = 20_000


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny-sql", "--max-model-len", str(MAX_MODEL_LEN),
            "--max-tokens-limit", str(MAX_TOKENS_LIMIT), "--max-body-bytes", str(MAX_BODY), "--max-batch-size", "8",
            "--max-queue", "64", "--default-max-tokens", "48"]
    with ServerProcess(args) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def template(tiny_model_dir):
    return load_template(tiny_model_dir)


@pytest.fixture(scope="module")
def examples():
    return list(synthetic.generate(40, seed=123))


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics").text
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)}\s+(\S+)$" if labels else
                         rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+(\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-sql"]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_completion_is_the_generation_modules_greedy_output(client, tiny_model_dir, template):
    from sqltune import generation
    from sqltune.engines import batch

    loaded = generation.load(str(tiny_model_dir))
    prompts = [template.build_prompt(QUESTION, SCHEMA), template.build_prompt("List all names", SCHEMA)]
    expected = batch.generate(loaded, prompts, max_new_tokens=24)
    for prompt, want in zip(prompts, expected, strict=True):
        got = client.completions.create(model="tiny-sql", prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == want.finish_reason
        assert got.usage.prompt_tokens == want.prompt_tokens
        assert got.usage.completion_tokens == want.completion_tokens


def test_n_seed_and_stop(client, template):
    prompt = template.build_prompt(QUESTION, SCHEMA)
    first = client.completions.create(model="tiny-sql", prompt=prompt, max_tokens=20, temperature=1.5, n=3, seed=7)
    again = client.completions.create(model="tiny-sql", prompt=prompt, max_tokens=20, temperature=1.5, n=3, seed=7)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded sampling repeats
    assert len({c.text for c in first.choices}) > 1  # sample j uses seed + j
    assert first.usage.prompt_tokens == again.usage.prompt_tokens > 0  # the prompt counts once, not n times

    full = client.completions.create(model="tiny-sql", prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    word = full.split()[1]  # the second word of the answer, e.g. COUNT(*)
    cut = client.completions.create(model="tiny-sql", prompt=prompt, max_tokens=30, temperature=0, stop=[" " + word])
    assert cut.choices[0].text == full[: full.index(" " + word)]
    assert cut.choices[0].finish_reason == "stop"


def test_streamed_completion_equals_the_whole_one(client, template):
    prompt = template.build_prompt("What is the name of the oldest head?", SCHEMA)
    whole = client.completions.create(model="tiny-sql", prompt=prompt, max_tokens=30)
    chunks = list(client.completions.create(model="tiny-sql", prompt=prompt, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # token by token, not one lump
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_uses_the_trained_template(client, template):
    messages = [{"role": "system", "content": SCHEMA}, {"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(model="tiny-sql", messages=messages, max_tokens=30)
    plain = client.completions.create(model="tiny-sql", prompt=template.build_prompt(QUESTION, SCHEMA), max_tokens=30)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.total_tokens == plain.usage.total_tokens

    stream = client.chat.completions.create(model="tiny-sql", messages=messages, max_tokens=30, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_generate_speaks_vllms_demo_api(server, template):
    prompt = template.build_prompt(QUESTION, SCHEMA)
    # the tutorial's `curl -d` sends a form Content-Type with a JSON body
    r = httpx.post(server.url + "/generate", content=json.dumps({"prompt": prompt, "max_tokens": 24}),
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    (text,) = r.json()["text"]
    assert text.startswith(prompt) and len(text) > len(prompt)

    with httpx.stream("POST", server.url + "/generate", json={"prompt": prompt, "max_tokens": 24, "stream": True}) as s:
        lines = [json.loads(line) for line in s.iter_lines() if line]
    assert len(lines) > 1
    assert all(line["text"][0].startswith(prompt) for line in lines)
    assert lines[-1]["text"] == [text]


def _runs(sql: str, schema: str) -> bool:
    db = sqlite3.connect(":memory:")
    try:
        for statement in schema.split(";"):
            db.execute(statement)
        db.execute(sql).fetchall()
        return True
    except sqlite3.Error:
        return False
    finally:
        db.close()


def test_sql_route_checks_against_the_schema(server, examples, template):
    for ex in examples[:12]:
        r = httpx.post(server.url + "/v1/sql", json={"question": ex["question"], "context": ex["context"],
                                                     "max_tokens": 64})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) >= {"sql", "valid", "tables", "columns", "error"}
        raw = httpx.post(server.url + "/v1/completions",
                         json={"prompt": template.build_prompt(ex["question"], ex["context"]), "max_tokens": 64,
                               "stop": ["\nQuestion:", "\nContext:", "\n\n"]}).json()["choices"][0]["text"]
        assert body["sql"] == extract_sql(raw)  # the artifact's template, cut at the first statement
        assert ";" not in body["sql"]
        # an independent engine agrees: SQLite runs exactly the queries the server calls valid
        assert body["valid"] == _runs(body["sql"], ex["context"]), body
        assert (body["error"] is None) == body["valid"]
        assert body["tables"] or not body["valid"]

    as_list = httpx.post(server.url + "/v1/sql", json={"question": QUESTION, "schema": [SCHEMA]}).json()
    as_context = httpx.post(server.url + "/v1/sql", json={"question": QUESTION, "context": SCHEMA}).json()
    assert as_list["sql"] == as_context["sql"] and as_list["valid"] == as_context["valid"]


def test_predict_speaks_vertex(server, template):
    prompt = template.build_prompt(QUESTION, SCHEMA)
    r = httpx.post(server.url + "/predict", json={
        "instances": [{"question": QUESTION, "context": SCHEMA}, prompt, {"prompt": prompt, "max_tokens": 3}],
        "parameters": {"max_tokens": 20}})
    assert r.status_code == 200, r.text
    sql, text, short = r.json()["predictions"]
    assert set(sql) >= {"sql", "valid", "tables", "columns", "error"}
    assert isinstance(text, str) and text
    assert short == text[: len(short)] and len(short) < len(text)


def test_32_concurrent_clients_get_what_they_would_get_alone(server, examples, template):
    prompts = [template.build_prompt(ex["question"], ex["context"]) for ex in examples[:32]]

    def ask(prompt: str) -> str:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 32}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = [ask(p) for p in prompts[:8]]
    batches_before = metric(server, "sqltune_batch_size_count")
    start = threading.Barrier(32)

    def together(prompt: str) -> str:
        start.wait()
        return ask(prompt)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(together, prompts))
    assert results[:8] == alone  # padding and batching do not change a greedy answer
    batches = metric(server, "sqltune_batch_size_count") - batches_before
    assert batches < 32, "concurrent requests should have been batched"


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_TOKENS_LIMIT + 1}, 400, f"limit of {MAX_TOKENS_LIMIT}"),
    ("/v1/completions", {"prompt": "word " * 400}, 400, f"context is {MAX_MODEL_LEN} tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, f"context is {MAX_MODEL_LEN} tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 99}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 9}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "tiny-sql"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 50, "max_tokens": 10}, 400, "min_tokens"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": SCHEMA}]}, 400, "user message"),
    ("/v1/sql", {"question": QUESTION}, 400, "context"),
    ("/v1/sql", {"question": QUESTION, "context": "this is not SQL"}, 400, "CREATE TABLE"),
    ("/v1/sql", {"question": "", "context": SCHEMA}, 400, "question"),
    ("/generate", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/predict", {"instances": []}, 400, "instances"),
    ("/predict", {"instances": [{"foo": 1}]}, 400, "prompt` or `question"),
    ("/v1/completions", {"prompt": "x" * (MAX_BODY + 10)}, 413, f"{MAX_BODY} bytes"),
    ("/nowhere", {}, 404, "/nowhere"),
])
def test_bad_input_gets_a_4xx_in_openais_error_shape(server, path, body, status, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"], error
    assert error["type"] and "param" in error and "code" in error


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model="tiny-sql", prompt="word " * 400)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    r = httpx.get(client.base_url.join("completions").__str__())  # GET on a POST route
    assert r.status_code == 405 and "error" in r.json()


def test_client_disconnect_cancels_generation(server, template):
    prompt = template.build_prompt(QUESTION, SCHEMA)
    before = metric(server, "sqltune_generation_tokens_total")
    body = {"prompt": prompt, "max_tokens": 180, "min_tokens": 180, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as s:
        lines = s.iter_lines()
        assert next(lines).startswith("data: ")
    # non-streaming: the client gives up after 0.05 s (an idle machine decodes the 180 tokens of the
    # 2-layer test model in under 0.2 s, so a longer wait would see the answer, not a disconnect)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False},
                   timeout=httpx.Timeout(5.0, read=0.05))
    deadline = time.monotonic() + 60
    while metric(server, "sqltune_sequences_in_flight") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "sqltune_sequences_in_flight") == 0
    spent = metric(server, "sqltune_generation_tokens_total") - before
    assert spent < 2 * 180, f"{spent} tokens generated for two abandoned requests of 180"


def test_metrics_openapi_and_access_log(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("sqltune_requests_total", "sqltune_request_duration_seconds_bucket", "sqltune_queue_depth",
                 "sqltune_prompt_tokens_total", "sqltune_generation_tokens_total", "sqltune_batch_size_bucket",
                 "sqltune_time_to_first_token_seconds_bucket"):
        assert name in text
    assert metric(server, "sqltune_requests_total", '{route="/v1/completions",status="200"}') > 0
    assert metric(server, "sqltune_requests_total", '{route="/v1/completions",status="400"}') > 0
    assert metric(server, "sqltune_ready") == 1

    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    for path in ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/sql", "/predict",
                 "/health", "/ready", "/metrics"):
        assert path in paths

    entries = [json.loads(line) for line in server.log().splitlines() if '"sqltune.serve.access"' in line]
    assert any(e["path"] == "/v1/sql" and e["status"] == 200 and e["ms"] > 0 and e["request_id"] for e in entries)
