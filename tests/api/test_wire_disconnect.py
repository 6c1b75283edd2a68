"""A client that hangs up mid-stream on /v1/messages or /v1/responses closes the upstream call at
once (not when the upstream's stall or the target's timeout ends)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.api.conftest import KEY
from tests.support.gateway import RunningGateway
from tests.support.tool_upstream import ToolStreamingUpstream
from tests.support.upstream import Fault

BODIES = {
    "/v1/messages": {"model": "auto", "max_tokens": 64, "stream": True,
                     "messages": [{"role": "user", "content": "a long answer"}]},
    "/v1/responses": {"model": "auto", "stream": True, "input": "a long answer"},
}


@pytest.mark.parametrize("path", list(BODIES))
def test_hanging_up_mid_stream_closes_the_upstream(gw: RunningGateway, cloud: ToolStreamingUpstream,
                                                   path: str) -> None:
    cloud.disconnects = 0
    # After two chunks the cloud goes silent for 6 s, watching its client (the gateway) meanwhile;
    # the target's own read timeout is 2 s.
    cloud.fault = Fault("silent_mid", seconds=6, after_chunks=2)
    with httpx.Client(base_url=gw.base_url, timeout=10, trust_env=False) as c, c.stream(
            "POST", path, json=BODIES[path], headers={"x-api-key": KEY, "x-route": "cloud"}) as r:
        assert r.status_code == 200
        next(r.iter_raw())
    left = time.monotonic()
    while cloud.disconnects == 0 and time.monotonic() - left < 5:
        time.sleep(0.02)
    assert cloud.disconnects == 1 and time.monotonic() - left < 1.5
