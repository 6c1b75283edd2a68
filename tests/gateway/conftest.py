from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import policies
from tests.support.gateway import RunningGateway, reset_upstreams, run_gateway
from tests.support.policies import OFFLINE_LOCAL
from tests.support.upstream import FakeUpstream

# The policy of the gateway tests less its targets (write_policy adds them). Other tests edit
# its text (tests/ops/test_dashboard.py, test_reload_auth.py): mind them when changing a line.
POLICY = """
aliases:
  smart: cloud
  gpt-4o: auto
connectivity:
  probe_interval_s: 0.3
  probe_timeout_s: 0.5
  failures_to_offline: 3
  successes_to_online: 2
limits:
  max_body_bytes: 20000
  request_timeout_s: 8
  body_read_timeout_s: 1
  classify_budget_ms: 5000
""" + OFFLINE_LOCAL + """  - name: forbidden
    when: { header: { x-team: blocked-* } }
    block: { status: 403, message: "Team is not allowed." }
  - name: to-cloud
    when: { header: { x-route: cloud } }
    route: cloud
  - name: tools-cloud
    when: { has_tools: true }
    route: cloud
  - name: long-cloud
    when: { prompt_tokens: { gt: 200 } }
    route: cloud
    fallback: []
  - name: default
    route: local
"""


def write_policy(path: Path, cloud: FakeUpstream, local: FakeUpstream, text: str = POLICY,
                 cloud_settings: policies.Settings | None = None) -> Path:
    """The gateway tests' policy (or `text` in its place) with their cloud's retry settings, and
    `cloud_settings` over them."""
    return policies.write_policy(
        path, cloud, local, rest=text,
        cloud_settings={"timeout_s": 5, "retries": 1, "max_retry_after_s": 1, **(cloud_settings or {})},
    )


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream, local: FakeUpstream) -> Path:
    return write_policy(tmp_path_factory.mktemp("policy") / "policy.yaml", cloud, local)


@pytest.fixture(scope="module")
def gw(policy_file: Path) -> Iterator[RunningGateway]:
    with run_gateway(policy_file) as running:
        yield running


__all__ = ["reset_upstreams"]  # autouse (tests/support/gateway.py): each test starts with empty recordings
