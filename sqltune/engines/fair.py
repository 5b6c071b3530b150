"""A fair share of the engine for every client: rows are admitted round-robin across the requests
they belong to, and a running batch is preempted when a request that holds less than its share waits.

    waiting = FairQueue()
    waiting.add(row)                       # row.group: the HTTP request it belongs to (client_request)
    batch = waiting.take(capacity, running=[])

Without it, the transformers engine decoded one batch to its end before it looked at the queue, first
come first served: `n: 16, min_tokens: 1024` held every row for minutes and a plain /v1/sql behind it
waited for all of them (98 s instead of 0.45 s). Here the rows of one request (its n choices or
candidates) are one group; a batch takes one row from each waiting group in turn, and the engine
checks every few decode steps whether a group waits that has fewer rows than capacity / groups; if so
the batch ends there, its unfinished rows go back to the front of their groups with what they have
generated (re-read as prompt at their next turn, vLLM's "recompute" preemption), and the next batch
is formed round-robin again. vLLM's own scheduler does the same job for `--engine vllm`
(docs/serving.md).
"""

from __future__ import annotations

import contextvars
import itertools
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any, Protocol

# The request a generation belongs to: set per HTTP request by the server's gate, inherited by the tasks
# that fan its choices and candidates out. Offline callers (eval, ask) leave it unset: one row, one group.
client_request: contextvars.ContextVar[str | None] = contextvars.ContextVar("sqltune_client_request", default=None)
_solo = itertools.count()


def group_key() -> str:
    key = client_request.get()
    return key if key is not None else f"solo-{next(_solo)}"


class Row(Protocol):
    group: str

    def gone(self) -> bool: ...


class FairQueue:
    """Waiting rows per group, in arrival order of the groups; rows of one group in their own order."""

    def __init__(self) -> None:
        self.groups: OrderedDict[str, deque[Any]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(q) for q in self.groups.values())

    def add(self, row: Any, *, front: bool = False) -> None:
        q = self.groups.setdefault(row.group, deque())
        q.appendleft(row) if front else q.append(row)

    def requeue(self, rows: Sequence[Any]) -> None:
        """Preempted rows go back to the front of their groups, in their order."""
        for row in reversed(rows):
            self.add(row, front=True)

    def _prune(self) -> None:
        for key in list(self.groups):
            q = self.groups[key]
            while q and q[0].gone():
                q.popleft()
            self.groups[key] = deque(r for r in q if not r.gone())
            if not self.groups[key]:
                del self.groups[key]

    def take(self, capacity: int) -> list[Any]:
        """Up to `capacity` rows, one from each group in turn, the groups served in arrival order;
        a group served now moves to the back, so the next batch starts with the others."""
        self._prune()
        batch: list[Any] = []
        served: list[str] = []
        while len(batch) < capacity and self.groups:
            for key in list(self.groups):
                if len(batch) >= capacity:
                    break
                q = self.groups[key]
                batch.append(q.popleft())
                if key not in served:
                    served.append(key)
                if not q:
                    del self.groups[key]
        for key in served:  # round-robin across batches too
            if key in self.groups:
                self.groups.move_to_end(key)
        return batch

    def starved(self, running: Sequence[Any], capacity: int) -> bool:
        """Whether to end the running batch for the waiting rows: a request holds more than its share of the
        capacity (capacity / the requests running or waiting) while a waiting one holds less, or half the
        batch's rows are free. A preempted row re-reads its prompt and text at its next turn, a prefill that
        costs as much as hundreds of decode steps of the batch, so rows that hold no more than their share
        are never swapped for others (an eval of 200 one-row requests would otherwise recompute its batch
        every few steps), and a few free slots wait for the batch to end as before."""
        self._prune()
        if not self.groups:
            return False
        if len(running) <= capacity // 2:
            return True
        held: dict[str, int] = {}
        for row in running:
            held[row.group] = held.get(row.group, 0) + 1
        share = max(1, capacity // len(set(held) | set(self.groups)))
        return any(n > share for n in held.values()) and any(held.get(key, 0) < share for key in self.groups)


class SlotShares:
    """Admission to an engine with a fixed number of slots and no preemption (llama.cpp's server loop): a request
    takes a slot only while it holds fewer than its share (capacity / the requests holding or waiting for slots,
    and never more than half the slots while others may come), so a request's n choices or candidates leave slots
    for the next client instead of queueing it behind all of them. Rows wait here, not in a slot."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self._cond: Any = None

    def _share(self) -> int:
        groups = len(set(self.held) | set(self.waiting))
        cap = self.capacity if self.capacity == 1 else max(1, self.capacity // 2)
        return max(1, min(cap, self.capacity // max(1, groups)))

    async def acquire(self, group: str) -> None:
        import asyncio

        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            self.waiting[group] = self.waiting.get(group, 0) + 1
            try:
                await self._cond.wait_for(lambda: sum(self.held.values()) < self.capacity
                                          and self.held.get(group, 0) < self._share())
            finally:
                self.waiting[group] -= 1
                if not self.waiting[group]:
                    del self.waiting[group]
            self.held[group] = self.held.get(group, 0) + 1

    async def release(self, group: str) -> None:
        async with self._cond:
            self.held[group] -= 1
            if not self.held[group]:
                del self.held[group]
            self._cond.notify_all()
