"""Request and response models of every route, in the shapes existing clients already speak:
OpenAI's completions and chat completions, vLLM's demo /generate, Vertex AI's /predict, and
sqltune's own /v1/sql. Unknown fields are ignored (clients send extras such as `user`); a field of
the wrong type is a 400 naming the field. A parameter of OpenAI's API (or vLLM's extensions) that
sqltune does not implement is a 400 naming it too, unless it holds its no-op value (`best_of: 1`,
`tools: []`, `response_format: {"type": "text"}`): answering 200 while ignoring `tools` or
`response_format: json_object` hands the client text it did not ask for. JSON output is refused
rather than honoured because the only grammar sqltune decodes under is SQL's (`constrain`).

Everything a request could use to hurt the batch it shares is refused here, before any work:
integers are strict (`max_tokens: true` is not 1), a temperature between 0 and 0.01 (its logits
overflow to inf) and a seed outside torch's 0 <= seed < 2**63 are 400s, and text with a lone UTF-16
surrogate ("\ud800", legal in JSON, not encodable as UTF-8) is a 400 wherever it appears."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from sqltune.sql.vote import MAX_CANDIDATES

MAX_N = 16
MAX_STOP = 8
MAX_STOP_CHARS = 256  # each stop string is matched against the text after every token
MIN_TEMPERATURE = 0.01  # below it (but above 0), logits / temperature overflow to inf and sampling fails
MAX_SEED = 2**63  # torch.Generator.manual_seed takes 0 <= seed < 2**63

Int = Annotated[int, Field(strict=True)]  # JSON true is not 1, 2.0 and "2" are not 2
Real = Annotated[float, Field(strict=True)]  # an int is a float, a bool is not


def surrogate_path(value: Any) -> str | None:
    """Where in a JSON value the first string holding a lone surrogate is ("prompt[1]"), or None.
    Iterative: a deeply nested body must not turn into a RecursionError here."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in item.items())
            stack.extend((f"{path}.<key>" if path else "<key>", k) for k in item if isinstance(k, str))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        where = surrogate_path(data)
        if where is not None:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate (such as \\ud800), which is not text: "
                             "send valid Unicode")
        return data


# Parameters sqltune does not implement, each with the values that ask for nothing (accepted as no-ops). One
# table for every route: a request checks the ones it declares (Sampling's, CompletionRequest's `suffix`,
# ChatCompletionRequest's tools and formats), so a parameter of another route is still ignored as unknown.
_OFF: tuple[Any, ...] = (None,)
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    # sampling, every generating route
    "best_of": (*_OFF, 1), "frequency_penalty": (*_OFF, 0), "presence_penalty": (*_OFF, 0),
    "logit_bias": (*_OFF, {}), "use_beam_search": (*_OFF, False), "top_k": (*_OFF, 0, -1), "min_p": (*_OFF, 0),
    "repetition_penalty": (*_OFF, 1), "length_penalty": (*_OFF, 1), "stop_token_ids": (*_OFF, []),
    "bad_words": (*_OFF, []), "ignore_eos": (*_OFF, False), "prompt_logprobs": _OFF, "logits_processors": _OFF,
    "guided_json": _OFF, "guided_regex": _OFF, "guided_choice": _OFF, "guided_grammar": _OFF,
    "structured_outputs": _OFF, "truncate_prompt_tokens": _OFF,
    # completions
    "suffix": (*_OFF, ""),
    # chat completions
    "tools": (*_OFF, []), "tool_choice": (*_OFF, "none"), "functions": (*_OFF, []), "function_call": (*_OFF, "none"),
    "response_format": (*_OFF, {"type": "text"}), "top_logprobs": (*_OFF, 0), "audio": _OFF,
    "modalities": (*_OFF, ["text"]), "prediction": _OFF, "web_search_options": _OFF, "reasoning_effort": _OFF,
}
_WHY = {
    "response_format": "sqltune decodes under SQL's grammar only (see `constrain`), so it cannot promise JSON",
    "tools": "sqltune writes SQL and never calls tools", "tool_choice": "sqltune writes SQL and never calls tools",
    "functions": "sqltune writes SQL and never calls functions",
    "function_call": "sqltune writes SQL and never calls functions",
}


def _refuse_unsupported(value: Any, info: ValidationInfo) -> Any:
    allowed = UNSUPPORTED[info.field_name or ""]
    # True == 1 in Python, but `best_of: true` is not `best_of: 1`
    if any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in allowed):
        return value
    why = _WHY.get(info.field_name or "", "sqltune does not implement it")
    shown = " or ".join(json.dumps(v) for v in allowed)
    raise PydanticCustomError("unsupported", "{why}; leave it out or send {shown}", {"why": why, "shown": shown})


