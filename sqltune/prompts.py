"""The one prompt template. Training, serving and evaluation all build text here, and every
artifact carries the template it was trained with (in sqltune.json), so they cannot drift apart.

The prompt ends with `Answer:` and no trailing space; the completion starts with a space, then
the SQL, then EOS. Loss is taken on the completion only, so the model learns where SQL stops.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqltune.errors import ArtifactError


@dataclass(frozen=True)
class PromptTemplate:
    name: str = "question-context-answer"
    prompt: str = "Question: {question}\nContext: {context}\nAnswer:"
    completion: str = " {answer}"

    def build_prompt(self, question: str, context: str) -> str:
        return self.prompt.format(question=question.strip(), context=context.strip())

    def build_completion(self, answer: str) -> str:
        return self.completion.format(answer=answer.strip())

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptTemplate:
        return cls(**{k: data[k] for k in ("name", "prompt", "completion") if k in data})


DEFAULT_TEMPLATE = PromptTemplate()


def build_prompt(question: str, context: str, template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    return template.build_prompt(question, context)


_STOP_AT = re.compile(r"\n\s*(Question|Context|Answer):|\n\n")


def extract_sql(text: str, eos_token: str | None = None) -> str:
    """The SQL in a raw completion: cut at EOS, at a new prompt section, or after the first
    complete statement (a `;` outside quotes)."""
    if eos_token and eos_token in text:
        text = text.split(eos_token, 1)[0]
    match = _STOP_AT.search(text)
    if match:
        text = text[: match.start()]
    quote: str | None = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"`":
            quote = ch
        elif ch == ";":
            text = text[:i]
            break
    return " ".join(text.split())


TEMPLATE_KEY = "prompt_template"


def load_template(model_dir: str | Path) -> PromptTemplate:
    """The template stored in a model folder's sqltune.json; a folder without one is refused."""
    meta = Path(model_dir) / "sqltune.json"
    if not meta.is_file():
        raise ArtifactError(
            f"{model_dir} has no sqltune.json, so the prompt template it was trained with is unknown",
            "point at a folder written by `sqltune finetune`, or re-export it with `sqltune finetune`",
        )
    data = json.loads(meta.read_text())
    if TEMPLATE_KEY not in data:
        raise ArtifactError(f"{meta} has no `{TEMPLATE_KEY}` entry", "re-export the model with `sqltune finetune`")
    return PromptTemplate.from_dict(data[TEMPLATE_KEY])
