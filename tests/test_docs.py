"""Every `sqltune ...` command the README and the guides quote parses: its subcommand exists and every
flag it uses is in that subcommand's `--help`, so the docs cannot drift from the CLI.

    pytest tests/test_docs.py

Commands are read from fenced code blocks (each line, after `$`, env assignments and `&&`) and from
inline code spans that start with `sqltune `. `--help` runs as a user would run it, in a subprocess.
"""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1", re.S | re.M)
INLINE = re.compile(r"(?<!`)`(sqltune [^`\n]+)`(?!`)")
FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
LAUNCHERS = ("nice", "flock", "timeout", "torchrun", "python", "python3")


def commands(text: str) -> list[str]:
    """The `sqltune ...` command lines quoted in a Markdown text (comments and shell prompts dropped)."""
    found = []
    blocks = [m.group(2) for m in FENCE.finditer(text)]
    # indented code blocks (four spaces) quote commands too
    blocks += ["\n".join(line[4:] for line in text.splitlines() if line.startswith("    sqltune "))]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if "sqltune " in line and not line.startswith(("#", "curl", "python", "pip", "ollama", "{", "-")):
                found.append(line)
    found += [m.group(1) for m in INLINE.finditer(text)]
    return found


def invocations(line: str) -> list[list[str]]:
    """The argument lists after `sqltune` in one shell line (`a && sqltune b`, `X=1 sqltune c`)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose: not a command
        return []
    out, current = [], []
    for token in [*tokens, "&&"]:
        if token in ("&&", "||", ";", "|"):
            words = [t for t in current if not ASSIGNMENT.match(t)]
            at = next((i for i, w in enumerate(words) if Path(w).name == "sqltune"), None)
            # `sqltune ...`, `.venv/bin/sqltune ...`, or a launcher: `nice -n 10 sqltune`, `torchrun ... -m sqltune`
            if at is not None and (at == 0 or words[at - 1] == "-m" or words[0] in LAUNCHERS):
                out.append(words[at + 1:])
            current = []
        else:
            current.append(token)
    return out


@functools.cache
def help_text(path: tuple[str, ...]) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "sqltune", *path, "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    return done.returncode, done.stdout


def subcommands(help_out: str) -> set[str]:
    """The choices a help text's usage line offers as the next word ({a,b,c} in argparse's usage)."""
    usage = help_out.split("\n\n")[0]
    choices = set()
    for group in re.findall(r"\{([a-z0-9_,-]+)\}", usage):
        choices |= set(group.split(","))
    listed = re.search(r"positional arguments:\n\s+\{?([A-Z]+)\}?\n((?:\s{4,}\S.*\n)+)", help_out)
    if listed:
        choices |= {m.group(1) for m in re.finditer(r"^\s{4}([a-z][a-z0-9_-]*)\s", listed.group(2), re.M)}
    return choices


def problems(args: list[str]) -> list[str]:
    """What is wrong with `sqltune ARGS` against the CLI's own help ("" when it parses)."""
    path: list[str] = []
    rc, out = help_text(())
    for word in args:
        if word.startswith("-") or word not in subcommands(out):
            break
        path.append(word)
        rc, out = help_text(tuple(path))
        if rc != 0:
            return [f"`sqltune {' '.join(path)} --help` exits {rc}"]
    if not path:
        return [f"`sqltune {args[0] if args else ''}` is not a subcommand"]
    known = set(FLAG.findall(out))
    used = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    return [f"`sqltune {' '.join(path)}` has no {flag}" for flag in used if flag not in known]


QUOTED = [(doc.relative_to(ROOT).as_posix(), line) for doc in DOCS for line in commands(doc.read_text())]


def test_the_readme_quotes_commands_from_every_stage():
    readme = {line.split()[1] for path, line in QUOTED if path == "README.md" and line.startswith("sqltune ")}
    assert {"finetune", "eval", "ask", "serve", "export"} <= readme


@pytest.mark.parametrize(("doc", "line"), QUOTED, ids=[f"{d}:{line[:60]}" for d, line in QUOTED])
def test_each_quoted_command_parses(doc, line):
    calls = invocations(line)
    assert calls, f"{doc}: no sqltune call read from {line!r}"
    for args in calls:
        assert problems(args) == [], f"{doc}: {line}"


def test_the_check_finds_a_flag_or_a_subcommand_that_does_not_exist():
    """The check itself can fail: a made-up flag, a misspelt subcommand, a flag of another subcommand."""
    assert problems(["serve", "--model", "m", "--no-such-flag", "1"]) == ["`sqltune serve` has no --no-such-flag"]
    assert problems(["serv", "--model", "m"]) == ["`sqltune serv` is not a subcommand"]
    assert problems(["export", "gguf", "--database", "x"]) == ["`sqltune export gguf` has no --database"]
    assert problems(["ask", "--database", "x.sqlite", "--db-row-cap=5", "How many?"]) == []
    assert invocations("make demo && MODEL_NAME=x sqltune finetune --lora-r 8  # a comment") == [
        ["finetune", "--lora-r", "8"]]
