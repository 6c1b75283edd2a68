"""Chaos: clients keep sending while the cloud goes through every failure we know of.

One run (about 25 s): four client threads send an alternating mix of streamed and plain requests
through the real gateway (uvicorn on loopback) whose cloud target is a fake upstream cycling
through the fault schedule below, with a healthy local target as fallback. Claims checked:

* no request fails that the fallback could serve, streams broken after their first tokens
  included: the local target (`continues_answers`) writes the rest of the answer;
* the cloud is marked offline within about one probe interval of an outage, back online after
  recovery, and does not flap either way;
* no request takes longer than its deadline;
* no connection is left open: file descriptors return to their level before the run, and the
  fake cloud has no socket left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.harness import (
    DEADLINE_S,
    PROBE_INTERVAL_S,
    Driver,
    Result,
    Transitions,
    open_fds,
    write_chaos_policy,
)
from tests.support.gateway import run_gateway
from tests.support.upstream import FakeUpstream, Fault

pytestmark = pytest.mark.slow  # faults injected one after another against live gateways

MIDSTREAM_PHASES = {"stall_mid", "truncated_mid"}

# (phase name, fault on /chat/completions or None, seconds). Faults before the first token
# dominate: those are the ones a gateway can and must hide from the client.
FAULTS: list[tuple[str, Fault | None, float]] = [
    ("healthy", None, 0.8),
    ("status_500", Fault("status", status=500), 1.0),
    ("status_502", Fault("status", status=502), 1.0),
    ("status_503", Fault("status", status=503, retry_after="0"), 1.0),
    ("status_429", Fault("status", status=429, retry_after="0.2"), 1.0),  # retried once, then fallback
    ("reset", Fault("reset"), 1.0),
    ("invalid_json", Fault("invalid_json"), 1.0),
    ("stall_first", Fault("stall_first", seconds=1.5), 1.5),  # past the 1 s target timeout
    ("truncated_pre", Fault("truncated", after_chunks=0), 1.0),  # SSE cut before any token
    ("captive_chat", Fault("captive"), 1.0),
    ("healthy", None, 1.0),
    ("stall_mid", Fault("stall_mid", seconds=1.5, after_chunks=2), 0.5),
    ("truncated_mid", Fault("truncated", after_chunks=2), 0.5),
    ("healthy", None, 1.0),
]


def wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not reached within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - t0


def test_chaos_mixed_traffic_through_every_fault(tmp_path: Path) -> None:
    fds_before = open_fds()
    cloud = FakeUpstream(model="cloud-model", name="cloud").start()
    local = FakeUpstream(model="local-model", name="local", reply=lambda b: "local answer " * 3).start()
    cloud.chunk_chars = 3  # several chunks per answer, so mid-stream faults have tokens to cut
    transitions = Transitions()
    outages: list[dict[str, float | str]] = []
    phase = ["starting"]
    phase_log: list[tuple[float, str]] = [(time.monotonic(), "starting")]

    def set_phase(name: str) -> None:
        phase[0] = name
        phase_log.append((time.monotonic(), name))

    def phases_during(r: Result) -> set[str]:
        """Every phase active while the request ran: a stream sent in one phase can reach the
        upstream in the next, and outlive a short phase entirely."""
        end = r.started + r.seconds
        active = {name for t, name in phase_log if r.started <= t <= end}
        before = [name for t, name in phase_log if t < r.started]
        return active | set(before[-1:])

    try:
        with run_gateway(write_chaos_policy(tmp_path / "chaos.yaml", cloud, local)) as gw:
            monitor = gw.state.runtime.monitor
            monitor._on_change = transitions.wrap(monitor._on_change)
            wait_for(lambda: monitor.health["cloud"].probes >= 1, timeout=5)
            driver = Driver(gw.base_url, threads=4, pause_s=0.25, phase=lambda: phase[0])
            driver.start()

            def run_faults() -> None:
                for name, fault, seconds in FAULTS:
                    set_phase(name)
                    cloud.fault = fault
                    time.sleep(seconds)
                    cloud.fault = None

            def outage(name: str, begin: Callable[[], None], end: Callable[[], None], seconds: float) -> None:
                set_phase(name)
                t0 = time.monotonic()
                begin()
                to_offline = wait_for(lambda: monitor.state("cloud") == "offline", timeout=5)
                time.sleep(max(0.0, seconds - to_offline))
                t1 = time.monotonic()
                end()
                set_phase(name + "_recovery")
                to_online = wait_for(lambda: monitor.state("cloud") == "online", timeout=5)
                t2 = time.monotonic()
                time.sleep(1.0)  # healthy again: the state must stay put
                outages.append({"name": name, "t0": t0, "t1": t1, "t2": t2, "settled": time.monotonic(),
                                "to_offline": to_offline, "to_online": to_online})

            run_faults()
            outage("refused", cloud.stop, cloud.start, 2.0)  # connection refused, keep-alives dropped
            captive_everywhere = Fault("captive", paths=("/models", "/chat/completions"))
            outage("captive_all", lambda: setattr(cloud, "fault", captive_everywhere),
                   lambda: setattr(cloud, "fault", None), 1.5)
            set_phase("healthy_end")
            time.sleep(0.5)
            driver.stop()
            results = list(driver.results)
        # The gateway is stopped here: every connection it held must be gone.
        assert cloud._server is not None
        wait_for(lambda: not cloud._server.open_sockets and not local._server.open_sockets, timeout=5)
    finally:
        cloud.stop()
        local.stop()

    tally = driver.tally()
    streams = [r for r in results if r.stream]
    print(f"\nchaos: sent={len(results)} (streams={len(streams)}) primary={tally['primary']} "
          f"fallback={tally['fallback']} offline_rule={tally['offline_rule']} "
          f"resumed={tally['resumed']} midstream_error={tally['midstream_error']} failed={tally['failed']}")
    for o in outages:
        print(f"chaos: outage {o['name']}: offline after {o['to_offline']:.2f} s, "
              f"online {o['to_online']:.2f} s after recovery")
    print(f"chaos: connectivity transitions={len(transitions.events)}, "
          f"slowest request {max(r.seconds for r in results):.2f} s (deadline {DEADLINE_S} s)")

    # Enough traffic, and every path exercised.
    assert len(results) >= 100
    assert tally["primary"] >= 20 and tally["fallback"] >= 20 and tally["offline_rule"] >= 5

    # 1. Nothing lost that the fallback could serve.
    failed = [r for r in results if r.outcome == "failed"]
    assert not failed, [(r.phase_start, r.stream, r.status, r.ended, r.detail) for r in failed[:5]]

    # A stream cut after tokens is finished by the local target, in the same stream: no error
    # event reaches a client, and resumptions happen only where the schedule cuts streams.
    mid = [r for r in results if r.outcome == "midstream_error"]
    assert not mid, [(sorted(phases_during(r)), r.detail) for r in mid[:5]]
    resumed = [r for r in results if r.outcome == "resumed"]
    assert resumed, "the mid-stream fault phases produced no resumed stream"
    assert all(r.stream and phases_during(r) & MIDSTREAM_PHASES for r in resumed), \
        [sorted(phases_during(r)) for r in resumed]

    # Every fallback happened in a fault phase and says why.
    for r in results:
        if r.outcome == "fallback":
            assert r.fallback and r.fallback.startswith("cloud->local: ")

    # 2. Offline within about one probe interval (+ probe timeout), online after recovery, no flapping.
    for o in outages:
        assert o["to_offline"] <= PROBE_INTERVAL_S + 0.3 + 0.4, o
        assert o["to_online"] <= 3 * PROBE_INTERVAL_S + 0.6, o
        during = transitions.between(float(o["t0"]), float(o["t1"]))
        after = transitions.between(float(o["t1"]), float(o["settled"]))
        assert [s for _, s in during] == ["offline"], (o["name"], during)
        assert [s for _, s in after] == ["online"], (o["name"], after)

    # 3. Deadlines hold, for streams too (a stall mid-stream ends at the target timeout).
    slow = [r for r in results if r.seconds > DEADLINE_S + 0.5]
    assert not slow, [(r.phase_start, r.stream, round(r.seconds, 2)) for r in slow]

    # 4. No connection left hanging: descriptors back to where they were (sockets, pipes, epoll).
    wait_for(lambda: open_fds() <= fds_before + 2, timeout=5)
