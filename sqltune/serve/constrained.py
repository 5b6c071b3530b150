"""Constrained decoding at the edge of the server: which grammar a request decodes under, and why
none when a mode was asked for but cannot apply.

    POST /v1/sql {"question": ..., "context": ..., "constrain": "schema"}      # or the server's --constrain
    client.completions.create(..., extra_body={"constrain": "schema", "context": "CREATE TABLE ..."})

Building the grammar reads the schema and the engine compiles it (tens of milliseconds on a cold
cache), so both run on a daemon thread, never on the event loop, and at most BUILDS_AT_ONCE at a time.
What goes in is capped before the build (sqltune.constrain), and the build runs inside the request's
deadline: past min(BUILD_TIMEOUT_S, the time the request has left) the request stops waiting and
decodes unconstrained. Whatever goes wrong here (no schema, input past the caps, a slow build, a
grammar the engine refuses, an engine without constrained decoding) falls back to free decoding with
`constrained: false` and the reason; it never fails the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sqltune import constrain, logs
from sqltune.constrain import Constraint
from sqltune.serve.deps import in_thread
from sqltune.serve.service import time_left

log = logs.get("serve.constrain")
BUILD_TIMEOUT_S = 10.0  # under the caps a build takes well under a second; this is the backstop


def _build(engine: Any, mode: str, question: str, context: str) -> Constraint:
    constraint = constrain.build(mode, question, context)
    if not constraint.constrained:
        return constraint
    prepare = getattr(engine, "prepare_grammar", None)
    if prepare is None:
        return constraint.without(f"the {engine.name} engine has no constrained decoding; decoded unconstrained")
    try:
        prepare(constraint.grammar)
    except constrain.GrammarError as e:
        return constraint.without(f"{e}; decoded unconstrained")
    return constraint


async def constrain_for(service: Any, mode: str, question: str, context: str) -> Constraint:
    """The constraint of one request (mode "off" costs nothing)."""
    if mode == "off":
        return Constraint("off")
    budget = min(BUILD_TIMEOUT_S, time_left(service.cfg.request_timeout))
    try:
        async with asyncio.timeout(budget):
            async with service.builds:
                constraint = await in_thread(_build, service.engine, mode, question, context)
    except TimeoutError:
        constraint = Constraint(mode, "", f"no grammar: building it took longer than {budget:.2g}s; "
                                "decoded unconstrained")
    if constraint.reason:
        logs.event(log, "constrained decoding fell back", mode=mode, reason=constraint.reason, level=30)
    return constraint


def response_fields(constraint: Constraint, completion_tokens: Sequence[int] = (), max_tokens: int = 0
                    ) -> dict[str, Any]:
    """What an OpenAI-shaped response adds when the request asked for a constraint: the mode, whether
    it applied and why not, and the most tokens past max_tokens a choice took to close its query."""
    if constraint.mode == "off":
        return {}
    extra = max([0, *(n - max_tokens for n in completion_tokens)]) if max_tokens else 0
    return {"constrain": constraint.mode, "constrained": constraint.constrained, "reason": constraint.reason or None,
            "extra_tokens": extra}
