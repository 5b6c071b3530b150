"""Training rows that share their context: questions on one database, packed into one row behind one copy of it.

A Spider prompt is mostly its schema (about 200 of its 250 tokens) and a database has dozens of questions. With
the schema before the question (`prompt_style: schema-first` or chat), their prompts begin with the same tokens, so
a row can hold the context once and several questions after it:

    [context][question 1 + SQL 1][question 2 + SQL 2]...

Each question attends to the context and to itself only (an attention mask per row), and its positions continue
from the context's end, as if it followed the context alone. Every token then sees exactly what it sees in a row
of its own, so the loss and the gradient are the separate rows' sums, for the context's tokens computed once.

    pytest tests/test_shared_context.py
"""

from __future__ import annotations

import os
from typing import Any

# a shorter common start (the template's first words) saves too little to be worth packing on
MIN_SHARED_TOKENS = 32


def pack_rows(encoded: list[tuple[list[int], list[int]]], per_row: int, max_len: int) -> list[dict[str, Any]]:
    """(prompt ids, completion ids) pairs as training rows: `input_ids`, `completion_mask` and `segments`
    ([context length, length of each question's part]). Prompts that begin with the same MIN_SHARED_TOKENS or more
    tokens share a row, up to `per_row` of them and max_len tokens; a question's part keeps at least its prompt's
    last token, so each answer is predicted from within its own part. Every pair is in exactly one row."""
    order = sorted(range(len(encoded)), key=lambda i: encoded[i][0])
    rows: list[dict[str, Any]] = []
    group: list[int] = []
    shared = 0

    def flush() -> None:
        if not group:
            return
        s = shared if len(group) > 1 else 0
        ids, mask, segments = list(encoded[group[0]][0][:s]), [0] * s, [s]
        for i in group:
            prompt, completion = encoded[i]
            ids += prompt[s:] + completion
            mask += [0] * (len(prompt) - s) + [1] * len(completion)
            segments.append(len(prompt) - s + len(completion))
        rows.append({"input_ids": ids, "completion_mask": mask, "segments": segments})

    for i in order:
        prompt, completion = encoded[i]
        if group:
            s = min(shared, len(os.path.commonprefix([encoded[group[0]][0], prompt])), len(prompt) - 1)
            length = s + sum(len(encoded[j][0]) - s + len(encoded[j][1]) for j in (*group, i))
            if s >= MIN_SHARED_TOKENS and len(group) < per_row and length <= max_len:
                group.append(i)
                shared = s
                continue
            flush()
        group, shared = [i], len(prompt) - 1
    flush()
    return rows


def attention_mask(segment_ids: Any, dtype: Any = None) -> Any:
    """The [rows, 1, tokens, tokens] mask of packed rows from their segment ids (0 = the shared context, k = the
    k-th question's part, -1 = padding): causal, and a token of part k sees the context and part k only. Boolean
    (True = attend) for sdpa; additive in `dtype` for eager attention. A padding token sees itself, so no row of the
    mask is empty."""
    import torch

    n = segment_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    mask = (causal & ((query == key) | (key == 0)))[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class SharedContextCollator:
    """Pads rows of `pack_rows` (or plain rows, one part each) into a batch: input_ids, labels, the 2-D padding
    mask (what the token counts read), position_ids that restart at the context's end in every part, and
    segment_ids, from which the trainer builds the attention mask (`attention_mask`)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        batch = {k: torch.full((len(features), width), fill, dtype=torch.long)
                 for k, fill in (("input_ids", self.pad_token_id), ("labels", -100), ("attention_mask", 0),
                                 ("position_ids", 0), ("segment_ids", -1))}
        for r, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][r, :n] = torch.tensor(f["input_ids"])
            batch["labels"][r, :n] = torch.tensor(f["labels"])
            batch["attention_mask"][r, :n] = 1
            segments = f.get("segments") or [0, n]
            context, at = segments[0], segments[0]
            batch["position_ids"][r, :context] = torch.arange(context)
            batch["segment_ids"][r, :context] = 0
            for k, length in enumerate(segments[1:], start=1):
                batch["position_ids"][r, at:at + length] = torch.arange(context, context + length)
                batch["segment_ids"][r, at:at + length] = k
                at += length
        return batch


def longest_answer(completion_masks: list[list[int]]) -> int:
    """The most completion tokens of one answer in rows that may hold several (runs of 1 in each mask)."""
    longest = 0
    for mask in completion_masks:
        run = 0
        for bit in mask:
            run = run + 1 if bit else 0
            longest = max(longest, run)
    return longest
