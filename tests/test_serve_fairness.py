"""One client cannot hold the whole engine: while one /v1/completions with n=8 (every row of the engine) and min_tokens=max_tokens
decodes, a second client's plain /v1/sql is answered before the flood ends (round-robin admission and
preemption, sqltune.engines.fair). Before, it waited for every row of the flood.

    pytest tests/test_serve_fairness.py
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from sqltune.prompts import load_template
from sqltune.serve.process import ServerProcess

SCHEMA = "CREATE TABLE head (age INTEGER, name VARCHAR)"


@pytest.mark.parametrize("engine", ["transformers", "llamacpp"])
def test_a_bystander_is_answered_while_a_flood_of_one_request_still_decodes(tiny_model_dir, engine: str) -> None:
    """transformers: round-robin admission and preemption; llama.cpp (no preemption): a request holds at most its
    share of the slots, so the bystander finds one free."""
    prompt = load_template(tiny_model_dir).build_prompt("How many heads?", SCHEMA)
    # as many rows as the engine has: without a share, every slot is the flood's until its rows end
    flood = {"prompt": prompt, "n": 8, "max_tokens": 900, "min_tokens": 900}
    finished: list[str] = []
    with ServerProcess(["--model", str(tiny_model_dir), "--max-batch-size", "8", "--request-timeout", "600",
                        "--engine", engine]) as server:
        def attack() -> None:
            r = httpx.post(server.url + "/v1/completions", json=flood, timeout=600)
            finished.append(f"flood {r.status_code}")

        attacker = threading.Thread(target=attack)
        attacker.start()
        deadline = time.monotonic() + 60
        while "sqltune_sequences_in_flight 8.0" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline, "the flood was never admitted"
            time.sleep(0.05)
        r = httpx.post(server.url + "/v1/sql", json={"question": "How many heads?", "context": SCHEMA,
                                                      "max_tokens": 24}, timeout=600)
        finished.append(f"bystander {r.status_code}")
        attacker.join(600)
    # the flood needs 8 x 900 tokens: the bystander's few tokens came first
    assert finished == ["bystander 200", "flood 200"], finished
