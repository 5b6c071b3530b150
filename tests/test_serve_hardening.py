"""No request can hurt another: hostile parameters, schemas, bodies and headers against a real
`sqltune serve` with the tiny model, each answered with a 4xx in OpenAI's error shape while
ordinary requests in the same batches get exactly what they get alone.

    pytest tests/test_serve_hardening.py
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sqltune.prompts import load_template
from sqltune.serve.process import ServerProcess

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCHEMA = "CREATE TABLE head (age INTEGER, name VARCHAR)"
QUESTIONS = ["How many heads are older than 56?", "List all names", "What is the oldest age?",
             "How many heads are there?", "What is the name of the youngest head?", "List ages over 30"]
BATCH, QUEUE = 8, 8  # the server admits at most 16 sequences at once
WIDE_SCHEMA = "CREATE TABLE t (" + ", ".join(f"c{i} INT" for i in range(8000)) + ")"  # 90 kB, 21 s of event loop before
DEEP_SCHEMA = "CREATE TABLE t (a INT CHECK (" + "(" * 3000 + "1" + ")" * 3000 + "))"
# 256 tables x 16 columns with the same names (56 kB): 14-32 s of database synthesis before
SHARED_NAMES_SCHEMA = "; ".join(f"CREATE TABLE t{i} (" + ", ".join(f"c{j} INTEGER" for j in range(16)) + ")"
                                for i in range(256))
HUGE_QUESTION = " ".join(f"word{i % 97} Carlton {i}" for i in range(6667))  # 20,000 words, ~150 kB


class HealthWatch:
    """/health latency, sampled from a thread while a test's work runs (`with HealthWatch(server) as h`)."""

    def __init__(self, server) -> None:
        self.server, self.ms, self.done = server, [], threading.Event()
        self.thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self.done.is_set():
            started = time.perf_counter()
            httpx.get(self.server.url + "/health", timeout=30)
            self.ms.append((time.perf_counter() - started) * 1000)
            time.sleep(0.02)

    def __enter__(self) -> HealthWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def worst(self) -> float:
        return max(self.ms, default=0.0)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny-sql", "--max-model-len", "256",
            "--max-tokens-limit", "64", "--default-max-tokens", "24", "--max-batch-size", str(BATCH),
            "--max-queue", str(QUEUE), "--max-body-bytes", "200000", "--batch-wait-ms", "50", "--body-timeout", "2"]
    with ServerProcess(args, env={"SQLTUNE_API_KEY": KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def template(tiny_model_dir):
    return load_template(tiny_model_dir)


def post(server, path: str, body: dict | bytes, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={**AUTH, "Content-Type": "application/json", **kw.pop("headers", {})}, **kw)


def assert_openai_error(r: httpx.Response, status: int, needle: str = "") -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert needle in error["message"], error
    return error


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+(\S+)$", text, re.M))


# --- 1. sampling parameters that used to fail the whole batch -----------------------------------

@pytest.mark.parametrize(("field", "value", "needle"), [
    ("temperature", 1e-39, "0 for greedy decoding or at least 0.01"),  # logits / 1e-39 = inf: batch failed
    ("temperature", 0.005, "at least 0.01"),
    ("temperature", True, "temperature"),
    ("seed", 2**63, "seed"),  # torch.Generator.manual_seed overflowed: batch failed
    ("seed", -1, "seed"),
    ("max_tokens", True, "max_tokens"),  # was taken as max_tokens=1
    ("n", True, "n"),
    ("max_tokens", 3.0, "max_tokens"),
    ("stop", ["x" * 300], "256 characters"),
])
def test_hostile_sampling_parameters_are_400s(server, template, field, value, needle):
    prompt = template.build_prompt(QUESTIONS[0], SCHEMA)
    for path, body in [("/v1/completions", {"prompt": prompt}), ("/generate", {"prompt": prompt}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTIONS[0]}]})]:
        error = assert_openai_error(post(server, path, {**body, field: value, "temperature": 0.7}
                                         if field != "temperature" else {**body, field: value}), 400, needle)
        assert field in error["message"]


