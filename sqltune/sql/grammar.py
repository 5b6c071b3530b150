"""A grammar of the SQL that text-to-SQL datasets use, built from one request's CREATE TABLE context.

    ebnf = schema_grammar(parse_schema(context))                        # --constrain schema
    ebnf = schema_grammar(parse_schema(context), question=question)     # --constrain schema+values

The text is xgrammar's EBNF (GBNF-like, rule `root`). Its identifiers are exactly the context's
tables and columns, bare or quoted, in the declared, lower or upper case (SQLite compares names
case-insensitively); keywords and functions are upper or lower case. With a question, string
literals may only be spans of its words (original or lower case, optionally wrapped in LIKE's `%`)
and numbers only the numbers the question writes (digits, thousands separators or number words).

Lists repeat a bounded number of times and nesting stops at MAX_DEPTH levels (subqueries and
parentheses); literals and labels are unbounded (bounded character repetitions make compiling against
a large vocabulary several times slower). sqltune.constrain winds a row down as max_tokens nears, so
an answer is closed rather than cut.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqltune.sql.schema import Schema, Table

MAX_DEPTH = 1  # nested SELECTs / parenthesised expressions below the top level
MODES = ("off", "schema", "schema+values")
# SQLite takes letters of any script, digits, `_` and `$` in a bare name (not a leading digit or `$`)
_BARE = re.compile("^[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*$")
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\w])")
_EDGE = "?!.,;:\"'()[]{}"
_EDGE_MORE = _EDGE + "#$%&*+-/<>=@^`|~"
_WORD_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
                 "first": "1", "second": "2", "third": "3", "once": "1", "twice": "2", "single": "1"}
_AGGREGATES = ("COUNT", "SUM", "AVG", "MIN", "MAX")
_SCALARS = ("ABS", "LENGTH", "LOWER", "UPPER", "ROUND")  # ROUND also takes digits


def lit(text: str) -> str:
    """An EBNF string literal."""
    out = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + out.replace("\t", "\\t") + '"'


def alt(options: Iterable[str]) -> str:
    unique = list(dict.fromkeys(options))
    return unique[0] if len(unique) == 1 else "(" + " | ".join(unique) + ")"


def kw(*words: str) -> str:
    """Keyword(s), each upper or lower case, joined by whitespace."""
    return " ws ".join(alt([lit(w.upper()), lit(w.lower())]) for w in words)


def name_forms(name: str) -> list[str]:
    """Every way the grammar lets a query write `name`: bare (when it is a plain word) and quoted
    with "", `` or [], each letter in either case (SQLite compares names case-insensitively)."""
    forms = [_any_case(name)] if _BARE.match(name) else []
    forms += [f"\"\\\"\" {_any_case(name.replace(chr(34), chr(34) * 2))} \"\\\"\"",
              f"\"`\" {_any_case(name.replace('`', '``'))} \"`\""]
    if "]" not in name:
        forms.append(f"\"[\" {_any_case(name)} \"]\"")
    return forms


class _Rules:
    def __init__(self) -> None:
        self.rules: dict[str, str] = {}

    def add(self, name: str, body: str) -> str:
        self.rules[name] = body
        return name

    def text(self) -> str:
        return "\n".join(f"{k} ::= {v}" for k, v in self.rules.items()) + "\n"


def schema_grammar(schema: Schema, question: str | None = None, max_depth: int = MAX_DEPTH) -> str:
    """The EBNF of one read-only query over `schema`; with `question`, literals come from it."""
    r = _Rules()
    # one blank or newline between words: the template's stop strings include a blank line, and a
    # model that may pad with whitespace forever (an untrained one does) would never finish
    r.add("root", "[ \\n]? query_0 \";\"?")
    r.add("ws", "[ \\n]")
    r.add("ows", "[ \\n]?")
    _names(r, schema.tables)
    _literals(r, question)
    _shared(r)
    for d in range(max_depth + 1):
        _level(r, d, d < max_depth)
    return r.text()


def _names(r: _Rules, tables: tuple[Table, ...]) -> None:
    r.add("table", alt(f for t in tables for f in name_forms(t.name)))
    r.add("column", alt(f for t in tables for c in t.columns for f in name_forms(c.name)))
    # Spider's aliases (T1, T2 ...): a letter and a digit, never an invented name
    r.add("alias", "[tT] [0-9]")
    r.add("qualifier", "table | alias")
    r.add("colref", "column | qualifier \".\" column")
    r.add("label", "[A-Za-z_] [A-Za-z0-9_]*")


def _literals(r: _Rules, question: str | None) -> None:
    r.add("int", "[0-9]+")
    if question is None:
        # unbounded: a bounded repetition ({0,64}) made compiling against a 49k vocabulary 3x slower
        r.add("string", "\"\\\"\" [^\"\\n]* \"\\\"\" | \"'\" [^'\\n]* \"'\"")
        r.add("number", "[0-9]+ (\".\" [0-9]+)?")
        return
    words = [w for w in question.split() if w.strip(_EDGE)]
    r.add("string", f"\"\\\"\" {_spans(r, words, 'd', chr(34))} \"\\\"\" | \"'\" {_spans(r, words, 's', chr(39))} \"'\"")
    numbers = _question_numbers(question)
    r.add("number", alt(lit(n) for n in numbers) if numbers else "\"0\" | \"1\"")


def _spans(r: _Rules, words: list[str], tag: str, quote: str) -> str:
    """Content of a string literal: a run of consecutive question words (each as written, without its
    edge punctuation, or lower-cased), optionally inside LIKE's % wildcards. One rule per word
    position keeps the grammar linear in the question's length."""
    if not words:
        return "\"\""
    starts = []
    for i, w in enumerate(words):
        forms = []
        bare = w.rstrip("?!.,;:")
        if bare.lower().endswith(("'s", "’s")):
            bare = bare[:-2]
        forms = [v for v in (w, bare, bare.strip("\"'"), w.strip(_EDGE), w.rstrip(_EDGE), w.lstrip(_EDGE),
                             w.strip(_EDGE_MORE)) if v]
        forms = [f.replace(quote, quote * 2) for f in dict.fromkeys(forms)]
        word = r.add(f"w{tag}{i}", alt(_any_case(f) for f in forms))
        rest = f" (\" \" sp{tag}{i + 1})?" if i + 1 < len(words) else ""
        starts.append(r.add(f"sp{tag}{i}", word + rest))
    span = r.add(f"span{tag}", alt(starts))
    return f"\"%\"? {span} \"%\"?"


