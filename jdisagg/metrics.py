"""Prometheus metrics of one engine, in their own registry so several engines (tests) never collide.

Names follow the conventions serving engineers already scrape from vLLM-style servers: seconds for
latencies, ``_total`` for counters, labels for the stage and the decode replica.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class EngineMetrics:
    """Every series the engine updates. ``registry`` is what an HTTP exporter serves."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "jdisagg_time_to_first_token_seconds",
            "Arrival to first token.",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            "jdisagg_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "jdisagg_inter_token_latency_seconds",
            "Time between consecutive tokens of a stream.",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.queue_time = Histogram(
            "jdisagg_queue_time_seconds", "Arrival to start of prefill.", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.e2e = Histogram(
            "jdisagg_e2e_request_latency_seconds", "Arrival to finish.", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.queue_depth = Gauge("jdisagg_queue_depth", "Requests waiting per stage.", ["stage"], registry=r)
        self.running = Gauge(
            "jdisagg_running_sequences", "Sequences in the decode batch.", ["replica"], registry=r
        )
        self.pages_used = Gauge("jdisagg_kv_pages_used", "KV pages in use.", ["replica"], registry=r)
        self.pages_total = Gauge("jdisagg_kv_pages_total", "KV pages in the pool.", ["replica"], registry=r)
        self.transfer_bytes = Counter(
            "jdisagg_kv_transfer_bytes", "KV bytes moved prefill -> decode.", registry=r
        )
        self.transfer_failures = Counter(
            "jdisagg_kv_transfer_failures", "KV hand-offs that failed (the request ended with an error).",
            registry=r,
        )
        self.transfer_seconds = Counter(
            "jdisagg_kv_transfer_seconds", "Time spent moving KV prefill -> decode.", registry=r
        )
        self.compilations = Gauge("jdisagg_compilations", "XLA compilations since start.", registry=r)
        self.requests = Counter("jdisagg_requests", "Finished requests by outcome.", ["outcome"], registry=r)
        self.preemptions = Counter(
            "jdisagg_preemptions", "Sequences preempted (recomputed) for lack of KV pages.", registry=r
        )
        self.prompt_tokens = Counter("jdisagg_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("jdisagg_generation_tokens", "Tokens generated.", registry=r)
