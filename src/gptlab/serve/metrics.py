"""What the server did and is doing, as Prometheus metrics at GET /metrics (and as JSON in /health).

One registry per app, so that several servers in one process (tests, notebooks) count apart. The
engine thread and the request handlers update the metrics; prometheus-client makes that thread-safe.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .schemas import ServerStats

OUTCOMES = ("completed", "failed", "cancelled", "rejected")
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gptlab_requests", "completion requests by how they ended: completed, failed "
                                "(a server error), cancelled (the client left), rejected (queue full)",
                                ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.in_flight = Gauge("gptlab_requests_in_flight", "completion requests being answered", registry=r)
        self.prompt_tokens = Counter("gptlab_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("gptlab_generation_tokens", "tokens generated, cancelled requests "
                                         "included", registry=r)
        self.steps = Counter("gptlab_engine_steps", "batched forward steps of the engine", registry=r)
        self.step_seconds = Histogram("gptlab_engine_step_seconds", "how long one engine step took (every running "
                                      "sequence's next token)", buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("gptlab_batch_size", "sequences advanced by one engine step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.running = Gauge("gptlab_running_sequences", "sequences in the batch", registry=r)
        self.queued = Gauge("gptlab_queue_length", "sequences waiting for a place in the batch", registry=r)
        self.kv_cache_bytes = Gauge("gptlab_kv_cache_bytes", "bytes the KV cache holds", registry=r)
        self.time_to_first_token = Histogram("gptlab_time_to_first_token_seconds", "from a request's arrival to "
                                             "its first generated token", buckets=_SECONDS, registry=r)
        self.request_seconds = Histogram("gptlab_request_seconds", "from a request's arrival to its answer's "
                                         "end", buckets=_SECONDS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def stats(self) -> ServerStats:
        def value(name: str, **labels: str) -> int:
            return int(self.registry.get_sample_value(name, labels) or 0)

        return ServerStats(
            requests_in_flight=value("gptlab_requests_in_flight"),
            completions=value("gptlab_requests_total", outcome="completed"),
            failures=value("gptlab_requests_total", outcome="failed"),
            cancelled=value("gptlab_requests_total", outcome="cancelled"),
            rejected=value("gptlab_requests_total", outcome="rejected"),
            completion_tokens=value("gptlab_generation_tokens_total"),
            steps=value("gptlab_engine_steps_total"),
            running=value("gptlab_running_sequences"),
            queued=value("gptlab_queue_length"),
        )
