"""One text-to-SQL example and the deterministic question split: what every data source produces and reads."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    question: str
    context: str
    answer: str
    # a row of a real database (the Spider / BIRD layout, or --database): its id, and the SQLite file or URL the
    # gold SQL runs on; "" for rows whose databases are synthesised from the context
    db_id: str = ""
    database: str = ""
    hint: str = ""  # BIRD's `evidence`: domain knowledge the question needs, given to the model with the question

    def to_dict(self) -> dict[str, str]:
        row = {"question": self.question, "context": self.context, "answer": self.answer}
        row.update({k: v for k, v in (("db_id", self.db_id), ("database", self.database), ("hint", self.hint)) if v})
        return row


def normalise_question(question: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", question.lower()).split())


def is_eval(question: str, fraction: float) -> bool:
    """Deterministic split: a hash of the normalised question, not the row's position."""
    digest = hashlib.sha256(normalise_question(question).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
