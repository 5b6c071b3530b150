"""Token ids to streamed text: incremental decoding, and stop strings that never leak.

A stop string can arrive split over several tokens, so text that could be the start of one is
held back until the next token says whether it is; a multi-byte character split across tokens
decodes to U+FFFD until its last byte arrives, so that is held back too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """The growing completion of one request."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.min_tokens = min_tokens
        self.guard = 0
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that can be emitted now (sets `stopped` at a stop string)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop and len(self.ids) < self.min_tokens:
            self.guard = len(text)  # stop strings wholly inside text generated before min_tokens do not count
        elif self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.guard - longest + 1, self.sent - longest)
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(text, min(hits))
        end = len(text)
        if text.endswith("\ufffd"):
            end -= 1
        end -= self._held(text[:end])
        return self._emit(text, end)

    def flush(self) -> str:
        """The rest of the text when generation ends for another reason than a stop string."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(text, len(text))

    def _emit(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = text[self.sent:end], end
        return out

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
