"""OpenAI parameters sqltune does not implement are a 400 naming the field, through the official
`openai` client against a real `sqltune serve` on 127.0.0.1; their no-op values still work.

    pytest tests/test_serve_unsupported_params.py

Answering 200 while ignoring `best_of`, `tools` or `response_format: json_object` hands the client
something else than it asked for (json_object came back as SQL text), which is worse than a 400.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from sqltune.serve.process import ServerProcess

SCHEMA = "CREATE TABLE head (age INTEGER, name VARCHAR)"
QUESTION = "How many heads are older than 56?"
MESSAGES = [{"role": "system", "content": SCHEMA}, {"role": "user", "content": QUESTION}]
TOOL = {"type": "function", "function": {"name": "run_sql", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with ServerProcess(["--model", str(tiny_model_dir), "--served-model-name", "tiny-sql",
                        "--default-max-tokens", "8"]) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


CHAT_REFUSED = [
    ("tools", {"tools": [TOOL]}),
    ("tool_choice", {"tool_choice": "required"}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("response_format", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object", "properties": {"sql": {"type": "string"}}}}}}),
    ("frequency_penalty", {"frequency_penalty": 0.5}),
    ("presence_penalty", {"presence_penalty": -1.0}),
    ("logit_bias", {"logit_bias": {"50256": -100}}),
    ("top_logprobs", {"top_logprobs": 3, "logprobs": False}),
    ("top_k", {"extra_body": {"top_k": 5}}),
    ("repetition_penalty", {"extra_body": {"repetition_penalty": 1.3}}),
    ("guided_json", {"extra_body": {"guided_json": {"type": "object"}}}),
]


@pytest.mark.parametrize(("field", "extra"), CHAT_REFUSED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CHAT_REFUSED)])
def test_chat_parameters_not_implemented_are_a_400_naming_the_field(client, field, extra) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-sql", messages=MESSAGES, **extra)
    assert caught.value.param == field and caught.value.code == "unsupported", caught.value.body
    assert caught.value.body["message"].startswith(f"{field}: "), caught.value.body


COMPLETION_REFUSED = [
    ("best_of", {"best_of": 2}),
    ("best_of", {"best_of": True}),  # not the no-op 1
    ("suffix", {"suffix": " END"}),
    ("frequency_penalty", {"frequency_penalty": 1.0}),
    ("logit_bias", {"logit_bias": {"7": 50}}),
    ("use_beam_search", {"extra_body": {"use_beam_search": True}}),
    ("min_p", {"extra_body": {"min_p": 0.2}}),
    ("ignore_eos", {"extra_body": {"ignore_eos": True}}),
]


@pytest.mark.parametrize(("field", "extra"), COMPLETION_REFUSED,
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(COMPLETION_REFUSED)])
def test_completion_parameters_not_implemented_are_a_400_naming_the_field(client, field, extra) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-sql", prompt=QUESTION, max_tokens=4, **extra)
    assert caught.value.param == field and caught.value.code == "unsupported", caught.value.body


def test_the_reason_says_what_to_send_instead(client) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-sql", messages=MESSAGES, response_format={"type": "json_object"})
    message = caught.value.message
    assert "JSON" in message and "constrain" in message and '{"type": "text"}' in message, message


def test_no_op_values_of_the_same_parameters_are_answered(client) -> None:
    chat = client.chat.completions.create(model="tiny-sql", messages=MESSAGES, max_tokens=4, tools=[],
                                          response_format={"type": "text"}, frequency_penalty=0, presence_penalty=0.0,
                                          logit_bias={}, extra_body={"top_k": -1, "repetition_penalty": 1.0})
    assert chat.choices[0].finish_reason in ("stop", "length")
    done = client.completions.create(model="tiny-sql", prompt=QUESTION, max_tokens=4, best_of=1, suffix=None,
                                     user="someone", extra_body={"use_beam_search": False})
    assert done.choices[0].finish_reason in ("stop", "length")


def test_vertex_predict_parameters_are_checked_the_same_way(server) -> None:
    r = httpx.post(server.url + "/predict", json={"instances": [QUESTION], "parameters": {"best_of": 3}}, timeout=60)
    assert r.status_code == 400 and "best_of" in r.json()["error"]["message"], r.text
