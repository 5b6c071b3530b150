"""Answers chosen by execution in `sqltune serve` (a real server on 127.0.0.1, the tiny model):
/v1/sql, /predict and /v1/sql/stream with `candidates`, checked against the same candidates asked
for one by one through /v1/completions and voted on here by sqltune.sql.vote.

    pytest tests/test_serve_candidates.py
"""

from __future__ import annotations

import json

import httpx
import pytest

from sqltune.data import synthetic
from sqltune.prompts import extract_sql, load_template
from sqltune.serve.process import ServerProcess
from sqltune.sql import vote
from sqltune.sql.schema import parse_schema

TEMPERATURE, TOP_P = 0.8, 0.95
# The tiny model names these tables whatever it is asked, so with all of them in the context several
# candidates run, and they differ: a vote with something to choose from.
WIDE = ("CREATE TABLE hospital_info (name VARCHAR, city VARCHAR, doctors INTEGER); "
        "CREATE TABLE product_info (name VARCHAR, department VARCHAR, brand VARCHAR, price INTEGER); "
        "CREATE TABLE player_info (name VARCHAR, city VARCHAR, position VARCHAR, games INTEGER); "
        "CREATE TABLE employee_info (name VARCHAR, department VARCHAR, duration INTEGER, height INTEGER)")
WIDE_QUESTIONS = ["How many hospitals are in Austin?", "List the name of products with brand Acme.",
                  "Which 3 products have the highest price? Give their name."]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny-sql", "--max-model-len", "512",
            "--default-max-tokens", "48", "--max-batch-size", "8", "--max-queue", "8", "--candidates", "3",
            "--candidate-temperature", str(TEMPERATURE), "--candidate-top-p", str(TOP_P)]
    with ServerProcess(args) as s:
        yield s


@pytest.fixture(scope="module")
def examples():
    return list(synthetic.generate(30, seed=321))


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def _expected(server, template, ex: dict, k: int) -> vote.Vote:
    """The server's candidates, generated one request at a time: greedy, then samples seeded 1..k-1."""
    prompt = template.build_prompt(ex["question"], ex["context"])
    common = {"prompt": prompt, "max_tokens": 48, "stop": list(template.stops)}
    texts = [_post(server, "/v1/completions", {**common, "temperature": 0}).json()["choices"][0]["text"]]
    sampled = _post(server, "/v1/completions", {**common, "temperature": TEMPERATURE, "top_p": TOP_P,
                                                 "n": k - 1, "seed": 1}).json()
    texts += [c["text"] for c in sampled["choices"]]
    schema = parse_schema(ex["context"])
    candidates = [vote.Candidate(extract_sql(t, template=template)) for t in texts]
    return vote.choose(candidates, schema, vote.on_synthesised(schema, ex["question"]))


def _winners(want: vote.Vote) -> set[str]:
    """The SQL of every candidate in a largest result group: the server breaks ties between groups by
    likelihood, which the completions route does not report, so any of them may be its answer."""
    sizes = {}
    for r in want.runs:
        if r.ran:
            sizes.setdefault(r.group, []).append(r.sql)
    return {sql for members in sizes.values() if len(members) == want.agreed for sql in members} or {want.sql}


def _agrees(answer: dict, want: vote.Vote, k: int) -> bool:
    return (answer["sql"] in _winners(want) and (answer["candidates"], answer["candidates_ran"],
                                                  answer["candidates_agreed"]) == (k, want.ran, want.agreed))


def test_v1_sql_returns_the_answer_most_candidates_agree_on(server, tiny_model_dir, examples):
    template = load_template(tiny_model_dir)
    disagreed = 0
    asked = [*examples[:6], *({"question": q, "context": WIDE} for q in WIDE_QUESTIONS)]
    for ex in asked:
        body = _post(server, "/v1/sql", {"question": ex["question"], "context": ex["context"], "candidates": 4})
        assert body.status_code == 200, body.text
        answer = body.json()
        want = _expected(server, template, ex, 4)
        assert _agrees(answer, want, 4), (ex, answer, want)
        assert 0 <= answer["candidates_agreed"] <= answer["candidates_ran"] <= 4
        disagreed += 1 < want.ran and want.agreed < want.ran
    print(f"questions on which several candidates ran and disagreed: {disagreed} of {len(asked)}")
    assert disagreed > 0, "no vote had anything to choose from: widen the context or change TEMPERATURE"