def test_a_failing_row_ends_alone_and_the_batch_decodes_on(tiny_model_dir):
    """The engine itself, below the request validation: a row whose sampling or seed fails gets an
    error; the rows batched with it finish with the text they get alone."""
    from sqltune import config
    from sqltune.artifacts import manifests
    from sqltune.engines.base import SamplingParams, complete
    from sqltune.engines.transformers_engine import TransformersEngine

    cfg, _ = config.resolve(None, {}, {"max_batch_size": 8, "batch_wait_ms": 200})
    template = load_template(tiny_model_dir)
    engine = TransformersEngine(cfg, tiny_model_dir, template, manifests.read_meta(tiny_model_dir))
    prompts = [template.build_prompt(q, SCHEMA) for q in QUESTIONS[:4]]
    greedy = SamplingParams(max_tokens=16)
    hostile = [SamplingParams(max_tokens=16, temperature=1e-39, seed=1),
               SamplingParams(max_tokens=16, temperature=0.8, seed=2**64)]  # past what torch takes

    async def run() -> tuple[list, list, list[int]]:
        sizes: list[int] = []
        await engine.start(on_batch=sizes.append)
        try:
            ids = [engine.encode(p) for p in prompts]
            alone = [await complete(engine, i, greedy) for i in ids]
            mixed = await asyncio.gather(*[complete(engine, i, greedy) for i in ids],
                                         *[complete(engine, ids[0], h) for h in hostile])
            return alone, list(mixed), sizes
        finally:
            await engine.close()

    alone, mixed, sizes = asyncio.run(run())
    assert sizes[-1] == len(prompts) + len(hostile), sizes  # all six shared one batch
    assert [c.text for c in mixed[:4]] == [c.text for c in alone]
    assert all(c.finish_reason in ("stop", "length") for c in mixed[:4])
    assert [c.finish_reason for c in mixed[4:]] == ["error", "error"]
    assert "not finite" in mixed[4].error and mixed[5].error


# --- 3, 8. schemas and text that cost the server or could not be encoded ------------------------

def test_a_huge_or_deep_schema_is_a_quick_400_and_never_stalls_other_routes(server):
    health_ms: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            started = time.perf_counter()
            httpx.get(server.url + "/health", timeout=30)
            health_ms.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        started = time.perf_counter()
        with ThreadPoolExecutor(3) as pool:
            wide = list(pool.map(lambda _: post(server, "/v1/sql", {"question": "q", "context": WIDE_SCHEMA}), range(3)))
        elapsed = time.perf_counter() - started
        deep = post(server, "/v1/sql", {"question": "q", "schema": [DEEP_SCHEMA]})
    finally:
        done.set()
        watcher.join()
    for r in wide:
        assert_openai_error(r, 400, "at most 256 tables and 4096 columns")
    assert elapsed < 10, f"three wide schemas took {elapsed:.1f}s"
    error = assert_openai_error(deep, 400, "nested too deeply")
    assert error["param"] == "schema" and error["code"] == "invalid_schema"
    assert max(health_ms) < 1000, f"/health took {max(health_ms):.0f} ms while schemas were read"


