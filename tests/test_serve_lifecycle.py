"""Start-up and shutdown of `sqltune serve`: a folder without its template is refused with what to
do, a model that fails to load exits non-zero, SIGTERM drains in-flight requests within the grace
period and then exits.

    pytest tests/test_serve_lifecycle.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest

from sqltune.prompts import load_template
from sqltune.serve.process import ServerProcess


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sqltune", "serve", *args, "--host", "127.0.0.1", "--port", "1"],
                          capture_output=True, text=True, timeout=120)


def test_a_folder_without_its_template_is_refused(tiny_model_dir, tmp_path):
    plain = tmp_path / "plain-hf-folder"
    shutil.copytree(tiny_model_dir, plain, ignore=shutil.ignore_patterns("sqltune.json", "checkpoints"))
    r = _serve("--model", str(plain))
    assert r.returncode == 2
    assert "sqltune.json" in r.stderr and "sqltune finetune" in r.stderr  # says what is missing and what to do


def test_a_missing_folder_and_a_changed_file_are_refused(tiny_model_dir, tmp_path):
    r = _serve("--model", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "does not exist" in r.stderr

    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed, ignore=shutil.ignore_patterns("checkpoints"))
    with (changed / "tokenizer.json").open("a") as fh:
        fh.write(" ")
    r = _serve("--model", str(changed))
    assert r.returncode == 2 and "tokenizer.json" in r.stderr


def test_a_model_that_cannot_load_fails_ready_and_exits_1(tiny_model_dir):
    server = ServerProcess(["--model", str(tiny_model_dir), "--serve-device", "cuda"], ready_timeout=120)
    with pytest.raises(RuntimeError, match="exited 1"):
        server.start()
    assert "could not be loaded" in server.log()


def _stream(server: ServerProcess, prompt: str, tokens: int, out: list[str]) -> None:
    body = {"prompt": prompt, "max_tokens": tokens, "min_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
    except httpx.HTTPError as e:
        out.append(f"client error: {type(e).__name__}")


def _first_event(events: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not events and time.monotonic() < deadline:
        time.sleep(0.01)
    assert events, "no event arrived"


def test_sigterm_finishes_in_flight_requests_then_exits(tiny_model_dir):
    prompt = load_template(tiny_model_dir).build_prompt("How many heads are older than 56?",
                                                        "CREATE TABLE head (age INTEGER)")
    with ServerProcess(["--model", str(tiny_model_dir), "--shutdown-grace", "30"]) as server:
        events: list[str] = []
        client = threading.Thread(target=_stream, args=(server, prompt, 300, events))
        client.start()
        _first_event(events)
        server.terminate()
        refused_at = None
        deadline = time.monotonic() + 10
        while refused_at is None and time.monotonic() < deadline:
            try:
                httpx.get(server.url + "/health", timeout=1)
            except httpx.ConnectError:
                refused_at = time.monotonic()
            time.sleep(0.05)
        assert refused_at is not None, "the server kept accepting new connections after SIGTERM"
        client.join(60)
        assert events[-1] == "[DONE]", events[-3:]
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 300  # the whole answer, not a cut one
        assert server.proc.wait(30) == 0
        assert "draining" in server.log()


def test_sigterm_cuts_what_is_still_running_after_the_grace_period(tiny_model_dir):
    prompt = load_template(tiny_model_dir).build_prompt("How many heads?", "CREATE TABLE head (age INTEGER)")
    with ServerProcess(["--model", str(tiny_model_dir), "--shutdown-grace", "0.5"]) as server:
        events: list[str] = []
        client = threading.Thread(target=_stream, args=(server, prompt, 950, events))
        client.start()
        _first_event(events)
        signalled = time.monotonic()
        server.terminate()
        server.proc.wait(20)
        exited = time.monotonic() - signalled
        client.join(30)
    assert exited < 10, f"took {exited:.1f}s to exit with a 0.5 s grace period"
    assert "[DONE]" not in events


def test_sigterm_with_grammar_builds_in_flight_exits_within_the_grace(tiny_model_dir):
    """schema+values requests whose grammar took minutes to build kept a SIGTERMed server alive at 100% CPU
    (the interpreter joined the build threads) and answered with a CancelledError traceback. Now every
    client gets JSON (its answer, a 400 or the shutdown 503) and the process is gone within the grace."""
    template = load_template(tiny_model_dir)
    schema = "CREATE TABLE head (age INTEGER, name VARCHAR)"
    huge = " ".join(f"word{i % 89} Carlton {i}" for i in range(2000))  # 6,000 words
    bodies = [("/v1/completions", {"prompt": template.build_prompt("How many heads?", schema), "max_tokens": 16,
                                   "constrain": "schema+values", "context": schema, "question": huge})] * 3
    bodies += [("/v1/sql", {"question": "How many heads are older than 56?", "context": schema,
                            "constrain": "schema+values", "max_tokens": 300})] * 3
    grace = 1.0
    with ServerProcess(["--model", str(tiny_model_dir), "--shutdown-grace", str(grace)]) as server:
        replies: list[httpx.Response | Exception] = []

        def call(path: str, body: dict) -> None:
            try:
                replies.append(httpx.post(server.url + path, json=body, timeout=90))
            except httpx.HTTPError as e:
                replies.append(e)

        clients = [threading.Thread(target=call, args=item) for item in bodies]
        for c in clients:
            c.start()
        time.sleep(0.5)
        signalled = time.monotonic()
        server.terminate()
        try:
            code = server.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 30 s after SIGTERM with a {grace:g} s grace")
        exited = time.monotonic() - signalled
        for c in clients:
            c.join(30)
        log = server.log()
    assert code == 0 and exited < grace + 8, f"exited {code} after {exited:.1f}s"
    assert "CancelledError" not in log and "Traceback" not in log, log[-3000:]
    answered = [r for r in replies if isinstance(r, httpx.Response)]
    assert answered, replies
    for r in answered:
        assert r.headers["content-type"].startswith("application/json"), r.text[:200]
        assert r.status_code in (200, 400, 503), r.text[:200]
        if r.status_code == 503:
            assert "--shutdown-grace" in r.json()["error"]["message"]


def test_work_left_after_the_grace_does_not_keep_the_process_alive():
    """The backstop behind the grace: a thread Python cannot interrupt (a C++ compile, a generation step)
    would be joined at exit for as long as it runs; the process exits at the grace's end instead."""
    code = ("import threading, time\n"
            "from sqltune.serve.cli import _exit_after\n"
            "threading.Thread(target=time.sleep, args=(120,)).start()  # not a daemon: exit waits for it\n"
            "_exit_after(0.5)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 20
    assert "work was still running after the shutdown grace" in done.stderr
