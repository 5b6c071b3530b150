"""The one prompt template. Training, serving and evaluation all build text here, and every
artifact carries the template it was trained with (in sqltune.json), so they cannot drift apart.

The prompt ends with `Answer:` and no trailing space; the completion starts with a space, then
the SQL, then EOS. Loss is taken on the completion only, so the model learns where SQL stops.

The template also owns what follows from it: the stop strings that end an answer (a new section
label of its own, or a blank line) and the token ids of a prompt (`encode_prompt`), which training
and every inference path share, so a tokenizer that adds `<bos>` gets it everywhere or nowhere.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqltune.errors import ArtifactError

_LABEL = re.compile(r"(?:^|\n)([A-Z][A-Za-z ]*:)")


@dataclass(frozen=True)
class PromptTemplate:
    name: str = "question-context-answer"
    prompt: str = "Question: {question}\nContext: {context}\nAnswer:"
    completion: str = " {answer}"

    def build_prompt(self, question: str, context: str) -> str:
        return self.prompt.format(question=question.strip(), context=context.strip())

    def build_completion(self, answer: str) -> str:
        return self.completion.format(answer=answer.strip())

    @property
    def stops(self) -> tuple[str, ...]:
        """Where an answer ends when the model runs on: a blank line, or a line that starts one of the
        template's own section labels (`Question:` ...), derived from the template text itself."""
        labels = dict.fromkeys(m.group(1) for m in _LABEL.finditer(self.prompt))
        return ("\n\n", *(f"\n{label}" for label in labels))

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptTemplate:
        return cls(**{k: data[k] for k in ("name", "prompt", "completion") if k in data})


DEFAULT_TEMPLATE = PromptTemplate()
# the schema before the question: the questions on one database share their prompt's first tokens, which training
# can then compute once for several of them (`shared_context_rows`)
SCHEMA_FIRST_TEMPLATE = PromptTemplate(name="context-question-answer",
                                       prompt="Context: {context}\nQuestion: {question}\nAnswer:")


def template_for(style: str, tokenizer: Any) -> tuple[PromptTemplate, str]:
    """The template of a `prompt_style` for this tokenizer, and the style it resolved to (auto: chat when the
    tokenizer has a chat template, else plain)."""
    if style == "auto":
        style = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if style == "chat":
        return chat_template(tokenizer), style
    return (SCHEMA_FIRST_TEMPLATE if style == "schema-first" else DEFAULT_TEMPLATE), style


def build_prompt(question: str, context: str, template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    return template.build_prompt(question, context)


@functools.lru_cache(maxsize=16)
def _stop_pattern(template: PromptTemplate) -> re.Pattern[str]:
    # the template's stops, each label also after indentation the model may add before it
    return re.compile("|".join(re.escape(s) if s == "\n\n" else r"\n\s*" + re.escape(s[1:]) for s in template.stops))


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """A prompt's token ids, with the special tokens the tokenizer itself adds (Gemma's `<bos>`):
    the ids the model was trained on, so every inference path feeds exactly these."""
    return list(tokenizer(prompt)["input_ids"])


def encode_completion(tokenizer: Any, completion: str) -> list[int]:
    """A completion's ids as trained: the text without special tokens, then EOS."""
    ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def extract_sql(text: str, eos_token: str | None = None, template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
    """The SQL in a raw completion: cut at EOS, at one of the template's stop strings (a new prompt
    section), or after the first complete statement (a `;` outside quotes)."""
    if eos_token and eos_token in text:
        text = text.split(eos_token, 1)[0]
    match = _stop_pattern(template).search(text)
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


def chat_template(tokenizer: Any) -> PromptTemplate:
    """The instruct layout: question and schema as the user turn of the tokenizer's own chat template,
    the SQL as the assistant turn (the tokenizer's EOS, e.g. `<|im_end|>`, ends it in training).

    The chat template is rendered once with placeholders, so the result is an ordinary format string
    that the artifact stores and every path builds prompts from, with no tokenizer at hand.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ArtifactError("--prompt-style chat: this tokenizer has no chat template",
                            "use --prompt-style plain (base models and `tiny` have none)")
    marker = "\x00{}\x00"
    user = f"Schema:\n{marker.format('context')}\n\nQuestion: {marker.format('question')}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    adds_bos = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    if adds_bos and tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]  # encode_prompt adds it when the tokenizer does, as in training
    prompt = text.replace("{", "{{").replace("}", "}}")
    prompt = prompt.replace(marker.format("context"), "{context}").replace(marker.format("question"), "{question}")
    return PromptTemplate(name="chat", prompt=prompt, completion="{answer}")


TEMPLATE_KEY = "prompt_template"


def load_template(model_dir: str | Path) -> PromptTemplate:
    """The template stored in a model folder's sqltune.json; a folder without one is refused."""
    from sqltune.artifacts import manifests

    meta = Path(model_dir) / manifests.SQLTUNE_META
    if not meta.is_file():
        raise ArtifactError(
            f"{model_dir} has no {manifests.SQLTUNE_META}, so the prompt template it was trained with is unknown",
            "point at a folder written by `sqltune finetune`, or re-export it with `sqltune finetune`",
        )
    data = manifests.read_meta(model_dir)
    if TEMPLATE_KEY not in data:
        raise ArtifactError(f"{meta} has no `{TEMPLATE_KEY}` entry", "re-export the model with `sqltune finetune`")
    return PromptTemplate.from_dict(data[TEMPLATE_KEY])
