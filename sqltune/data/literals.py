"""String literals of the answer spelled as the question spells them.

sql-create-context lowercases the string literals of its WikiSQL rows (question "Guiyang Olympic
Sports Center", answer `home_stadium = "guiyang olympic sports center"`), so a model trained on it
learns to lowercase values, and against a real database (where `=` is case-sensitive in SQLite and
PostgreSQL) the answer selects nothing. `question_case` gives each literal that matches a span of
the question apart from letter case the question's spelling, at load time, for training and
evaluation alike; everything else in the SQL stays byte-identical.

    >>> question_case("Name the mascot for Shelbyville", 'SELECT mascot FROM t WHERE school = "shelbyville"', "")
    ('SELECT mascot FROM t WHERE school = "Shelbyville"', 1)
"""

from __future__ import annotations

import re

_LETTER = re.compile(r"[^\W\d_]")
_NAME = re.compile(r"[A-Za-z_][\w]*")


def _schema_names(context: str) -> set[str]:
    """Every word of the CREATE TABLE context, lowercased: a double-quoted token that names a table or a
    column is an identifier, not a value (SQLite reads `"x"` as a string only when no column is called x)."""
    return {m.group(0).lower() for m in _NAME.finditer(context)}


def _bounded(question: str, start: int, end: int) -> bool:
    before = question[start - 1] if start > 0 else " "
    after = question[end] if end < len(question) else " "
    return not (before.isalnum() or after.isalnum())


def _question_spelling(segment: str, question: str) -> str | None:
    """The question's spelling of `segment` (a whole-word span equal apart from letter case), or None when
    the question does not contain it, already spells it this way, or has no letters in it to change."""
    if not _LETTER.search(segment):
        return None  # numbers, dates, punctuation: nothing to recase
    spans = [m for m in re.finditer(re.escape(segment), question, re.IGNORECASE) if _bounded(question, *m.span())]
    if not spans or any(m.group(0) == segment for m in spans):
        return None
    found = spans[0].group(0)
    return found if len(found) == len(segment) else None


def _recase_value(value: str, question: str) -> str:
    """A literal's content in the question's spelling; a LIKE pattern's `%` wildcards split it into
    pieces that are matched one by one, the wildcards kept in place."""
    pieces = re.split(r"(%)", value)
    out = []
    for piece in pieces:
        spelled = _question_spelling(piece, question) if piece.strip() and piece != "%" else None
        out.append(spelled if spelled is not None else piece)
    return "".join(out)


def question_case(question: str, sql: str, context: str = "") -> tuple[str, int]:
    """`sql` with each string literal that the question spells with other letter case respelled as in
    the question, and how many literals changed. Numbers, identifiers and literals the question does not
    contain are left alone; SQL that does not tokenize is returned unchanged."""
    from sqlglot.dialects.sqlite import SQLite
    from sqlglot.errors import SqlglotError
    from sqlglot.tokens import TokenType

    try:
        tokens = SQLite().tokenize(sql)
    except SqlglotError:
        return sql, 0
    names: set[str] | None = None
    edits: list[tuple[int, int, str]] = []
    for tok in tokens:
        raw = sql[tok.start:tok.end + 1]
        if tok.token_type == TokenType.STRING and raw[:1] == "'":
            quote = "'"
        elif tok.token_type == TokenType.IDENTIFIER and raw[:1] == '"':
            names = _schema_names(context) if names is None else names
            if tok.text.lower() in names:
                continue
            quote = '"'
        else:
            continue
        if raw != quote + tok.text.replace(quote, quote * 2) + quote:
            continue  # an escape form we do not rebuild byte for byte: leave it
        recased = _recase_value(tok.text, question)
        if recased != tok.text:
            edits.append((tok.start, tok.end + 1, quote + recased.replace(quote, quote * 2) + quote))
    for start, end, text in reversed(edits):
        sql = sql[:start] + text + sql[end:]
    return sql, len(edits)
