"""`sqltune eval` end to end: predictions files, endpoints (real HTTP servers on 127.0.0.1),
the report schema, shards and merge, --compare, errors, and a tiny trained model (slow)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sqltune import cli
from sqltune.data import loading
from sqltune.evaluate.cli import parse_shard
from sqltune.evaluate.report import METRICS

DATASET = "synthetic:60"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQLTUNE_NO_PROGRESS", "1")
    for name in ("CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_COUNT", "MODEL_NAME", "SQLTUNE_MODEL_NAME", "DATASET"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def examples() -> list[dict[str, str]]:
    return [dict(r) for r in loading.read_rows(DATASET, "train", 42)]


def _wrong(sql: str) -> str:
    return f"SELECT *, 1 FROM ({sql})"  # runs, but returns an extra column


@pytest.fixture
def preds_file(tmp_path: Path, examples: list[dict[str, str]]) -> Path:
    """Gold for two thirds of the examples, a wrong or broken query for the rest."""
    path = tmp_path / "preds.jsonl"
    with path.open("w") as fh:
        for i, ex in enumerate(examples):
            pred = ex["answer"] if i % 3 else ("SELEC nothing" if i % 2 else _wrong(ex["answer"]))
            fh.write(json.dumps({"question": ex["question"], "context": ex["context"], "predicted": pred}) + "\n")
    return path


def sqltune(*args: str) -> int:
    return cli.main(["eval", *args])


def check_report_schema(report: dict[str, Any]) -> None:
    """The shape other tools read: every metric with value, count and total."""
    for key in ("version", "created", "sqltune_version", "source", "dataset", "shard", "settings", "config",
                "results", "timing", "generation_errors"):
        assert key in report, key
    assert {"kind", "name", "fingerprint"} <= set(report["source"])
    assert {"source", "split", "examples", "fingerprint"} <= set(report["dataset"])
    res = report["results"]

    def is_rate(block: Any) -> bool:
        return set(block) == {"value", "count", "total"} and 0 <= block["value"] <= 1 and block["count"] <= block["total"]

    assert all(is_rate(res["metrics"][m]) for m in METRICS)
    for breakdown in (res["by_category"], res["by_source"]):
        assert breakdown and all(isinstance(row["n"], int) and is_rate(row["ex"]) for row in breakdown.values())
    gc = res["gold_check"]
    assert is_rate(gc["gold_ran"]) and is_rate(gc["gold_selects_nothing"]) and isinstance(gc["dataset_errors"], int)
    assert res["scored"] + gc["dataset_errors"] == res["examples"]
    assert report["config"].get("api_key") in ("", "***")
    json.dumps(report)


def read(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    report = json.loads((folder / "report.json").read_text())
    preds = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    return report, preds


def test_predictions_file_end_to_end(tmp_path: Path, preds_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rep"
    assert sqltune("--predictions", str(preds_file), "--dataset", DATASET, "--report-dir", str(out),
                   "--eval-workers", "1") == 0
    report, preds = read(out)
    check_report_schema(report)
    assert len(preds) == 60 and [p["index"] for p in preds] == list(range(60))
    ex = report["results"]["metrics"]["ex"]
    assert ex["total"] == 60 and ex["count"] == sum(p["ex"] for p in preds)
    assert ex["count"] == 40, "40 gold predictions of 60 are right; the 20 others are wrong or broken"
    assert all(p["ex"] for i, p in enumerate(preds) if i % 3)
    assert report["results"]["metrics"]["valid"]["count"] == 50
    assert report["results"]["metrics"]["executable"]["count"] == 50
    assert {"question", "gold", "predicted", "ex", "em_raw", "em_norm", "valid", "executable", "schema_ok",
            "error_kind", "error"} <= set(preds[0])
    assert (out / "ex_by_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "execution accuracy (EX)" in summary and summary in capsys.readouterr().out


def test_predictions_file_that_carries_its_gold(tmp_path: Path, examples: list[dict[str, str]]) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({**ex, "sql": ex["answer"]}) + "\n" for ex in examples[:10]))
    assert sqltune("--predictions", str(path), "--report-dir", str(tmp_path / "r"), "--eval-workers", "1") == 0
    assert read(tmp_path / "r")[0]["results"]["metrics"]["ex"]["value"] == 1.0


def test_self_check_scores_gold_against_itself(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"question": "q1", "context": "CREATE TABLE t (a INTEGER)", "answer": "SELECT a FROM t WHERE a > 1"},
            {"question": "q2", "context": "CREATE TABLE t (a INTEGER)", "answer": "SELECT b FROM t"},
            {"question": "q3", "context": "CREATE TABLE t (a INTEGER)", "answer": "SELECT COUNT(*) FROM t"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sqltune("--self-check", "--dataset", str(path), "--report-dir", str(tmp_path / "r"),
                   "--eval-workers", "1") == 0
    report, _ = read(tmp_path / "r")
    assert report["source"]["kind"] == "gold"
    assert report["results"]["metrics"]["ex"] == {"value": 1.0, "count": 2, "total": 2}
    gc = report["results"]["gold_check"]
    assert gc["dataset_errors"] == 1 and gc["dataset_errors_by_kind"] == {"runtime": 1}
    assert gc["dataset_error_examples"][0]["gold"] == "SELECT b FROM t"
    assert "no such column: b" in gc["dataset_error_examples"][0]["error"]


def test_shards_merge_to_the_unsharded_report(tmp_path: Path, preds_file: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    common = ["--predictions", str(preds_file), "--dataset", DATASET, "--eval-workers", "1"]
    assert sqltune(*common, "--report-dir", str(tmp_path / "whole")) == 0
    assert sqltune(*common, "--report-dir", str(tmp_path / "sharded"), "--shard", "0/3") == 0
    assert sqltune(*common, "--report-dir", str(tmp_path / "sharded"), "--shard", "2/3") == 0
    assert sqltune("merge", str(tmp_path / "sharded")) == 2  # shard 1 is missing: refused, not half-merged
    monkeypatch.setenv("CLOUD_RUN_TASK_INDEX", "1")
    monkeypatch.setenv("CLOUD_RUN_TASK_COUNT", "3")
    assert sqltune(*common, "--report-dir", str(tmp_path / "sharded")) == 0
    assert (tmp_path / "sharded" / "shard-00001-of-00003" / "report.json").is_file()
    assert sqltune("merge", str(tmp_path / "sharded")) == 0
    whole, whole_preds = read(tmp_path / "whole")
    merged, merged_preds = read(tmp_path / "sharded")
    assert merged["results"] == whole["results"]
    assert [p["index"] for p in merged_preds] == list(range(60))
    assert merged["shard"]["merged_from"] == 3


def test_parse_shard() -> None:
    assert parse_shard("", {}) == (0, 1)
    assert parse_shard("2/8", {}) == (2, 8)
    assert parse_shard("", {"CLOUD_RUN_TASK_INDEX": "3", "CLOUD_RUN_TASK_COUNT": "4"}) == (3, 4)
    assert parse_shard("0/2", {"CLOUD_RUN_TASK_INDEX": "3", "CLOUD_RUN_TASK_COUNT": "4"}) == (0, 2)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(Exception, match="i/n"):
            parse_shard(bad, {})


def test_compare_prints_both_and_the_disagreements(tmp_path: Path, preds_file: Path, examples: list[dict[str, str]],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({**ex, "predicted": ex["answer"]}) + "\n" for ex in examples))
    for name, path in (("a", preds_file), ("b", gold)):
        assert sqltune("--predictions", str(path), "--dataset", DATASET, "--report-dir", str(tmp_path / name),
                       "--eval-workers", "1") == 0
    capsys.readouterr()
    assert sqltune("--compare", str(tmp_path / "a"), str(tmp_path / "b" / "report.json")) == 0
    out = capsys.readouterr().out
    assert "preds" in out and "gold" in out and "execution accuracy (EX)" in out
    m = re.search(r"Disagreements: (\d+) of 60", out)
    assert m and int(m.group(1)) >= 15


def test_clear_errors(tmp_path: Path, preds_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert sqltune("--dataset", DATASET) == 2
    assert "pass --model DIR, --endpoint URL or --predictions FILE" in capsys.readouterr().err
    assert sqltune("--predictions", str(preds_file), "--dataset", "synthetic:80", "--eval-workers", "1",
                   "--report-dir", str(tmp_path / "x")) == 2
    assert "have no prediction" in capsys.readouterr().err
    assert sqltune("--predictions", str(tmp_path / "nope.jsonl"), "--dataset", DATASET) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sqltune("--compare", str(tmp_path / "missing"), str(tmp_path / "missing2")) == 2
    assert "no report.json" in capsys.readouterr().err


# --- endpoints: real HTTP servers on 127.0.0.1 -------------------------------------------------

@pytest.fixture
def http_server() -> Iterator[Callable[[Callable[[str, str, dict[str, Any]], tuple[int, dict[str, Any]]]], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(route: Callable[[str, str, dict[str, Any]], tuple[int, dict[str, Any]]]) -> str:
        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                status, payload = route(method, self.path, body)
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self) -> None:  # noqa: N802
                self._answer("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._answer("POST")

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_endpoint_sql_route_with_retries(tmp_path: Path, examples: list[dict[str, str]], http_server: Any) -> None:
    gold = {(ex["question"], ex["context"]): ex["answer"] for ex in examples}
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def route(method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if path != "/v1/sql":
            return 404, {}
        with lock:
            seen[body["question"]] = seen.get(body["question"], 0) + 1
            first = seen[body["question"]] == 1
        if first and len(seen) % 4 == 0:
            return 503, {"error": "busy"}  # every fourth question fails once, then succeeds
        return 200, {"sql": gold[(body["question"], body["context"])], "model": "stand-in"}

    url = http_server(route)
    assert sqltune("--endpoint", url, "--dataset", DATASET, "--report-dir", str(tmp_path / "r"),
                   "--eval-concurrency", "4", "--eval-workers", "1") == 0
    report, preds = read(tmp_path / "r")
    check_report_schema(report)
    assert report["source"]["route"] == "sql" and report["source"]["model"] == "stand-in"
    assert report["results"]["metrics"]["ex"]["value"] == 1.0 and report["generation_errors"] == 0
    assert any(n == 2 for n in seen.values()), "some requests were retried"


def test_endpoint_openai_completions_fallback(tmp_path: Path, examples: list[dict[str, str]], http_server: Any) -> None:
    gold = {(ex["question"], ex["context"]): ex["answer"] for ex in examples}
    prompts: list[str] = []
    parse = re.compile(r"Question: (.*)\nContext: (.*)\nAnswer:$")

    def route(method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "some-model", "object": "model"}]}
        if path == "/v1/completions":
            prompts.append(body["prompt"])
            question, context = parse.match(body["prompt"]).groups()
            return 200, {"choices": [{"text": f" {gold[(question, context)]}\n\nQuestion: next", "index": 0}]}
        return 404, {"detail": "Not Found"}

    url = http_server(route)
    assert sqltune("--endpoint", url, "--dataset", DATASET, "--limit", "12", "--report-dir", str(tmp_path / "r"),
                   "--eval-workers", "1") == 0
    report, _ = read(tmp_path / "r")
    assert report["source"]["route"] == "completions" and report["source"]["model"] == "some-model"
    assert report["results"]["metrics"]["ex"] == {"value": 1.0, "count": 12, "total": 12}
    assert all(p.endswith("\nAnswer:") for p in prompts), "the default template, ending at Answer:"


def test_endpoint_failures(tmp_path: Path, http_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    def flaky(method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if path == "/v1/sql" and "How many" in body["question"]:
            return 500, {"error": "boom"}
        return (200, {"sql": "SELECT 1"}) if path == "/v1/sql" else (404, {})

    def locked(method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return 401, {"error": "bad key"}

    flaky_url, locked_url = http_server(flaky), http_server(locked)
    assert sqltune("--endpoint", flaky_url, "--dataset", DATASET, "--eval-retries", "1", "--eval-workers", "1",
                   "--report-dir", str(tmp_path / "f")) == 0
    report, preds = read(tmp_path / "f")
    failed = [p for p in preds if p["generation_error"]]
    assert failed and report["generation_errors"] == len(failed)
    assert all("failed 2 times" in p["generation_error"] and p["predicted"] == "" for p in failed)
    assert sqltune("--endpoint", locked_url, "--dataset", DATASET, "--report-dir", str(tmp_path / "l")) == 2
    assert "API_KEY" in capsys.readouterr().err


# --- a tiny trained model ------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_model_end_to_end(tmp_path: Path, tiny_model_dir: Path) -> None:
    from sqltune.artifacts import manifests

    out = tmp_path / "r"
    assert sqltune("--model", str(tiny_model_dir), "--dataset", "synthetic:1500", "--split", "eval", "--limit", "24",
                   "--report-dir", str(out), "--eval-batch-size", "8", "--eval-workers", "1") == 0
    report, preds = read(out)
    check_report_schema(report)
    assert report["source"]["kind"] == "model"
    assert report["source"]["fingerprint"] == manifests.read_manifest(tiny_model_dir)["digest"]
    assert report["source"]["prompt_template"]["prompt"].endswith("Answer:")
    assert len(preds) == report["results"]["examples"] == 24
    assert all(p["raw_output"].strip() for p in preds), "the model generated text for every question"
    assert report["results"]["metrics"]["ex"]["count"] == sum(p["ex"] for p in preds)
    # its predictions.jsonl is a predictions file: re-scoring it gives the same numbers
    assert sqltune("--predictions", str(out / "predictions.jsonl"), "--report-dir", str(tmp_path / "again"),
                   "--eval-workers", "1") == 0
    assert read(tmp_path / "again")[0]["results"]["metrics"] == report["results"]["metrics"]


@pytest.mark.slow
def test_endpoint_against_sqltune_serve(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The real server with the tiny model: eval finds its /v1/sql route and scores what it answers."""
    from sqltune.serve.process import ServerProcess

    with ServerProcess(["--model", str(tiny_model_dir), "--engine", "transformers"],
                       env={"OMP_NUM_THREADS": "1"}) as server:
        assert sqltune("--endpoint", server.url, "--dataset", "synthetic:1500", "--split", "eval",
                       "--eval-fraction", "0.05", "--limit", "8", "--report-dir", str(tmp_path / "r"),
                       "--eval-concurrency", "4", "--eval-workers", "1") == 0
    report, preds = read(tmp_path / "r")
    check_report_schema(report)
    assert report["source"]["route"] == "sql" and report["generation_errors"] == 0
    assert all(p["predicted"] for p in preds), "the server answered every question"