def _any_case(text: str) -> str:
    """`text` with each letter in either case ("Carlton", "carlton", "CARLTON"): the dataset's
    questions are often lower-cased while its values keep their case."""
    parts = []
    for ch in text:
        lo, up = ch.lower(), ch.upper()
        parts.append(f"[{lo}{up}]" if lo != up and len(lo) == len(up) == 1 and lo.isalpha() else lit(ch))
    return " ".join(parts)


def _question_numbers(question: str) -> list[str]:
    found: list[str] = []
    for m in _NUMBER.finditer(question):
        text = m.group(0).rstrip(",")
        found += [text, text.replace(",", "")]
        if "." in text and text.rstrip("0").endswith("."):
            found.append(text.replace(",", "").split(".")[0])  # "2.0" also as 2
    for word in re.findall(r"[A-Za-z]+", question.lower()):
        if word in _WORD_NUMBERS:
            found.append(_WORD_NUMBERS[word])
    return [n for n in dict.fromkeys(found) if n]


def _level(r: _Rules, d: int, deeper: bool) -> None:
    """Rules of nesting level d: query_d, its clauses, conditions and expressions. Only levels below
    the last may open a subquery or a parenthesised condition or expression (which are level d+1).
    Function arguments are columns, literals or `*` (Spider nests no calls), so calls cannot nest."""
    n = f"_{d}"
    nxt = f"_{d + 1}"
    setop = alt([kw("UNION", "ALL"), kw("UNION"), kw("INTERSECT"), kw("EXCEPT")])
    r.add(f"query{n}", f"core{n} (ws {setop} ws core{n})? (ws order{n})? (ws limit)?")
    r.add(f"core{n}", f"{kw('SELECT')} (ws {kw('DISTINCT')})? ws items{n} ws {kw('FROM')} ws source{n} "
                      f"(ws {kw('WHERE')} ws cond{n})? (ws {kw('GROUP', 'BY')} ws exprs{n} "
                      f"(ws {kw('HAVING')} ws cond{n})?)?")
    r.add(f"items{n}", f"item{n} (ows \",\" ows item{n}){{0,5}}")
    # a result column's own name needs AS, so a bare word after an expression is never taken for one
    r.add(f"item{n}", f"\"*\" | qualifier \".*\" | expr{n} (ws {kw('AS')} ws label | ows \"[\" label \"]\")?")
    sub = f" | \"(\" ows query{nxt} ows \")\" (ws ({kw('AS')} ws)? alias)?" if deeper else ""
    r.add(f"tref{n}", f"table (ws ({kw('AS')} ws)? alias)?{sub}")
    join = alt([kw("JOIN"), kw("INNER", "JOIN"), kw("LEFT", "JOIN"), kw("LEFT", "OUTER", "JOIN"),
                kw("CROSS", "JOIN"), kw("NATURAL", "JOIN")])
    r.add(f"source{n}", f"tref{n} ((ws {join} ws | ows \",\" ows) tref{n} (ws {kw('ON')} ws cond{n})?){{0,3}}")
    r.add(f"order{n}", f"{kw('ORDER', 'BY')} ws oitem{n} (ows \",\" ows oitem{n}){{0,2}}")
    r.add(f"oitem{n}", f"expr{n} (ws {alt([kw('ASC'), kw('DESC')])})?")
    r.add("limit", f"{kw('LIMIT')} ws int (ws {kw('OFFSET')} ws int)?")
    r.add(f"exprs{n}", f"expr{n} (ows \",\" ows expr{n}){{0,3}}")
    r.add(f"cond{n}", f"cterm{n} (ws {alt([kw('AND'), kw('OR')])} ws cterm{n}){{0,5}}")
    paren = f" | \"(\" ows cond{nxt} ows \")\"" if deeper else ""
    r.add(f"cterm{n}", f"({kw('NOT')} ws)? pred{n}{paren}")
    cmp = alt(lit(o) for o in ("=", "==", "!=", "<>", "<=", ">=", "<", ">"))
    not_ = f"({kw('NOT')} ws)?"
    members = "literal (ows \",\" ows literal){0,9}"
    in_list = f"\"(\" ows ({'query' + nxt + ' | ' if deeper else ''}{members}) ows \")\""
    # `score = 71 - 69 = 140` (a chained comparison) is in the dataset and SQLite reads it
    r.add(f"pred{n}", f"expr{n} ows {cmp} ows rhs{n} (ows {cmp} ows rhs{n})?"
                      f" | expr{n} ws {not_}{kw('LIKE')} ws expr{n}"
                      f" | expr{n} ws {not_}{kw('IN')} ows {in_list}"
                      f" | expr{n} ws {not_}{kw('BETWEEN')} ws expr{n} ws {kw('AND')} ws expr{n}"
                      f" | expr{n} ws {kw('IS')} ws {not_}{kw('NULL')}")
    r.add(f"expr{n}", f"term{n} (ows arith ows term{n}){{0,2}}")
    # a negative number only right after a comparison: after `-` it would open an SQL comment (`--`)
    # (and the golf scores of the dataset, `score = 67 - 66 - 71 - 71 = 275`, are long differences)
    r.add(f"rhs{n}", f"term{n} (ows arith ows term{n}){{0,4}} | \"-\" number")
    nested = f" | \"(\" ows query{nxt} ows \")\" | \"(\" ows expr{nxt} ows \")\"" if deeper else ""
    r.add(f"term{n}", f"operand | call{nested}")


def _shared(r: _Rules) -> None:
    """Rules every level uses: operators, literals as terms, and the (non-nesting) function calls."""
    r.add("arith", alt(lit(o) for o in ("+", "-", "*", "/", "||", "%", "&", "|")))
    r.add("literal", "string | number")
    r.add("operand", "colref | literal")
    r.add("simple", "operand (ows arith ows operand){0,2}")
    agg = alt(kw(a) for a in _AGGREGATES)
    scalar = alt(kw(a) for a in _SCALARS)
    r.add("call", f"{agg} ows \"(\" ows (\"*\" | ({kw('DISTINCT')} ws)? simple) ows \")\""
                  f" | {scalar} ows \"(\" ows simple ows \")\""
                  f" | {kw('ROUND')} ows \"(\" ows simple ows \",\" ows int ows \")\"")
