"""Prometheus metrics. Labels are names chosen by the policy author, never request content."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _EngineCollector:
    """Reads engine stats at scrape time, so the hot path pays nothing for them."""

    def __init__(self, source: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._source = source

    def collect(self) -> Any:
        fam = GaugeMetricFamily("hybrid_engine_stat", "Local engine statistics", labels=["target", "stat"])
        try:
            stats = self._source()
        except Exception:
            stats = {}
        for target, values in stats.items():
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    fam.add_metric([target, key], float(value))
        yield fam


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hybrid_requests", "Chat completion requests", ["route", "rule", "status"], registry=r
        )
        self.latency = Histogram(
            "hybrid_request_duration_seconds",
            "Request latency (streams: until the last chunk)",
            ["route", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "hybrid_time_to_first_chunk_seconds", "Streams: time to first chunk", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.fallbacks = Counter(
            "hybrid_fallbacks", "Fallbacks taken", ["source", "to", "reason"], registry=r
        )
        self.redactions = Counter(
            "hybrid_redactions", "Values redacted before a cloud call", ["entity_type"], registry=r
        )
        self.tokens = Counter("hybrid_tokens", "Tokens by route and kind", ["route", "kind"], registry=r)
        self.connectivity = Gauge(
            "hybrid_target_online", "1 when the cloud target is considered online", ["target"], registry=r
        )
        self.classify_seconds = Histogram(
            "hybrid_classify_seconds", "Classifier latency", ["classifier"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.policy_reloads = Counter("hybrid_policy_reloads", "Policy reloads", ["result"], registry=r)

    def watch_engines(self, source: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.registry.register(_EngineCollector(source))

    def set_connectivity(self, target: str, state: str) -> None:
        self.connectivity.labels(target).set(1 if state == "online" else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
