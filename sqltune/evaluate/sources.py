"""Where `sqltune eval` gets predicted SQL: a local model, a running server, or a file.

A local model generates in greedy batches (sorted by prompt length, so little padding) with the
prompt template stored in its artifact. A server is asked through its text-to-SQL route
(`POST /v1/sql`) when it has one, else through OpenAI `/v1/completions` with the default
template; requests run with bounded concurrency and retry on 5xx, 429 and dropped connections.
A predictions file is matched to the examples by question and context, else by line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqltune import logs, prompts
from sqltune.data.loading import Example
from sqltune.errors import ConfigError, DataError, SqltuneError

log = logs.get("eval")
PRED_KEYS = ("predicted", "prediction", "sql", "pred")
Progress = Callable[[int], None]


class EndpointError(SqltuneError):
    """The server under evaluation refused a request or is not a server it can talk to."""


class RetriesExhausted(EndpointError):
    """A request kept failing (5xx, 429, dropped connection) after every retry."""


@dataclass(frozen=True)
class Prediction:
    sql: str
    raw: str = ""
    error: str = ""  # a generation failure (the request kept failing); the SQL is then empty
    constrained: bool = False  # decoded under the schema's grammar (--constrain)
    reason: str = ""  # why not, when --constrain asked for it


def from_model(model: str, pairs: Sequence[tuple[str, str]], *, batch_size: int, max_new_tokens: int,
               progress: Progress, constrain: str = "off") -> tuple[list[Prediction], dict[str, Any]]:
    """Greedy SQL from a local (or bucket) model with the template stored in its artifact."""
    from sqltune import constrain as cons
    from sqltune import generation
    from sqltune.artifacts import manifests

    loaded = generation.load(model)
    texts = [loaded.template.build_prompt(q, c) for q, c in pairs]
    constraints = [cons.build(constrain, q, c) for q, c in pairs]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[Prediction | None] = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        grammars = [constraints[i].grammar for i in idx]
        done = generation.generate(loaded, [texts[i] for i in idx], max_new_tokens, grammars=grammars)
        for i, c in zip(idx, done, strict=True):
            out[i] = Prediction(prompts.extract_sql(c.text, loaded.tokenizer.eos_token, loaded.template), c.text,
                                constrained=c.constrained, reason=constraints[i].reason)
        progress(len(idx))
    manifest = manifests.read_manifest(loaded.path)
    meta = loaded.meta or {}
    info = {"kind": "model", "model": model, "path": str(loaded.path), "fingerprint": manifest.get("digest", ""),
            "name": meta.get("config", {}).get("new_model") or Path(str(model).rstrip("/")).name,
            "prompt_template": loaded.template.to_dict(), "device": str(loaded.device), "constrain": constrain}
    if constrain != "off":
        info["grammars"] = loaded.compiler.stats()
    return [p for p in out if p is not None], info


class Endpoint:
    """A server under evaluation; `route` is "sql" or "completions" once detected."""

    def __init__(self, url: str, *, concurrency: int, retries: int, timeout: float, max_new_tokens: int,
                 constrain: str = "") -> None:
        import httpx

        self.url = url.rstrip("/")
        self.retries = retries
        self.max_new_tokens = max_new_tokens
        self.concurrency = concurrency
        key = os.environ.get("SQLTUNE_API_KEY") or os.environ.get("API_KEY") or ""
        self.client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {},
                                   limits=httpx.Limits(max_connections=concurrency))
        self.route = ""
        self.model_id = ""
        self.constrain = constrain
        # only sent when asked for ("" = not at all; "off" is sent to override a server's --constrain),
        # so servers that know no `constrain` field see the requests they always did
        self.extra: dict[str, Any] = {"constrain": constrain} if constrain else {}

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                resp = self.client.request(method, self.url + path, json=body)
            except httpx.TransportError as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code < 400 or resp.status_code in (404, 405):
                    return resp
                if resp.status_code in (401, 403):
                    raise EndpointError(f"{self.url}{path} answered {resp.status_code}: {resp.text[:200]}",
                                        "set SQLTUNE_API_KEY (or API_KEY) to the server's key")
                if resp.status_code < 500 and resp.status_code != 429:
                    raise EndpointError(f"{self.url}{path} answered {resp.status_code}: {resp.text[:300]}",
                                        "check that the endpoint is a sqltune or OpenAI-compatible server")
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                retry_after = resp.headers.get("retry-after", "")
                delay = max(delay, float(retry_after)) if retry_after.replace(".", "", 1).isdigit() else delay
            if attempt < self.retries:
                logs.event(log, "request failed; retrying", path=path, attempt=attempt + 1, error=error)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise RetriesExhausted(f"{self.url}{path} failed {self.retries + 1} times: {error}",
                            "check the server's logs, or raise --eval-retries")

    def detect(self, question: str, context: str) -> None:
        """Use the server's text-to-SQL route when it has one, else OpenAI completions."""
        resp = self._request("POST", "/v1/sql", {"question": question, "context": context,
                                                 "max_tokens": self.max_new_tokens})
        if resp.status_code < 400:
            self.route = "sql"
            self.model_id = resp.json().get("model", "")
            return
        models = self._request("GET", "/v1/models")
        data = models.json().get("data", []) if models.status_code < 400 else []
        self.model_id = data[0]["id"] if data else "default"
        # the served model's own template (sqltune servers publish it), else the default one
        stored = data[0].get("prompt_template") if data else None
        self.template = prompts.PromptTemplate.from_dict(stored) if stored else prompts.DEFAULT_TEMPLATE
        self.route = "completions"

    def one(self, question: str, context: str) -> Prediction:
        try:
            if self.route == "sql":
                body = self._request("POST", "/v1/sql", {"question": question, "context": context,
                                                         "max_tokens": self.max_new_tokens, **self.extra}).json()
                return Prediction(body.get("sql", ""), body.get("sql", ""), constrained=bool(body.get("constrained")),
                                  reason=body.get("reason") or "")
            prompt = self.template.build_prompt(question, context)
            resp = self._request("POST", "/v1/completions", {
                "model": self.model_id, "prompt": prompt, "max_tokens": self.max_new_tokens, "temperature": 0.0,
                "stop": list(self.template.stops),
                **({**self.extra, "context": context, "question": question} if self.extra else {})})
            if resp.status_code >= 400:
                raise EndpointError(f"{self.url} has neither /v1/sql nor /v1/completions ({resp.status_code})",
                                    "point --endpoint at a sqltune or OpenAI-compatible server")
            answer = resp.json()
            text = answer["choices"][0]["text"]
            return Prediction(prompts.extract_sql(text, template=self.template), text,
                              constrained=bool(answer.get("constrained")), reason=answer.get("reason") or "")
        except RetriesExhausted as e:  # one failing example is recorded, not fatal to the run
            return Prediction("", "", e.message)

    def run(self, pairs: Sequence[tuple[str, str]], progress: Progress) -> list[Prediction]:
        if not pairs:
            return []
        self.detect(*pairs[0])
        logs.event(log, "endpoint route chosen", url=self.url, route=self.route, model=self.model_id)

        def task(pair: tuple[str, str]) -> Prediction:
            result = self.one(*pair)
            progress(1)
            return result

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(task, pairs))

    def info(self) -> dict[str, Any]:
        return {"kind": "endpoint", "url": self.url, "route": self.route, "model": self.model_id,
                "constrain": self.constrain or "server default",
                "name": self.model_id or self.url.split("://")[-1], "fingerprint": f"{self.url}#{self.model_id}"}

    def close(self) -> None:
        self.client.close()


