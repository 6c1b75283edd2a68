"""Shared pieces of the chaos and soak runs: the policy, a traffic driver, and an outcome tally.

The driver speaks raw HTTP (httpx) and parses the SSE itself, so it sees exactly what a client
sees: status, routing headers, how far a stream got, and whether it ended with `[DONE]`, with an
error event, or not at all.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

from tests.support.policies import write_policy
from tests.support.upstream import FakeUpstream, Fault

# Small timeouts (these and the targets' in write_chaos_policy) so every fault resolves in about a
# second; hysteresis as shipped (3 down, 2 up).
# Classification is switched off (heuristic difficulty, no presidio): this suite is about transport.
CHAOS_POLICY = """
connectivity:
  probe_interval_s: {probe}
  probe_timeout_s: 0.3
  failures_to_offline: 3
  successes_to_online: 2
limits:
  request_timeout_s: {deadline}
  body_read_timeout_s: 2
  classify_budget_ms: 200
privacy:
  enabled: false
difficulty:
  method: heuristic
defaults:
  fallback: [local]
rules:
  - name: offline
    when: {{ connectivity: offline }}
    route: local
  - name: default
    route: cloud
"""

PROBE_INTERVAL_S = 0.3
DEADLINE_S = 4.0


def write_chaos_policy(path: Path, cloud: FakeUpstream, local: FakeUpstream) -> Path:
    return write_policy(
        path, cloud, local, rest=CHAOS_POLICY.format(probe=PROBE_INTERVAL_S, deadline=DEADLINE_S),
        cloud_settings={"timeout_s": 1, "retries": 1, "max_retry_after_s": 0.5},
        # continues_answers: a cloud stream broken after its first tokens is finished here.
        local_settings={"timeout_s": 3, "continues_answers": True},
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Result:
    stream: bool
    status: int
    route: str | None
    fallback: str | None
    rule: str | None
    seconds: float
    phase_start: str
    phase_end: str
    tokens: int = 0
    ended: str = "ok"  # ok | error_event | status | exception | no_done
    detail: str = ""
    started: float = 0.0  # time.monotonic() when the request was sent
    resumed: bool = False  # the cloud's stream broke and the local target wrote the rest

    @property
    def outcome(self) -> str:
        if self.ended == "error_event":
            return "midstream_error"
        if self.ended != "ok":
            return "failed"
        if self.route == "cloud":
            return "resumed" if self.resumed else "primary"
        if self.fallback:
            return "fallback"
        return "offline_rule"  # already known offline: routed to local directly, no fallback needed


def _stream(client: httpx.Client, body: dict) -> tuple[int, dict, int, str, str, str]:
    tokens, text = 0, []
    with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, dict(resp.headers), 0, "status", resp.text[:200], ""
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return 200, dict(resp.headers), tokens, "ok", "", "".join(text)
            chunk = orjson.loads(data)
            if "error" in chunk:
                return 200, dict(resp.headers), tokens, "error_event", chunk["error"].get("message", ""), ""
            for choice in chunk.get("choices") or []:
                if content := (choice.get("delta") or {}).get("content"):
                    tokens += 1
                    text.append(content)
        return 200, dict(resp.headers), tokens, "no_done", "stream closed without [DONE]", ""


def one_request(client: httpx.Client, i: int, stream: bool, phase: Callable[[], str]) -> Result:
    body = {"model": "auto", "stream": stream,
            "messages": [{"role": "user", "content": f"request {i}: tell me a short story please"}]}
    start_phase = phase()
    t0 = time.monotonic()
    text = ""
    try:
        if stream:
            status, headers, tokens, ended, detail, text = _stream(client, body)
        else:
            resp = client.post("/v1/chat/completions", json=body)
            status, headers, tokens = resp.status_code, dict(resp.headers), 0
            ended, detail = ("ok", "") if status == 200 else ("status", resp.text[:200])
            if status == 200 and not resp.json()["choices"][0]["message"]["content"]:
                ended, detail = "status", "empty answer"
    except httpx.HTTPError as exc:
        status, headers, tokens, ended, detail = 0, {}, 0, "exception", repr(exc)
    return Result(stream=stream, status=status, route=headers.get("x-hybrid-route"),
                  fallback=headers.get("x-hybrid-fallback"), rule=headers.get("x-hybrid-rule"),
                  seconds=time.monotonic() - t0, phase_start=start_phase, phase_end=phase(), tokens=tokens,
                  ended=ended, detail=detail, started=t0,
                  resumed=headers.get("x-hybrid-route") == "cloud" and "local answer" in text)


@dataclass
class Driver:
    """A few client threads sending a bounded, alternating mix of streamed and plain requests."""

    base_url: str
    threads: int = 4
    pause_s: float = 0.02
    phase: Callable[[], str] = lambda: "-"
    results: list[Result] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _counter: int = 0
    _workers: list[threading.Thread] = field(default_factory=list)

    def _next(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def _work(self, limit: int | None) -> None:
        # Client timeout well past the gateway's deadline: if the gateway hangs, we see it as slow.
        with httpx.Client(base_url=self.base_url, timeout=DEADLINE_S * 3, trust_env=False) as client:
            while not self._stop.is_set():
                i = self._next()
                if limit is not None and i > limit:
                    return
                r = one_request(client, i, stream=bool(i % 2), phase=self.phase)
                with self._lock:
                    self.results.append(r)
                time.sleep(self.pause_s)

    def start(self, limit: int | None = None) -> None:
        for n in range(self.threads):
            t = threading.Thread(target=self._work, args=(limit,), daemon=True, name=f"chaos-client-{n}")
            t.start()
            self._workers.append(t)

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._workers), "a client thread is stuck (hung connection)"

    def tally(self) -> Counter[str]:
        with self._lock:
            return Counter(r.outcome for r in self.results)


class Transitions:
    """Records every connectivity change the monitor reports, with a timestamp."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []

    def wrap(self, inner: Callable[[str, str], None] | None) -> Callable[[str, str], None]:
        def on_change(target: str, state: str) -> None:
            self.events.append((time.monotonic(), target, state))
            if inner:
                inner(target, state)
        return on_change

    def between(self, t0: float, t1: float, target: str = "cloud") -> list[tuple[float, str]]:
        return [(t, s) for t, tgt, s in self.events if tgt == target and t0 <= t <= t1]


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class SoakReport:
    seconds: float
    tally: Counter[str]
    samples: list[tuple[float, float, int]]  # (t, rss MB, fds)
    warmup_s: float
    outages: int
    slowest_s: float
    failures: list[Result] = field(default_factory=list)

    def _after_warmup(self) -> list[tuple[float, float, int]]:
        return [s for s in self.samples if s[0] >= self.warmup_s] or self.samples[-1:]

    @property
    def rss_start(self) -> float:
        first = self._after_warmup()[:3]
        return sorted(s[1] for s in first)[len(first) // 2]

    @property
    def rss_end(self) -> float:
        last = self._after_warmup()[-3:]
        return sorted(s[1] for s in last)[len(last) // 2]

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_start) / self.rss_start

    @property
    def fds_start(self) -> int:
        return self._after_warmup()[0][2]

    @property
    def fds_max(self) -> int:
        return max(s[2] for s in self._after_warmup())

    def lines(self) -> list[str]:
        t = self.tally
        sent = sum(t.values())
        return [
            f"soak: {self.seconds:.0f} s, {self.outages} cloud outages, warm-up {self.warmup_s:.0f} s",
            f"soak: sent={sent} primary={t['primary']} fallback={t['fallback']} offline_rule={t['offline_rule']} "
            f"resumed={t['resumed']} midstream_error={t['midstream_error']} failed={t['failed']}; "
            f"slowest {self.slowest_s:.2f} s",
            f"soak: RSS after warm-up {self.rss_start:.1f} MB -> end {self.rss_end:.1f} MB "
            f"({100 * self.rss_growth:+.1f}%), peak {max(s[1] for s in self.samples):.1f} MB",
            f"soak: open fds after warm-up {self.fds_start}, max {self.fds_max}, "
            f"end {self.samples[-1][2]} ({len(self.samples)} samples)",
            *(f"soak: failed: phase {r.phase_start}->{r.phase_end} stream={r.stream} status={r.status} "
              f"{r.ended}: {r.detail[:160]}" for r in self.failures[:10]),
        ]


def soak(base_url: str, pid: int, cloud: FakeUpstream, *, seconds: float, warmup_s: float,
         outage_every_s: float, outage_s: float, sample_every_s: float, threads: int = 4,
         pause_s: float = 0.02, log: Callable[[str], None] | None = None) -> SoakReport:
    """Mixed streaming load for `seconds`, the cloud killed for `outage_s` every `outage_every_s`
    (connection refused), with a blip of 502s between outages; RSS and fds of `pid` sampled."""
    phase = ["healthy"]
    driver = Driver(base_url, threads=threads, pause_s=pause_s, phase=lambda: phase[0])
    samples: list[tuple[float, float, int]] = []
    t0 = time.monotonic()
    next_sample, next_outage = t0, t0 + outage_every_s
    outages = 0
    driver.start()
    try:
        while (now := time.monotonic()) - t0 < seconds:
            if now >= next_sample:
                samples.append((now - t0, proc_rss_mb(pid), proc_fds(pid)))
                if log:
                    log(f"  t={now - t0:6.0f}s rss={samples[-1][1]:.1f} MB fds={samples[-1][2]} "
                        f"requests={len(driver.results)}")
                next_sample += sample_every_s
            if now >= next_outage and now - t0 + outage_s < seconds:
                outages += 1
                phase[0] = "outage"
                cloud.stop()
                time.sleep(outage_s)
                cloud.start()
                phase[0] = "blip"
                cloud.fault = Fault("status", status=502)
                time.sleep(min(0.5, outage_s))
                cloud.fault = None
                phase[0] = "healthy"
                next_outage = time.monotonic() + outage_every_s
            time.sleep(0.05)
    finally:
        driver.stop()
    time.sleep(1.0)  # let keep-alive connections settle before the last sample
    samples.append((time.monotonic() - t0, proc_rss_mb(pid), proc_fds(pid)))
    results = list(driver.results)
    return SoakReport(seconds=time.monotonic() - t0, tally=driver.tally(), samples=samples, warmup_s=warmup_s,
                      outages=outages, slowest_s=max((r.seconds for r in results), default=0.0),
                      failures=[r for r in results if r.outcome == "failed"])