def test_what_goes_into_a_grammar_is_limited_before_any_build(server, template):
    """A 20,000-word `question` beside a short prompt took minutes of grammar build with no answer; a
    3,000-word question on /v1/sql waited 7.5 s for the prompt-length 400. Both are quick 400s now."""
    prompt = template.build_prompt(QUESTIONS[0], SCHEMA)
    extra = {"constrain": "schema+values", "context": SCHEMA, "question": HUGE_QUESTION}
    with HealthWatch(server) as health:
        started = time.perf_counter()
        completions = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, **extra})
        chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTIONS[0]}],
                                                     "max_tokens": 8, **extra})
        long_sql = post(server, "/v1/sql", {"question": " ".join(HUGE_QUESTION.split()[:3000]), "context": SCHEMA,
                                            "constrain": "schema+values"})
        elapsed = time.perf_counter() - started
    for r in (completions, chat):
        error = assert_openai_error(r, 400, "question is")
        assert error["code"] == "context_length_exceeded" and error["param"] == "question"
    assert assert_openai_error(long_sql, 400, "context")["code"] == "context_length_exceeded"
    assert elapsed < 10, f"three refused requests took {elapsed:.1f}s"  # minutes before
    assert health.worst() < 1000, f"/health took {health.worst():.0f} ms"
    ordinary = post(server, "/v1/sql", {"question": QUESTIONS[0], "context": SCHEMA, "constrain": "schema+values"})
    assert ordinary.status_code == 200 and ordinary.json()["constrained"] is True, ordinary.text


def test_sql_run_on_a_schema_of_shared_names_is_quick(server):
    """256 tables x 16 same-named columns: every column is a join key of 255 others. Four at once held
    every run slot for 32 s (quadratic linking); now each is linear in the schema."""
    body = {"context": SHARED_NAMES_SCHEMA, "sql": "SELECT t3.c1 FROM t3 JOIN t200 ON t3.c0 = t200.c0 WHERE t3.c2 > 5"}
    with HealthWatch(server) as health:
        started = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            runs = list(pool.map(lambda _: post(server, "/v1/sql/run", body), range(4)))
        elapsed = time.perf_counter() - started
    for r in runs:
        assert r.status_code == 200, r.text[:300]
        assert r.json()["valid"] and r.json()["result"]["ok"], r.json()["result"]
        assert len(r.json()["database"]) == 256
    assert elapsed < 20, f"four runs took {elapsed:.1f}s"
    assert health.worst() < 1000, f"/health took {health.worst():.0f} ms"


def test_head_probes_answer_like_get(server):
    for path in ("/health", "/ready", "/"):
        r = httpx.head(server.url + path, timeout=10)
        assert r.status_code == 200, (path, r.status_code)
        assert r.content == b"" and int(r.headers["content-length"]) > 0


def test_a_body_shorter_than_its_content_length_is_408_not_a_wait_forever(server):
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.sendall(f"POST /v1/sql HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"question\"".encode())
        started = time.perf_counter()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # a socket.timeout here is the old wait-forever
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"body_timeout"' in reply and time.perf_counter() - started < 15


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", b'{"prompt": "SELECT \\ud800"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a \\udfff b"}]}'),
    ("/generate", b'{"prompt": "\\ud800"}'),
    ("/v1/sql", b'{"question": "\\ud800?", "context": "CREATE TABLE t (a INT)"}'),
    ("/v1/sql", b'{"question": "q", "context": "CREATE TABLE t (\\ud800 INT)"}'),
    ("/predict", b'{"instances": ["\\ud800"]}'),
    ("/v1/completions", b'{"prompt": "x", "model": "\\ud800"}'),
])
def test_a_lone_surrogate_is_a_400(server, path, body):
    assert_openai_error(post(server, path, body), 400, "lone UTF-16 surrogate")


# --- 6, 7, 10, 11. errors that were 500s, plain text or half-done work --------------------------

def test_a_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(30):
            yield b" " * 10_000  # 300 kB with no Content-Length: the gate counts as it reads
    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert_openai_error(r, 413, "larger than 200000 bytes")


def test_predict_with_more_instances_than_ever_admitted_is_a_400_before_any_work(server):
    generated = metric(server, "sqltune_generation_tokens_total")
    r = post(server, "/predict", {"instances": ["SELECT"] * (BATCH + QUEUE + 1), "parameters": {"max_tokens": 8}})
    error = assert_openai_error(r, 400, f"at most {BATCH + QUEUE}")
    assert error["code"] == "too_many_sequences" and error["param"] == "instances"
    assert metric(server, "sqltune_generation_tokens_total") == generated  # nothing was started
    ok = post(server, "/predict", {"instances": ["SELECT"] * (BATCH + QUEUE), "parameters": {"max_tokens": 2}})
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == BATCH + QUEUE


