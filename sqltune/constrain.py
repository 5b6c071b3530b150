"""Schema-constrained decoding: the request's grammar (sqltune.sql.grammar), compiled by xgrammar for
one tokenizer, and the token masks it gives at each step.

    constraint = build("schema", question, context)        # the grammar text, or why there is none
    compiler = Compiler(tokenizer, vocab_size, eos_ids)     # one per loaded model
    matcher = compiler.matcher(constraint.grammar)          # one per generated sequence
    mask_logits(logits, [matcher, None, ...])               # rows without a matcher stay free

Compiling a grammar against a vocabulary is the expensive step (tens to hundreds of milliseconds for
a 50k vocabulary), so compiled grammars are kept by the SHA-256 of their text: the same schema is
compiled once however many questions ask about it. `schema+values` grammars hold the question's
words, so each new question compiles anew (see benchmarks/constrained.py for both costs).

When no grammar can be built (the context is not CREATE TABLE statements, xgrammar refuses it) the
request decodes unconstrained and says why (`Constraint.reason`): constraining is never a new way to
fail a request.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqltune import logs
from sqltune.errors import DataError
from sqltune.sql.grammar import MODES, schema_grammar
from sqltune.sql.schema import parse_schema

log = logs.get("constrain")
CACHE_SIZE = 256  # compiled grammars kept per model; a 50k-vocabulary grammar takes about 1-3 MB
# In a row's last quarter of max_tokens, tokens that open more structure are masked too and EOS is
# taken as soon as the grammar allows it, so a query still being written when max_tokens nears gets
# closed rather than cut (an untrained model otherwise fills every list the grammar allows). A quarter,
# not a fixed count: with 64 of 96 tokens, real answers of 30-40 tokens had their strings closed early.
WIND_DOWN_SHARE = 0.25
# What goes into one grammar is capped before anything is built. Compiling against a 49k vocabulary
# grows with the square of a schema+values question (one rule per word: 250 words 0.08 s, 1k 0.5 s,
# 6k 47 s) and with the count of distinct names (4,096: 2.5 s); real questions are under 60 words and
# real schemas under a few hundred names. Past a cap the request decodes unconstrained, with the reason.
MAX_QUESTION_WORDS = 256
MAX_NAMES = 1024
MAX_GRAMMAR_CHARS = 250_000
# The shortest way to close a query can be long: a quoted table name spelled one letter per token by
# a small vocabulary, after a FROM. 64 closed every answer of an untrained model from 8 to 160 tokens.
CLOSE_TOKENS = 64
_CLOSERS = re.compile(r"[)\"'`\]]")
_OPEN_CHARS = re.compile(r"[(,+\-*/|%&<>=]")
_OPEN_WORDS = ("select", "where", "and", "or", "not", "join", "on", "group", "order", "having", "union", "intersect",
               "except", "like", "in", "between", "limit", "offset", "distinct", "count", "sum", "avg", "min", "max",
               "abs", "round", "length", "lower", "upper", "is", "inner", "left", "cross", "natural", "outer")


def _opens(piece: str) -> bool:
    """Whether a token's text opens more structure: a bracket, separator or operator, or a word that
    is (the start of) a clause keyword or function name. Tokens are often pieces of words."""
    if _OPEN_CHARS.search(piece):
        return True
    words = re.findall(r"[a-z]+", piece.lower())
    return any(w in _OPEN_WORDS or (len(w) >= 2 and any(k.startswith(w) for k in _OPEN_WORDS)) for w in words)


@dataclass(frozen=True)
class Constraint:
    """The grammar a request decodes under, or why it decodes unconstrained."""

    mode: str  # one of MODES
    grammar: str = ""  # xgrammar EBNF; "" = unconstrained
    reason: str = ""  # set when a mode other than "off" was asked for but no grammar applies

    @property
    def constrained(self) -> bool:
        return bool(self.grammar)

    def without(self, reason: str) -> Constraint:
        return Constraint(self.mode, "", reason)


def check_mode(mode: str, where: str = "--constrain") -> str:
    if mode not in MODES:
        raise DataError(f"{where}: {mode!r} is not a constraint mode", f"use one of: {', '.join(MODES)}")
    return mode


def build(mode: str, question: str, context: str) -> Constraint:
    """The grammar for one (question, context) under `mode`; unconstrained with a reason when the
    context cannot be read as a schema or what would go into the grammar is past the caps (checked
    before anything is built, so an oversized request costs a split and a count)."""
    check_mode(mode)
    if mode == "off":
        return Constraint("off")
    if mode == "schema+values":
        words = len(question.split())
        if words > MAX_QUESTION_WORDS:
            return Constraint(mode, "", f"no grammar: the question has {words} words, more than the "
                              f"{MAX_QUESTION_WORDS} a schema+values grammar takes; decoded unconstrained")
    try:
        schema = parse_schema(context)
    except DataError as e:
        return Constraint(mode, "", f"no grammar: the context is not a schema ({e.message}); decoded unconstrained")
    names = {t.name for t in schema.tables} | {c.name for t in schema.tables for c in t.columns}
    if len(names) > MAX_NAMES:
        return Constraint(mode, "", f"no grammar: the schema has {len(names)} distinct table and column names, "
                          f"more than the {MAX_NAMES} a grammar takes; decoded unconstrained")
    grammar = schema_grammar(schema, question if mode == "schema+values" else None)
    if len(grammar) > MAX_GRAMMAR_CHARS:
        return Constraint(mode, "", f"no grammar: it would be {len(grammar)} characters, more than "
                          f"{MAX_GRAMMAR_CHARS}; decoded unconstrained")
    return Constraint(mode, grammar)


def xgrammar() -> Any:
    """The xgrammar module, or a clear error naming the install command."""
    try:
        import xgrammar as xgr
    except ImportError:
        from sqltune.errors import ConfigError

        raise ConfigError("--constrain needs xgrammar, which is not installed in this Python environment",
                          "pip install 'xgrammar>=0.2.8,<0.3' (a core dependency of sqltune), or use --constrain off"
                          ) from None
    return xgr


def grammar_key(grammar: str) -> str:
    return hashlib.sha256(grammar.encode()).hexdigest()


class GrammarError(Exception):
    """xgrammar refused a grammar (it does not parse, or a rule is empty)."""


def check_grammar(grammar: str) -> None:
    """Parse a grammar without compiling it against a vocabulary (what the vLLM engine checks before it
    hands the text to vLLM, which compiles it itself)."""
    xgr = xgrammar()
    try:
        xgr.Grammar.from_ebnf(grammar)
    except Exception as e:  # xgrammar raises RuntimeError / ValueError with the parser's message
        raise GrammarError(f"xgrammar cannot read the grammar: {str(e).splitlines()[0][:200]}") from None


class Compiler:
    """xgrammar's compiler for one tokenizer and vocabulary, with compiled grammars kept by hash."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int], cache_size: int = CACHE_SIZE) -> None:
        xgr = xgrammar()

        self.vocab_size = int(vocab_size)
        self.stop_ids = sorted({int(i) for i in stop_ids})
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                       stop_token_ids=self.stop_ids)
        # xgrammar's own cache is off: ours is keyed by the grammar's hash and bounded by count
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size = cache_size
        self.compiled = 0
        self.hits = 0
        self.compile_seconds = 0.0
        self._masks: Any = None
        self._tokenizer = tokenizer

    @property
    def masks(self) -> tuple[Any, Any, Any, Any]:
        """Bool tensors over the vocabulary for winding down: tokens that open more structure (a bracket,
        a separator, an operator, a clause keyword), tokens that close something (a bracket or quote),
        tokens that start with whitespace (they end a word), and tokens with digits."""
        if self._masks is None:
            import torch

            n = min(self.vocab_size, len(self._tokenizer))
            opens, closes, spaced, digits = (torch.zeros(self.vocab_size, dtype=torch.bool) for _ in range(4))
            for i, text in enumerate(self._tokenizer.convert_ids_to_tokens(list(range(n)))):
                piece = self._tokenizer.convert_tokens_to_string([text]) if text else ""
                opens[i] = _opens(piece)
                closes[i] = bool(_CLOSERS.search(piece))
                spaced[i] = piece[:1].isspace()
                digits[i] = any(ch.isdigit() for ch in piece)
            self._masks = (opens, closes, spaced, digits)
        return self._masks

    def compile(self, grammar: str) -> Any:
        """The CompiledGrammar of an EBNF text (from the cache when it was compiled before)."""
        key = grammar_key(grammar)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.hits += 1
                return self._cache[key]
        started = time.perf_counter()
        try:
            compiled = self._compiler.compile_grammar(grammar)
        except Exception as e:
            raise GrammarError(f"xgrammar cannot compile the grammar: {str(e).splitlines()[0][:200]}") from None
        seconds = time.perf_counter() - started
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self.compiled += 1
            self.compile_seconds += seconds
        logs.event(log, "grammar compiled", key=key[:12], ms=round(seconds * 1000, 1), cached=len(self._cache),
                   level=10)
        return compiled

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher for one sequence; stop tokens are the model's EOS ids."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(grammar), override_stop_tokens=self.stop_ids)

    def stats(self) -> dict[str, Any]:
        return {"compiled": self.compiled, "cache_hits": self.hits, "cached": len(self._cache),
                "compile_s": round(self.compile_seconds, 4)}