def from_endpoint(url: str, pairs: Sequence[tuple[str, str]], *, concurrency: int, retries: int, timeout: float,
                  max_new_tokens: int, progress: Progress, constrain: str = ""
                  ) -> tuple[list[Prediction], dict[str, Any]]:
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise ConfigError("--endpoint needs httpx, which is not installed", "pip install 'sqltune[serve]'") from None
    endpoint = Endpoint(url, concurrency=concurrency, retries=retries, timeout=timeout, max_new_tokens=max_new_tokens,
                        constrain=constrain)
    try:
        return endpoint.run(pairs, progress), endpoint.info()
    finally:
        endpoint.close()


def read_predictions(path: str) -> list[dict[str, Any]]:
    """Rows of a predictions file, each with its SQL under `predicted`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"predictions file {p} does not exist", "pass --predictions with a JSON-lines file")
    rows = []
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line_no = p.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{p} line {line_no} is not UTF-8 text ({e.reason} at byte {e.start})",
                        "write the predictions file as UTF-8 JSON lines") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p} line {n} is not JSON: {e}", "write one JSON object per line") from None
        key = next((k for k in PRED_KEYS if isinstance(row, dict) and k in row), None)
        if key is None:
            raise DataError(f"{p} line {n} has no predicted SQL", f"give each line one of: {', '.join(PRED_KEYS)}")
        rows.append({**row, "predicted": str(row[key] or "")})
    return rows


def match_predictions(rows: list[dict[str, Any]], examples: Sequence[Example], path: str) -> list[Prediction]:
    """One prediction per example: by (question, context) when the file has them, else by line."""
    if rows and all("question" in r and "context" in r for r in rows):
        by_key = {(str(r["question"]).strip(), str(r["context"]).strip()): r["predicted"] for r in rows}
        missing = [ex for ex in examples if (ex.question, ex.context) not in by_key]
        if missing:
            raise DataError(f"{len(missing)} of {len(examples)} examples have no prediction in {path} "
                            f"(first: {missing[0].question!r})",
                            "predict every example of the dataset and split, or pass the matching --dataset")
        return [Prediction(by_key[(ex.question, ex.context)]) for ex in examples]
    if len(rows) != len(examples):
        raise DataError(f"{path} has {len(rows)} predictions for {len(examples)} examples and no question/context "
                        "fields to match them", "add question and context to each line, or one line per example")
    return [Prediction(r["predicted"]) for r in rows]


def examples_from_predictions(rows: list[dict[str, Any]], path: str) -> list[Example]:
    """Examples carried by the predictions file itself (question, context and gold/answer per line)."""
    out = []
    for n, r in enumerate(rows, 1):
        gold = r.get("gold", r.get("answer"))
        if not (r.get("question") and r.get("context") and gold):
            raise DataError(f"{path} line {n} lacks question, context or gold", "pass --dataset with the gold answers")
        out.append(Example(str(r["question"]).strip(), str(r["context"]).strip(), str(gold).strip()))
    return out
