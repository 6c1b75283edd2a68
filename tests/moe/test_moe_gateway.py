"""A packed MoE behind the real gateway: its streaming stats on /metrics, and files released on close."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from local_engine.engine import Engine
from local_engine.formats.pack import read_manifest
from tests.moe.conftest import Tiny
from tests.support.gateway import run_gateway


def _fds_on(path: Path) -> int:
    """Open file descriptors of this process that point at ``path``."""
    target = str(path.resolve())
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                n += 1
        except OSError:  # closed between listdir and readlink
            pass
    return n


def _reader_threads() -> set[threading.Thread]:
    # Compared as sets, not counts: engines that earlier tests left to the garbage collector may
    # stop their own readers while this test runs.
    return {t for t in threading.enumerate() if t.name.startswith("expert-read")}


def _scrape(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_gateway_metrics_expose_moe_streaming_stats(tiny_models: dict[str, Tiny], tmp_path: Path) -> None:
    packed = tiny_models["qwen3_moe"].packed["none"]
    stride = read_manifest(packed).stride
    budget = 3 * stride  # a bit more than one layer's top-2: hits and misses both happen
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""version: 1
targets:
  local:
    kind: local
    engine: local_engine
    model_path: {packed}
    memory_budget: "{budget}"
    threads: 1
rules:
  - name: default
    route: local
""")
    experts = packed / "experts.bin"
    fds_before, threads_before = _fds_on(experts), _reader_threads()
    with run_gateway(policy) as gw, gw.client() as c:
        r = c.post("/v1/chat/completions", json={
            "model": "auto", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "w5 w17 w99 w3 w64 w8"}]})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        m = _scrape(c.get("/metrics").text)
        store = gw.state.runtime.backends["local"].engine.model.store
        assert _fds_on(experts) == fds_before + 1  # the store's O_DIRECT descriptor
        assert _reader_threads() - threads_before

    def one(name: str) -> float:
        series = m[name]
        assert list(series) == [(("target", "local"),)], series  # low cardinality: the target only
        return series[(("target", "local"),)]

    # the request's own numbers come back through /metrics
    assert one("hybrid_moe_prefill_tokens_total") == usage["prompt_tokens"]
    decode = one("hybrid_moe_decode_tokens_total")
    assert 1 <= decode == usage["completion_tokens"] - 1  # the first token comes from the prefill
    hits, misses = one("hybrid_moe_cache_hits_total"), one("hybrid_moe_cache_misses_total")
    assert hits > 0 and misses > 0
    assert one("hybrid_moe_cache_hit_ratio") == hits / (hits + misses)
    assert hits == store.cache.stats.hits and misses == store.cache.stats.misses
    # one read per miss not covered by a speculative read, plus every speculative read (the default
    # prefetch="auto" starts its first trial with a block of prefetching decode tokens)
    assert store.io.prefetch_reads == one("hybrid_moe_prefetch_reads_total")
    reads = misses - one("hybrid_moe_prefetch_used_total") + one("hybrid_moe_prefetch_reads_total")
    assert one("hybrid_moe_read_bytes_total") == reads * stride
    tokens = usage["prompt_tokens"] + decode
    assert abs(one("hybrid_moe_read_bytes_per_token") - reads * stride / tokens) < 1e-6 * stride
    assert one("hybrid_moe_decode_read_bytes_per_token") > 0
    assert one("hybrid_moe_read_bandwidth_bytes_per_second") > 0
    assert one("hybrid_moe_decode_tokens_per_second") > 0 and one("hybrid_moe_prefill_tokens_per_second") > 0
    assert one("hybrid_moe_io_wait_seconds_total") >= 0 and one("hybrid_moe_compute_seconds_total") > 0
    assert one("hybrid_moe_cache_budget_bytes") == budget
    assert 0 < one("hybrid_moe_cache_used_bytes") <= budget
    assert one("hybrid_moe_peak_rss_bytes") > 0
    # gateway shutdown closed the backend, which closed the engine: file and reader threads gone
    assert _fds_on(experts) == fds_before
    assert not _reader_threads() - threads_before


def test_engine_close_releases_the_expert_file_and_threads(tiny_models: dict[str, Tiny]) -> None:
    packed = tiny_models["mixtral"].packed["int8"]
    experts = packed / "experts.bin"
    fds_before, threads_before = _fds_on(experts), _reader_threads()
    eng = Engine.open(packed, memory_budget="unlimited", threads=1)
    list(eng.generate("w1 w2 w3", max_tokens=3, temperature=0))
    assert _fds_on(experts) == fds_before + 1 and _reader_threads() - threads_before
    eng.close()
    assert _fds_on(experts) == fds_before and not _reader_threads() - threads_before
    eng.close()  # idempotent: never closes a descriptor number something else reuses
    assert _fds_on(experts) == fds_before
