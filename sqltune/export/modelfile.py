"""The prompt template in the two languages a GGUF's runners speak: a Jinja chat template (stored in
the GGUF as `tokenizer.chat_template`, which llama.cpp's server, llama-cpp-python and transformers
apply) and an Ollama Modelfile (a Go template). Pure renderers: text in, text out.

    sqltune export gguf --model models/smollm2-135m-sql --out smollm2-sql.gguf   # writes both

One mapping in both: the schema (CREATE TABLE statements) is the system message and the question
is the user message, so an OpenAI-style chat request to llama.cpp or Ollama builds exactly the
prompt the model was trained on:

    [{"role": "system", "content": "CREATE TABLE head (age INTEGER)"},
     {"role": "user", "content": "How many heads are older than 56?"}]
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence

from sqltune.errors import ArtifactError
from sqltune.prompts import PromptTemplate

# the roles each template field is read from
FIELD_ROLES = {"context": "system", "question": "user"}


def _pieces(template: PromptTemplate) -> Iterator[tuple[str, str | None]]:
    """(literal text, field name or None) of the prompt, with `{{`/`}}` already unescaped."""
    try:
        parsed = list(string.Formatter().parse(template.prompt))
    except ValueError as e:
        raise ArtifactError(f"prompt template {template.prompt!r} is not a valid format string: {e}",
                            "re-export the model with `sqltune finetune`") from None
    text = ""  # the parser splits literal text at every escaped brace; join it back
    for literal, name, spec, conversion in parsed:
        text += literal
        if name is None:
            continue
        if name not in FIELD_ROLES or spec or conversion:
            raise ArtifactError(f"prompt template has a field {{{name}}} that GGUF export cannot map",
                                f"the template may only use {', '.join('{' + f + '}' for f in FIELD_ROLES)}")
        yield text, name
        text = ""
    if text:
        yield text, None


def _jinja_string(text: str) -> str:
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def jinja_chat_template(template: PromptTemplate) -> str:
    """A chat template that renders `template.build_prompt(question, context)` from a message list: the
    last system message is the context, the last user message the question (both stripped, as
    build_prompt does). Literal text goes out as string expressions, so braces in it stay literal."""
    out = ['{%- set ns = namespace(context="", question="") -%}',
           "{%- for message in messages -%}",
           "{%- if message['role'] == 'system' -%}{%- set ns.context = message['content'] -%}",
           "{%- elif message['role'] == 'user' -%}{%- set ns.question = message['content'] -%}",
           "{%- endif -%}",
           "{%- endfor -%}"]
    body = []
    for literal, name in _pieces(template):
        if literal:
            body.append("{{ " + _jinja_string(literal) + " }}")
        if name:
            body.append("{{ ns." + name + " | trim }}")
    return "".join(out) + "".join(body)


def go_template(template: PromptTemplate) -> str:
    """The prompt as an Ollama TEMPLATE: {context} is `.System`, {question} is `.Prompt`."""
    go_names = {"context": "{{ .System }}", "question": "{{ .Prompt }}"}
    parts = []
    for literal, name in _pieces(template):
        parts.append(literal.replace("{{", '{{ "{{" }}'))  # a literal `{{` would open an action
        if name:
            parts.append(go_names[name])
    text = "".join(parts)
    if '"""' in text:
        raise ArtifactError('the prompt template contains """, which an Ollama Modelfile cannot quote',
                            "use a prompt template without triple quotes")
    return text


def _quoted(value: str) -> str:
    if "\n" in value or '"' in value:
        return f'"""{value}"""'
    return f'"{value}"'


def ollama_stops(template: PromptTemplate, eos_token: str | None) -> list[str]:
    """EOS first (the model learned to end with it), then the template's own section labels; the
    blank-line stop is left out, as Modelfile values cannot hold a bare newline reliably."""
    stops = [eos_token] if eos_token else []
    for stop in template.stops:
        label = stop.strip()
        if label and label not in stops:
            stops.append(label)
    return stops


def render_modelfile(gguf_name: str, template: PromptTemplate, *, eos_token: str | None, max_new_tokens: int,
                     num_ctx: int, name: str, system: str = "", stops: Sequence[str] | None = None) -> str:
    """An Ollama Modelfile beside the GGUF: greedy decoding (as `sqltune serve`), the trained prompt."""
    lines = [
        f"# Ollama model file for {name}, written by `sqltune export gguf`.",
        f"#   ollama create {name} -f Modelfile",
        f"#   ollama run {name}      # then: /set system CREATE TABLE ... and ask the question",
        "# Chat API: the schema is the system message, the question the user message.",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{go_template(template)}"""',
    ]
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    for stop in (stops if stops is not None else ollama_stops(template, eos_token)):
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    lines += ["PARAMETER temperature 0", f"PARAMETER num_predict {max_new_tokens}", f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n"