def mask_logits(logits: Any, matchers: Sequence[Any], compiler: Compiler,
                remaining: Sequence[int] | None = None) -> Any:
    """Set to -inf, in place, every logit a row's grammar does not allow next; rows whose matcher is
    None (unconstrained requests sharing the batch) or finished are left as they are. A row whose
    `remaining[i]` (tokens left before its wind-down point, wind_down_after) is <= 0 winds down."""
    import torch
    import xgrammar as xgr

    rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
    if not rows:
        return logits
    vocab_size = compiler.vocab_size
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for i in rows:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        logits = logits.float()
    # on CPU xgrammar's "auto" backend measured 4x slower than its C++ "cpu" kernel (36 vs 9 ms for 16 x 49k)
    backend = "cpu" if logits.device.type == "cpu" else "auto"
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=vocab_size, indices=rows,
                                    backend=backend)
    for i in rows:
        if remaining is None or remaining[i] > 0:
            continue
        row = logits[i, :vocab_size]
        stops = [s for s in compiler.stop_ids if s < vocab_size and torch.isfinite(row[s])]
        if stops:  # the query is complete: end it here
            keep = row[stops[0]].clone()
            row.fill_(float("-inf"))
            row[stops[0]] = keep if torch.isfinite(keep) else 0.0
            continue
        opens, closes, spaced, digits = (m.to(row.device) for m in compiler.masks)
        # the first non-empty of: closing tokens that open nothing; tokens that end the word being written
        # (a label, a number) and open nothing; tokens that open nothing and are not more digits; the
        # grammar's own choice (only an opening token can go on)
        for banned in (opens | ~closes, opens | ~spaced, opens | digits):
            narrowed = row.masked_fill(banned, float("-inf"))
            if bool(torch.isfinite(narrowed).any()):
                row.copy_(narrowed)
                break
    return logits


