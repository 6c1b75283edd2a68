"""The CI variant of benchmarks/soak.py: 20 s of mixed streaming load with two cloud outages.

Too short to see a slow leak (the full soak runs 10 minutes); it catches the fast ones: a
connection, task or buffer kept per request or per outage shows up as fds or RSS that climb.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.chaos.harness import DEADLINE_S, soak, write_chaos_policy
from tests.support.gateway import run_gateway
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.slow  # a soak: sustained load for its own duration


def test_short_soak_no_failures_flat_fds_bounded_rss(tmp_path: Path) -> None:
    with FakeUpstream(model="cloud-model", name="cloud") as cloud, \
            FakeUpstream(model="local-model", name="local", reply=lambda b: "local answer " * 3) as local, \
            run_gateway(write_chaos_policy(tmp_path / "soak.yaml", cloud, local)) as gw:
        # The gateway runs in this process: RSS and fds are the whole test process's, an upper bound.
        report = soak(gw.base_url, os.getpid(), cloud, seconds=20, warmup_s=6, outage_every_s=6, outage_s=1.5,
                      sample_every_s=1.0, threads=4, pause_s=0.01)
    print("\n" + "\n".join(report.lines()))
    assert report.outages >= 2
    assert sum(report.tally.values()) >= 300
    assert report.tally["failed"] == 0, report.tally
    assert report.slowest_s <= DEADLINE_S + 0.5
    assert report.fds_max <= report.fds_start + 15, report.samples
    # The fakes keep every request body: allow for that, and still catch a per-request leak of
    # the size of a response or a connection (hundreds of requests x tens of KB).
    assert report.rss_growth <= 0.10, report.samples
