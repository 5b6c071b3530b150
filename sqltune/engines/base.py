"""The engine contract: one async token stream per request, whatever generates it.

The app tokenizes once (to check the context length) and hands the engine token ids; the engine
yields `Delta`s until one carries a finish reason. Closing the stream early (client gone, timeout)
cancels the request inside the engine, so no tokens are spent on nobody. Batch callers (eval, ask,
the job's held-out check) drive the same stream through `sqltune.engines.batch`.

`logprob` is the cumulative log-probability of the generated tokens (the sum of each chosen token's
log-softmax under the model's raw logits, before temperature, top-p or a grammar mask: vLLM's
default `raw_logprobs`), the EOS or stop-completing token included, so candidates for one question
can be ranked by likelihood. A backend that cannot report it sets NaN.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from sqltune.config import Config
from sqltune.prompts import PromptTemplate

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0  # no EOS and no stop string before this many tokens (vLLM's min_tokens)
    grammar: str = ""  # xgrammar EBNF the completion must follow (sqltune.constrain); "" = free


@dataclass(frozen=True)
class Delta:
    """New text since the previous delta; the last one of a stream has `finish_reason` set."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    error: str = ""  # set with finish_reason "error": why the engine failed this request
    logprob: float = 0.0  # cumulative over the tokens generated so far (see the module docstring)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    error: str = ""
    deltas: list[str] = field(default_factory=list, repr=False)
    logprob: float = 0.0  # of the whole completion (see the module docstring); NaN when the backend cannot say


@runtime_checkable
class Engine(Protocol):
    """What the app needs from a generation backend."""

    name: str
    model_id: str
    template: PromptTemplate
    capacity: int  # sequences it generates at once; the app queues beyond this

    @property
    def max_model_len(self) -> int: ...

    @property
    def eos_token(self) -> str | None: ...

    async def start(self, on_batch: Callable[[int], None] | None = None) -> None:
        """Load weights (may take minutes); `on_batch(size)` is told each batch size it runs."""

    async def close(self) -> None: ...

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt exactly as they will be fed to the model."""

    def prepare_grammar(self, grammar: str) -> None:
        """Compile (or check) a grammar before a request uses it, off the event loop; raises
        sqltune.constrain.GrammarError when it cannot be used, so the caller can fall back."""

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams, deltas: bool = True) -> AsyncIterator[Delta]:
        """Deltas as tokens come; with deltas=False only the final one, carrying the whole text
        (non-streaming callers: no per-token work in the event loop)."""


async def complete(engine: Engine, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
    """Drain one stream into a Completion."""
    parts: list[str] = []
    async for delta in engine.stream(prompt_ids, params, deltas=False):
        parts.append(delta.text)
        if delta.finish_reason:
            return Completion("".join(parts), delta.prompt_tokens, delta.completion_tokens,
                              delta.finish_reason, delta.error, parts, delta.logprob)
    return Completion("".join(parts), len(prompt_ids), 0, "abort", "engine ended the stream early", parts)


class EngineBase:
    """What both engines set up the same way from a resolved model folder: the served id, the template,
    the batch capacity and the context length (the model's own, lowered by --max-model-len)."""

    def __init__(self, cfg: Config, model_dir: Path, template: PromptTemplate, meta: dict) -> None:
        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self.template = template
        self.model_id = model_id_for(cfg, self.model_dir, meta)
        self.capacity = cfg.max_batch_size
        self._own_len = model_context_length(self.model_dir)

    @property
    def max_model_len(self) -> int:
        return min(self.cfg.max_model_len or self._own_len, self._own_len)


def model_id_for(cfg: Config, model_dir: Path, meta: dict) -> str:
    if cfg.served_model_name:
        return cfg.served_model_name
    return str((meta.get("config") or {}).get("new_model") or model_dir.name)


def model_context_length(model_dir: Path) -> int:
    """The context length a model folder's config.json declares (2048 when it says nothing)."""
    try:
        data = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 2048
    text = data.get("text_config") or {}
    return int(data.get("max_position_embeddings") or text.get("max_position_embeddings") or 2048)