def test_the_servers_default_applies_and_one_candidate_is_the_greedy_answer(server, examples):
    ex = examples[0]
    default = _post(server, "/v1/sql", {"question": ex["question"], "context": ex["context"]}).json()
    assert default["candidates"] == 3 and default["candidates_ran"] is not None  # --candidates 3
    one = _post(server, "/v1/sql", {"question": ex["question"], "context": ex["context"], "candidates": 1}).json()
    assert (one["candidates"], one["candidates_ran"], one["candidates_agreed"]) == (1, None, None)
    assert one["usage"]["completion_tokens"] < default["usage"]["completion_tokens"]  # every candidate is counted


@pytest.mark.parametrize("value, needle", [(0, "candidates"), (17, "candidates"), ("4", "candidates"),
                                           (True, "candidates")])
def test_a_bad_candidates_value_is_a_400_naming_it(server, value, needle):
    r = _post(server, "/v1/sql", {"question": "How many?", "context": "CREATE TABLE t (a INTEGER)",
                                  "candidates": value})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_more_candidates_than_the_server_takes_at_once_is_a_400(server):
    # max_batch_size 8 + max_queue 8 = 16 sequences: 3 instances of 6 candidates is 18
    instance = {"question": "How many?", "context": "CREATE TABLE t (a INTEGER)", "candidates": 6}
    r = _post(server, "/predict", {"instances": [instance] * 3})
    assert r.status_code == 400 and "candidates" in r.json()["error"]["message"], r.text


def test_predict_votes_per_instance(server, tiny_model_dir, examples):
    template = load_template(tiny_model_dir)
    a, b = examples[1], examples[2]
    r = _post(server, "/predict", {"instances": [{"question": a["question"], "context": a["context"]},
                                                 {"question": b["question"], "context": b["context"], "candidates": 1},
                                                 template.build_prompt(a["question"], a["context"])],
                                   "parameters": {"candidates": 4, "max_tokens": 48}})
    assert r.status_code == 200, r.text
    first, second, text = r.json()["predictions"]
    want = _expected(server, template, a, 4)
    assert _agrees(first, want, 4), (first, want)
    assert second["candidates"] == 1 and second["candidates_ran"] is None
    assert isinstance(text, str)


def test_the_stream_sends_the_greedy_tokens_then_the_voted_answer(server, examples):
    ex = examples[3]
    whole = _post(server, "/v1/sql", {"question": ex["question"], "context": ex["context"], "candidates": 4}).json()
    greedy = _post(server, "/v1/sql", {"question": ex["question"], "context": ex["context"], "candidates": 1}).json()
    raw = _post(server, "/v1/sql/stream", {"question": ex["question"], "context": ex["context"], "candidates": 4})
    events = [json.loads(line[6:]) for line in raw.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    answer = events[-1]
    # the stream's last event is /v1/sql's answer, plus the playground's lint hints on it
    assert answer.pop("done") is True and isinstance(answer.pop("lint"), list) and answer == whole
    streamed = "".join(e["text"] for e in events[:-1])
    assert greedy["sql"] in " ".join(streamed.split())  # the tokens that streamed are the greedy candidate's


def test_constrained_candidates_all_follow_the_grammar(server, examples):
    ex = examples[4]
    r = _post(server, "/v1/sql", {"question": ex["question"], "context": ex["context"], "candidates": 4,
                                  "constrain": "schema"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["constrained"] is True and answer["candidates"] == 4
    # every candidate decodes under the schema's grammar (the tiny model's free answers name tables it never
    # saw), so some of them run and the chosen one is valid against the schema
    assert answer["valid"] and answer["candidates_ran"] >= 1, answer