def closing(matcher: Any, generated: int, limit: int) -> bool:
    """Whether a constrained row that has generated `generated` tokens of its max_tokens `limit` goes
    on to close its query: a query cut mid-way never parses, so a row that reaches max_tokens before
    its grammar let it end takes up to CLOSE_TOKENS more, under the wind-down masks (which take EOS as
    soon as the grammar allows it). The response says how many it took (`extra_tokens`)."""
    return matcher is not None and not matcher.is_terminated() and generated < limit + CLOSE_TOKENS


def token_budget(limit: int, constrained: bool) -> int:
    """The most tokens a row with max_tokens `limit` can generate (see `closing`)."""
    return limit + CLOSE_TOKENS if constrained else limit


def wind_down_after(limit: int) -> int:
    """Tokens left when a row with max_tokens `limit` starts winding down."""
    return max(4, int(limit * WIND_DOWN_SHARE))


def logits_processor(matchers: Sequence[Any], compiler: Compiler, limits: Sequence[int], prompt_width: int) -> Any:
    """A transformers LogitsProcessor that feeds each row's sampled token to its matcher and masks
    the next step (sqltune.generation's batched `model.generate`). Rows that finished are skipped;
    `limits` are the rows' max_new_tokens, so each winds down before its own end."""
    import transformers

    class GrammarLogits(transformers.LogitsProcessor):
        def __init__(self) -> None:
            self.matchers = list(matchers)
            self.started = False

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            generated = input_ids.shape[1] - prompt_width
            if self.started:
                last = input_ids[:, -1].tolist()
                for i, m in enumerate(self.matchers):
                    if m is not None and not m.is_terminated() and not m.accept_token(int(last[i])):
                        self.matchers[i] = None  # cannot happen under the mask; never fail the batch for it
            self.started = True
            left = [limit - generated - wind_down_after(limit) for limit in limits]
            return mask_logits(scores, self.matchers, compiler, left)

    return GrammarLogits()


def accepts(grammar: str, text: str) -> bool:
    """Whether a grammar accepts a whole text (no tokenizer needed): the tests' and the benchmark's
    check that gold queries are inside the language."""
    import xgrammar as xgr

    compiler = _string_compiler()
    matcher = xgr.GrammarMatcher(compiler.compile_grammar(grammar), terminate_without_stop_token=True)
    return bool(matcher.accept_string(text)) and matcher.is_terminated()


_STRING_COMPILER: list[Any] = []


def _string_compiler() -> Any:
    import xgrammar as xgr

    if not _STRING_COMPILER:
        _STRING_COMPILER.append(xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False))
    return _STRING_COMPILER[0]