def test_an_authorization_header_without_its_scheme_says_so(server):
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": KEY})
    error = assert_openai_error(r, 401, "no `Bearer` scheme")
    assert "Authorization: Bearer <key>" in error["message"]
    assert "missing API key" in assert_openai_error(httpx.get(server.url + "/v1/models"), 401)["message"]
    assert "wrong API key" in assert_openai_error(
        httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"}), 401)["message"]


def test_an_unhandled_error_is_a_json_500_and_the_connection_stays_usable(tiny_model_dir):
    """The app as `sqltune serve` builds it, in a real uvicorn, with one route added that fails as
    a bug would; the client's keep-alive connection must carry its next request."""
    import uvicorn

    from sqltune import config
    from sqltune.artifacts import manifests
    from sqltune.engines.transformers_engine import TransformersEngine
    from sqltune.serve.app import create_app
    from sqltune.serve.process import free_port

    cfg, _ = config.resolve(None, {}, {})
    engine = TransformersEngine(cfg, tiny_model_dir, load_template(tiny_model_dir), manifests.read_meta(tiny_model_dir))
    app = create_app(cfg, engine)

    async def broken() -> dict:
        return {"ratio": 1 / 0}

    app.add_api_route("/broken", broken)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            crashed = client.get("/broken")
            error = assert_openai_error(crashed, 500, "internal error")
            assert error["type"] == "server_error" and crashed.headers["x-request-id"] in error["message"]
            after = client.get("/health")  # the same connection: it was reset before
            assert after.status_code == 200 and after.json() == {"status": "ok"}
    finally:
        uv.should_exit = True
        thread.join(30)


def test_after_the_shutdown_grace_a_cut_request_gets_json(tiny_model_dir, template):
    prompt = template.build_prompt(QUESTIONS[0], SCHEMA)
    # no grace at all: the request in flight is cut whatever the machine's speed (950 tokens of the tiny model took
    # less than a 0.5 s grace on a fast CPU)
    with ServerProcess(["--model", str(tiny_model_dir), "--shutdown-grace", "0", "--max-tokens-limit", "1000"]) as s:
        out: list[httpx.Response] = []
        body = {"prompt": prompt, "max_tokens": 950, "min_tokens": 950}
        client = threading.Thread(target=lambda: out.append(httpx.post(s.url + "/v1/completions", json=body,
                                                                       timeout=60)))
        client.start()
        deadline = time.monotonic() + 30
        while metric_plain(s, "sqltune_sequences_in_flight") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        s.terminate()
        client.join(60)
        log = s.log()
    assert_openai_error(out[0], 503, "--shutdown-grace")
    lines = [line for line in log.splitlines() if line.strip()]
    plain = [line for line in lines if not line.startswith("{")]
    assert not plain, f"stderr lines that are not JSON: {plain[:5]}"
    assert all(json.loads(line)["severity"] for line in lines)


def metric_plain(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\s+(\S+)$", text, re.M))


def test_every_stderr_line_is_json(server):
    post(server, "/v1/sql", {"question": "q", "context": "CREATE TABLE t (a INT); REPLACE INTO t VALUES (1)"})
    lines = [line for line in server.log().splitlines() if line.strip()]
    assert lines
    plain = [line for line in lines if not line.startswith("{")]
    assert not plain, f"stderr lines that are not JSON: {plain[:5]}"


# --- isolation: ordinary requests while every hostile kind above is in flight --------------------

def test_ordinary_requests_are_untouched_by_hostile_neighbours(server, template):
    prompts = [template.build_prompt(q, SCHEMA) for q in QUESTIONS]

    def ordinary(i: int) -> str:
        r = post(server, "/v1/completions", {"prompt": prompts[i], "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = [ordinary(i) for i in range(len(prompts))]

    def chunked():
        for _ in range(30):
            yield b" " * 10_000

    hostile = [
        ("/v1/completions", {"prompt": prompts[0], "temperature": 1e-39, "max_tokens": 24}),
        ("/v1/completions", {"prompt": prompts[0], "temperature": 0.9, "seed": 2**63, "max_tokens": 24}),
        ("/v1/completions", {"prompt": prompts[0], "temperature": 0.9, "seed": 2**63 - 1, "n": 3, "max_tokens": 24}),
        ("/v1/completions", {"prompt": prompts[0], "max_tokens": True}),
        ("/generate", b'{"prompt": "\\ud800"}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("/v1/sql", {"question": "q", "context": WIDE_SCHEMA}),
        ("/v1/sql", {"question": "q", "context": DEEP_SCHEMA}),
        ("/predict", {"instances": ["x"] * (BATCH + QUEUE + 1)}),
        ("/v1/completions", chunked),
        ("/v1/completions", {"prompt": prompts[0], "max_tokens": 8, "constrain": "schema+values", "context": SCHEMA,
                             "question": HUGE_QUESTION}),
        ("/v1/sql/run", {"context": SHARED_NAMES_SCHEMA, "sql": "SELECT c1 FROM t7 WHERE c2 > 3"}),
        ("/v1/sql/run", {"context": SHARED_NAMES_SCHEMA, "sql": "SELECT t1.c0 FROM t1 JOIN t9 ON t1.c3 = t9.c3"}),
    ]

    def attack(item: tuple) -> int:
        path, body = item
        if callable(body):
            return httpx.post(server.url + path, content=body(), headers=AUTH, timeout=60).status_code
        return post(server, path, body).status_code

    start = threading.Barrier(len(prompts) + len(hostile))
    with HealthWatch(server) as health, ThreadPoolExecutor(len(prompts) + len(hostile)) as pool:
        together = [pool.submit(lambda i=i: (start.wait(), ordinary(i))[1]) for i in range(len(prompts))]
        attacks = [pool.submit(lambda h=h: (start.wait(), attack(h))[1]) for h in hostile]
        results = [f.result() for f in together]
        codes = [f.result() for f in attacks]
    assert results == alone
    assert all(400 <= c < 500 or c == 200 for c in codes), codes
    assert codes[-3] == 400 and codes[-2:] == [200, 200], codes  # the huge question is refused, the runs answered
    assert health.worst() < 1000, f"/health took {health.worst():.0f} ms among hostile neighbours"
    assert codes[2] == 200  # a seed at the top of the range wraps for sample j, it does not overflow
    assert httpx.get(server.url + "/health").status_code == 200


# --- property-based fuzzing of every route from the server's own OpenAPI document ---------------

FUZZ_EXAMPLES = 60  # per operation (9 of them), valid and invalid bodies: ~20 s on 2 cores


def test_fuzzed_requests_never_get_a_5xx_and_errors_have_openais_shape(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    seen: dict[int, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES * len(operations), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(*[op.as_strategy(generation_mode=mode) for op in operations
                       for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]))
    def fuzz(case) -> None:
        response = case.call(base_url=server.url, headers=AUTH, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        where = f"{case.method} {case.path}: {case.body!r:.300}"
        assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:300]}"
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, where
            assert isinstance(error["message"], str) and error["message"]

    started = time.perf_counter()
    fuzz()
    print(f"fuzzed {sum(seen.values())} requests over {len(operations)} operations in "
          f"{time.perf_counter() - started:.1f}s: {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 4 * len(operations)


CONSTRAINED_EXAMPLES = 48  # ~1 s each on 2 cores, most of it the large schemas' parse and synthesis


def _schema_text(tables: int, columns: int, shared: bool) -> str:
    return "; ".join(f"CREATE TABLE t{i} (" + ", ".join(f"c{j if shared else f'{i}_{j}'} INTEGER"
                                                         for j in range(columns)) + ")" for i in range(tables))


def test_fuzzed_constrained_requests_and_large_sql_runs_never_stall_or_5xx(server, template):
    """The constrained paths (`constrain`, `context`, `question` on every route that takes them) and
    /v1/sql/run with schemas up to 256 x 16, fuzzed with hypothesis: no 5xx, errors in OpenAI's shape,
    and /health under 1 s all the while."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    words = st.sampled_from([0, 1, 40, 300, 3000, 20_000]).map(lambda n: " ".join(HUGE_QUESTION.split()[:n]))
    contexts = st.one_of(st.sampled_from([SCHEMA, "", "not a schema at all", DEEP_SCHEMA, SHARED_NAMES_SCHEMA]),
                         st.builds(_schema_text, st.sampled_from([1, 8, 64, 256]), st.sampled_from([1, 4, 16]),
                                   st.booleans()))
    modes = st.sampled_from([None, "off", "schema", "schema+values", "regex", 7])
    questions = st.one_of(words, st.text(max_size=60))

    @st.composite
    def request(draw) -> tuple[str, dict]:
        path = draw(st.sampled_from(["/v1/sql", "/v1/completions", "/v1/chat/completions", "/predict",
                                     "/v1/sql/run"]))
        context, question, mode = draw(contexts), draw(questions), draw(modes)
        extra = {k: v for k, v in (("constrain", mode), ("context", context), ("question", question)) if v is not None}
        tokens = {"max_tokens": draw(st.sampled_from([1, 8, 24]))}
        if path == "/v1/sql":
            return path, {"question": question or "q", "context": context, "constrain": mode, **tokens}
        if path == "/v1/completions":
            return path, {"prompt": template.build_prompt(QUESTIONS[0], SCHEMA), **extra, **tokens}
        if path == "/v1/chat/completions":
            return path, {"messages": [{"role": "system", "content": SCHEMA},
                                       {"role": "user", "content": draw(st.sampled_from(QUESTIONS))}], **extra, **tokens}
        if path == "/predict":
            return path, {"instances": [{"question": question or "q", "context": context}],
                          "parameters": {"constrain": mode, **tokens}}
        sql = draw(st.sampled_from(["SELECT * FROM t0", "SELECT c0 FROM t1 WHERE c0 > 3", "SELECT name FROM head",
                                    "SELECT COUNT(*) FROM t0 JOIN t1 ON t0.c0 = t1.c0", "DROP TABLE t0"]))
        return path, {"context": context or SCHEMA, "sql": sql, "question": question[:2000]}

    seen: dict[int, int] = {}

    @settings(max_examples=CONSTRAINED_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(request())
    def fuzz(item: tuple[str, dict]) -> None:
        path, body = item
        r = post(server, path, body)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        where = f"{path}: {json.dumps(body)[:300]}"
        assert r.status_code < 500, f"{where} -> {r.status_code} {r.text[:300]}"
        if r.status_code >= 400:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], where
        elif path != "/v1/sql/run" and body.get("constrain") in ("schema", "schema+values"):
            answer = r.json()["predictions"][0] if path == "/predict" else r.json()
            assert answer["constrain"] == body["constrain"] and isinstance(answer["constrained"], bool), where
            assert answer["constrained"] or answer["reason"], where  # never silently unconstrained

    with HealthWatch(server) as health:
        fuzz()
    print(f"fuzzed {sum(seen.values())} constrained / sql-run requests: {dict(sorted(seen.items()))}")
    assert seen.get(200, 0) >= 5, seen
    assert health.worst() < 1000, f"/health took {health.worst():.0f} ms while the fuzzer ran"
