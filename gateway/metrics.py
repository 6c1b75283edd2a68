"""Prometheus metrics. Labels are names chosen by the policy author, never request content."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


# Packed-MoE streaming stats (engine_backend puts them under stats()["moe"]): one family per
# quantity, labelled by target only. (metric name, kind, help, stats key or a function of the stats)
_MOE_METRICS: tuple[tuple[str, str, str, Any], ...] = (
    ("hybrid_moe_decode_tokens_per_second", "gauge", "MoE decode speed since load (tokens / decode seconds)",
     "decode_tok_s"),
    ("hybrid_moe_prefill_tokens_per_second", "gauge", "MoE prefill speed since load", "prefill_tok_s"),
    ("hybrid_moe_decode_tokens", "counter", "MoE decode steps", "decode_tokens"),
    ("hybrid_moe_prefill_tokens", "counter", "MoE prompt tokens prefilled", "prefill_tokens"),
    ("hybrid_moe_read_bytes", "counter", "Expert bytes read from disk", "store_bytes_read"),
    ("hybrid_moe_read_bytes_per_token", "gauge", "Expert bytes read per token (prefill + decode)",
     "bytes_read_per_token"),
    ("hybrid_moe_decode_read_bytes_per_token", "gauge", "Expert bytes read per decode token",
     "decode_bytes_read_per_token"),
    ("hybrid_moe_cache_hits", "counter", "Expert cache hits", "store_cache_hits"),
    ("hybrid_moe_cache_misses", "counter", "Expert cache misses (bundles read)", "store_cache_misses"),
    ("hybrid_moe_cache_hit_ratio", "gauge", "Expert cache hit rate since load", "hit_rate"),
    ("hybrid_moe_cache_budget_bytes", "gauge", "Expert cache budget", "store_cache_budget_bytes"),
    ("hybrid_moe_cache_used_bytes", "gauge", "Expert cache bytes held", "store_cache_used_bytes"),
    ("hybrid_moe_read_bandwidth_bytes_per_second", "gauge",
     "Expert read bandwidth (bytes / time with a read in flight)", "read_bandwidth_Bps"),
    ("hybrid_moe_io_wait_seconds", "counter", "Time the model waited for expert reads", "io_wait_s"),
    ("hybrid_moe_compute_seconds", "counter", "Model time not waiting for expert reads", "compute_s"),
    ("hybrid_moe_prefetch_reads", "counter", "Speculative next-layer expert reads", "store_prefetch_reads"),
    ("hybrid_moe_prefetch_used", "counter", "Speculative reads a request then used", "store_prefetch_used"),
    ("hybrid_moe_standin_uses", "counter", "Missed experts computed from their low-bit stand-in", "store_standin_uses"),
    ("hybrid_moe_peak_rss_bytes", "gauge", "Peak resident set size of the gateway process", "peak_rss_bytes"),
)

# Speculative decoding (engine_backend puts them under stats()["speculative"]), labelled by target.
_SPEC_METRICS: tuple[tuple[str, str, str, Any], ...] = (
    ("hybrid_speculative_drafted_tokens", "counter", "Draft tokens verified by the local engine", "drafted_tokens"),
    ("hybrid_speculative_accepted_tokens", "counter", "Draft tokens the verify accepted", "accepted_tokens"),
    ("hybrid_speculative_verifies", "counter", "Speculative verify forwards", "verifies"),
    ("hybrid_speculative_acceptance_ratio", "gauge", "Accepted / drafted tokens since load", "acceptance_rate"),
    ("hybrid_speculative_tokens_per_forward", "gauge", "Tokens decided per decode forward since load",
     "tokens_per_forward"),
)

# Continuous batching (engine_backend puts local_engine.scheduler's stats under stats()["serving"]).
_SERVING_METRICS: tuple[tuple[str, str, str, Any], ...] = (
    ("hybrid_engine_queue_depth", "gauge", "Requests waiting for a place in the engine's batch", "queue_depth"),
    ("hybrid_engine_active_sequences", "gauge", "Sequences in the engine (prefilling or decoding)",
     "active_sequences"),
    ("hybrid_engine_batch_size", "gauge", "Sequences in the engine's last decode step", "batch_size"),
    ("hybrid_engine_mean_batch_size", "gauge", "Decode tokens per decode step since load", "mean_batch_size"),
    ("hybrid_engine_decode_steps", "counter", "Batched decode steps", "decode_steps"),
    ("hybrid_engine_decode_tokens", "counter", "Tokens decoded (all sequences)", "decode_tokens"),
    ("hybrid_engine_prefill_chunks", "counter", "Prompt chunks prefilled", "prefill_chunks"),
    ("hybrid_engine_prefix_cache_hit_ratio", "gauge", "Prefix-cache hits / lookups since load",
     "prefix_cache_hit_ratio"),
)


def _ttft_family(stats: dict[str, dict[str, Any]]) -> Any:
    """Time to first token per request (the scheduler's buckets: cumulative counts, +Inf last)."""
    fam = HistogramMetricFamily("hybrid_engine_ttft_seconds",
                                "Local engine: time from a request's arrival to its first token", labels=["target"])
    for target, values in stats.items():
        t = values.get("serving", {}).get("ttft") if isinstance(values.get("serving"), dict) else None
        if not isinstance(t, dict):
            continue
        acc, buckets = 0, []
        for edge, n in zip([*t["buckets"], float("inf")], t["counts"], strict=True):
            acc += n
            buckets.append(("+Inf" if edge == float("inf") else repr(float(edge)), acc))
        fam.add_metric([target], buckets, float(t["sum"]))
    return fam


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
        yield from self._families(stats, "moe", _MOE_METRICS)
        yield from self._families(stats, "speculative", _SPEC_METRICS)
        yield from self._families(stats, "serving", _SERVING_METRICS)
        yield _ttft_family(stats)

    @staticmethod
    def _families(stats: dict[str, dict[str, Any]], part: str, table: tuple[tuple[str, str, str, Any], ...]) -> Any:
        """One family per row of ``table`` over each target's ``stats[target][part]`` dict."""
        parts = {t: v[part] for t, v in stats.items() if isinstance(v.get(part), dict)}
        if not parts:
            return
        for name, kind, doc, key in table:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = cls(name, doc, labels=["target"])
            for target, values in parts.items():
                value = values.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    fam.add_metric([target], float(value))
            yield fam


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # `endpoint`: the API path (/v1/chat/completions, /v1/messages, /v1/responses, /v1/embeddings),
        # a constant of the route's code, never the request's path: four values at most.
        self.requests = Counter(
            "hybrid_requests", "Requests, every endpoint", ["route", "rule", "status", "endpoint"], registry=r
        )
        self.latency = Histogram(
            "hybrid_request_duration_seconds",
            "Request latency (streams: until the last chunk)",
            ["route", "stream", "endpoint"],
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
        self.hedges = Counter(
            "hybrid_hedges", "Hedges started: a second target raced a route slow to its first token",
            ["source", "started"], registry=r,
        )
        self.hedge_wins = Counter("hybrid_hedge_wins", "Hedged requests, by the target that answered first",
                                  ["target"], registry=r)
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