class Sampling(_Request):
    """Sampling fields shared by every generating route."""

    max_tokens: Int | None = Field(None, ge=1)
    temperature: Real = Field(0.0, ge=0.0, le=2.0, description=f"0 (greedy) or {MIN_TEMPERATURE} to 2")
    top_p: Real = Field(1.0, gt=0.0, le=1.0)
    n: Int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=0, lt=MAX_SEED)
    min_tokens: Int = Field(0, ge=0)  # vLLM's extension: no EOS or stop string before this many tokens
    # not implemented: a 400 naming the field unless it is left out or holds its no-op value
    best_of: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    use_beam_search: Any = None
    top_k: Any = None
    min_p: Any = None
    repetition_penalty: Any = None
    length_penalty: Any = None
    stop_token_ids: Any = None
    bad_words: Any = None
    ignore_eos: Any = None
    prompt_logprobs: Any = None
    logits_processors: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    truncate_prompt_tokens: Any = None

    # the fields of UNSUPPORTED this model or a subclass declares (check_fields=False: not all are Sampling's)
    @field_validator(*UNSUPPORTED, mode="before", check_fields=False)
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_unsupported(value, info)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature {value:g} is too small to sample with: use 0 for greedy decoding "
                             f"or at least {MIN_TEMPERATURE}")
        return value

    @model_validator(mode="after")
    def _stop_list(self) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop has {len(stops)} strings; at most {MAX_STOP} are allowed")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string is longer than {MAX_STOP_CHARS} characters")
        self.stop = [s for s in stops if s]
        return self

    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class StreamOptions(_Request):
    include_usage: bool = False


class Constrained(_Request):
    """sqltune's extension of the OpenAI routes (`extra_body` in the openai client): decode under the
    grammar of `context` (CREATE TABLE statements; chat requests default to their system messages),
    literals from `question` with schema+values (chat: the last user message)."""

    constrain: ConstrainMode | None = None
    context: str | None = None
    question: str | None = None


class CompletionRequest(Sampling, Constrained):
    model: str | None = None
    prompt: str | list[str]
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: Int | None = None
    suffix: Any = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(Sampling, Constrained):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    top_logprobs: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None

    @model_validator(mode="after")
    def _max_completion(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


class GenerateRequest(Sampling):
    """vLLM's demo server: `{"prompt": ..., "stream": ..., **sampling}` -> `{"text": [prompt + output]}`."""

    prompt: str
    stream: bool = False


ConstrainMode = Literal["off", "schema", "schema+values"]


class SqlRequest(_Request):
    model: str | None = None
    question: str = Field(min_length=1)
    context: str | None = None
    schema_: list[str] | None = Field(None, alias="schema")
    max_tokens: Int | None = Field(None, ge=1)
    constrain: ConstrainMode | None = None  # None = the server's --constrain
    # answers generated and run on a database synthesised from the schema; None = the server's --candidates
    candidates: Int | None = Field(None, ge=1, le=MAX_CANDIDATES)

    @model_validator(mode="after")
    def _has_schema(self) -> SqlRequest:
        if not (self.context or "").strip() and not self.schema_:
            raise ValueError("give `context` (CREATE TABLE statements) or `schema` (a list of them)")
        return self

    def ddl(self) -> str:
        parts = [self.context or ""] + [s.strip().rstrip(";") for s in self.schema_ or []]
        return "; ".join(p.strip().rstrip(";") for p in parts if p.strip())


class SqlResponse(BaseModel):
    sql: str
    valid: bool
    tables: list[str]
    columns: list[str]
    error: str | None
    model: str
    finish_reason: str
    usage: Usage
    constrain: str = "off"  # the mode asked for
    constrained: bool = False  # whether decoding followed the schema's grammar
    reason: str | None = None  # why not, when a mode was asked for but the grammar could not be used
    candidates: int = 1  # answers generated; above 1 each ran and the one most of them agree with is `sql`
    candidates_ran: int | None = None  # of those, how many passed the check and ran (None: one answer, not run)
    candidates_agreed: int | None = None  # how many returned the result of the chosen one (0: none ran)
    extra_tokens: int = 0  # tokens past max_tokens that closing a constrained query took (sqltune.constrain)
    model_sql: str | None = None  # the model's own SQL, when `sql` is it with its joins completed (sqltune.sql.joins)


class PredictRequest(_Request):
    """Vertex AI custom containers: each instance is a prompt (string or {"prompt": ...}) or a
    question with its schema ({"question", "context"|"schema"}); `parameters` applies to all."""

    instances: list[str | dict[str, Any]] = Field(min_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, prompt: int, completion: int) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.total_tokens = self.prompt_tokens + self.completion_tokens


SqlResponse.model_rebuild()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "sqltune"
    max_model_len: int | None = None
    # sqltune's extension: the template the model was trained with, so clients build the same prompt
    prompt_template: dict[str, str] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which the openai client turns into typed exceptions."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
