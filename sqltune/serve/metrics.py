"""Prometheus metrics of one app, in a registry of its own (two apps in one process never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sqltune_requests", "HTTP requests by route and status.", ["route", "status"],
                                registry=r)
        self.latency = Histogram("sqltune_request_duration_seconds", "Time from request to last byte.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("sqltune_time_to_first_token_seconds", "Time from admission to first token.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("sqltune_queue_depth", "Sequences admitted but waiting for a generation slot.",
                                 registry=r)
        self.in_flight = Gauge("sqltune_sequences_in_flight", "Sequences admitted and not finished.", registry=r)
        self.rejected = Counter("sqltune_rejected", "Requests refused before generation, by reason.", ["reason"],
                                registry=r)
        self.prompt_tokens = Counter("sqltune_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("sqltune_generation_tokens", "Completion tokens generated.", registry=r)
        self.batch_size = Histogram("sqltune_batch_size", "Sequences decoded together per engine batch.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.ready = Gauge("sqltune_ready", "1 once the model is loaded and warmed up.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
