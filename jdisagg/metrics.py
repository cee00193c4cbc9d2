"""Prometheus metrics of one engine, in their own registry so several engines (tests) never collide.

Names follow the conventions serving engineers already scrape from vLLM-style servers: seconds for
latencies, ``_total`` for counters, labels for the stage and the decode replica, and a ``model_name`` label
on every series so several servers can feed one Prometheus and still be told apart.

Each attribute is already bound to this engine's ``model_name``: the engine calls ``observe``/``inc``/
``set`` on it directly, and ``labels(...)`` on a labelled one takes only the remaining labels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from jdisagg.prefill_cache import ChunkCache
    from jdisagg.scheduler import Scheduler

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
MODEL_LABEL = "model_name"


def model_name_of(model: object) -> str:
    """The default ``model_name``: a checkpoint directory's name, ``demo`` for the built-in model (None), a
    module's class name for a model passed in as an object."""
    if model is None:
        return "demo"
    if isinstance(model, str | os.PathLike):
        return Path(model).resolve().name
    return type(model).__name__


class _Labelled:
    """A labelled metric with ``model_name`` filled in: ``labels(replica)`` gives the child series."""

    def __init__(self, metric: Counter | Gauge, model_name: str) -> None:
        self._metric, self._model_name = metric, model_name

    def labels(self, *values: str) -> Counter | Gauge:
        return self._metric.labels(self._model_name, *values)


class _CountFromFunction(Collector):
    """A counter whose value a function reads at scrape time (``Counter`` itself can only be incremented).

    The compile count lives in a process-wide listener (``jdisagg.compile_counter``), not in the engine.
    """

    def __init__(self, name: str, documentation: str, model_name: str, read: Callable[[], float]) -> None:
        self._name, self._documentation = name, documentation
        self._model_name, self._read = model_name, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[MODEL_LABEL])
        family.add_metric([self._model_name], self._read())
        yield family


class EngineMetrics:
    """Every series the engine updates. ``registry`` is what an HTTP exporter serves.

    Args:
        model_name: the ``model_name`` label value: the served model name, else the checkpoint
            directory's name (``demo`` for the built-in model).
        compile_count: reads the process's XLA compilation count for ``jdisagg_compilations_total``.
    """

    def __init__(self, model_name: str, compile_count: Callable[[], float]) -> None:
        self.model_name = model_name
        r = self.registry = CollectorRegistry()
        label = [MODEL_LABEL]

        def histogram(name: str, documentation: str) -> Histogram:
            metric = Histogram(name, documentation, label, registry=r, buckets=_LATENCY_BUCKETS)
            return metric.labels(model_name)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, label, registry=r).labels(model_name)

        def by(kind: type[Counter] | type[Gauge], name: str, documentation: str, extra: str) -> _Labelled:
            return _Labelled(kind(name, documentation, [MODEL_LABEL, extra], registry=r), model_name)

        self.ttft = histogram("jdisagg_time_to_first_token_seconds", "Arrival to first token.")
        self.tpot = histogram(
            "jdisagg_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
        )
        self.itl = histogram(
            "jdisagg_inter_token_latency_seconds", "Time between consecutive tokens of a stream."
        )
        self.queue_time = histogram("jdisagg_queue_time_seconds", "Arrival to start of prefill.")
        self.e2e = histogram("jdisagg_e2e_request_latency_seconds", "Arrival to finish.")
        self.queue_depth = by(Gauge, "jdisagg_queue_depth", "Requests waiting per stage.", "stage")
        self.running = by(Gauge, "jdisagg_running_sequences", "Sequences in the decode batch.", "replica")
        self.pages_used = by(Gauge, "jdisagg_kv_pages_used", "KV pages in use.", "replica")
        self.pages_total = by(Gauge, "jdisagg_kv_pages_total", "KV pages in the pool.", "replica")
        self.pages_cached = by(
            Gauge, "jdisagg_kv_pages_cached", "KV pages in the prefix cache (held or evictable).", "replica"
        )
        self.pages_shared = by(
            Gauge, "jdisagg_kv_pages_shared", "KV pages held by several requests.", "replica"
        )
        self.transfer_bytes = counter("jdisagg_kv_transfer_bytes", "KV bytes moved prefill -> decode.")
        self.transfer_failures = counter(
            "jdisagg_kv_transfer_failures", "KV hand-offs that failed (the request ended with an error)."
        )
        self.transfer_seconds = counter(
            "jdisagg_kv_transfer_seconds", "Time spent moving KV prefill -> decode."
        )
        compilations = "XLA compilations in this process (none after warm-up)."
        r.register(_CountFromFunction("jdisagg_compilations", compilations, model_name, compile_count))
        self.requests = by(Counter, "jdisagg_requests", "Finished requests by outcome.", "outcome")
        self.live_workers = by(
            Gauge, "jdisagg_live_workers", "Prefill/decode replicas (workers) that can take work now.", "role"
        )
        self.preemptions = counter(
            "jdisagg_preemptions", "Sequences preempted (recomputed) for lack of KV pages."
        )
        self.prompt_tokens = counter("jdisagg_prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("jdisagg_generation_tokens", "Tokens generated.")
        # Exported from the start, zero until ``watch_prefill_caches`` (worker processes keep theirs).
        caches: list[ChunkCache] = []
        self._prefill_caches = caches
        for name, documentation, read in (
            ("jdisagg_prefill_cache_hit_tokens", "Prompt tokens a prefill replica took from its own cache "
             "instead of computing them.", lambda: sum(c.hit_tokens for c in caches)),
            ("jdisagg_prefill_cache_evictions", "Chunks evicted from the prefill replicas' caches.",
             lambda: sum(c.evictions for c in caches)),
        ):
            r.register(_CountFromFunction(name, documentation, model_name, read))
        self.prefill_cache_bytes = Gauge("jdisagg_prefill_cache_bytes", "KV bytes in the prefill replicas' "
                                         "caches.", label, registry=r).labels(model_name)
        self.prefill_cache_bytes.set_function(lambda: sum(c.bytes for c in caches))

    def watch_scheduler(self, scheduler: Scheduler) -> None:
        """The totals the scheduler keeps (prefix cache, where prompts were prefilled), read at scrape
        time."""
        c = scheduler.counters
        for name, documentation, read in (
            ("jdisagg_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache.",
             lambda: c.queried_tokens),
            ("jdisagg_prefix_cache_hit_tokens", "Prompt tokens whose KV the prefix cache held.",
             lambda: c.hit_tokens),
            ("jdisagg_prefix_cache_evictions", "Cached KV pages evicted for new allocations.",
             scheduler.evictions),
            ("jdisagg_local_prefills", "Prompts prefilled on their decode replica (no hand-off).",
             lambda: c.local_prefills),
            ("jdisagg_remote_prefills", "Prompts prefilled on a prefill replica and handed off.",
             lambda: c.remote_prefills),
            ("jdisagg_kv_transfer_tokens", "Prompt tokens whose KV was handed off prefill -> decode.",
             lambda: c.handoff_tokens),
        ):
            self.registry.register(_CountFromFunction(name, documentation, self.model_name, read))

    def watch_prefill_caches(self, caches: Sequence[ChunkCache]) -> None:
        """The prefill replicas' own prefix caches (``jdisagg.prefill_cache``), summed at scrape time."""
        self._prefill_caches.extend(caches)
