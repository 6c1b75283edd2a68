"""Targets served through litellm (every provider that is not called directly) against a real loopback server."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest

from gateway.backends.base import BackendError, CallOptions
from gateway.backends.litellm_backend import LitellmBackend
from tests.gateway.conftest import write_policy
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream, Fault


@pytest.fixture(scope="module")
def gw_litellm(tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream, local: FakeUpstream) -> Iterator[RunningGateway]:
    path = write_policy(tmp_path_factory.mktemp("lite") / "p.yaml", cloud, local, cloud_settings={"client": "litellm"})
    with run_gateway(path) as gw:
        yield gw


def sdk(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0)


def test_litellm_non_stream_and_stream(gw_litellm: RunningGateway, cloud: FakeUpstream):
    assert type(gw_litellm.state.runtime.backends["cloud"]).__name__ == "LitellmBackend"
    raw = sdk(gw_litellm).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "via litellm"}], extra_headers={"x-route": "cloud"},
        temperature=0.3,
    )
    assert raw.headers["x-hybrid-route"] == "cloud"
    assert raw.parse().choices[0].message.content == "echo: via litellm"
    assert cloud.received[-1]["model"] == "cloud-model" and cloud.received[-1]["temperature"] == 0.3
    assert {k.lower(): v for k, v in cloud.received_headers[-1].items()}["authorization"] == "Bearer sk-test-cloud"
    chunks = list(sdk(gw_litellm).chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "streamed"}], stream=True, extra_headers={"x-route": "cloud"}
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: streamed"


def test_litellm_failure_falls_back(gw_litellm: RunningGateway, cloud: FakeUpstream):
    cloud.fault = Fault("status", status=503)
    raw = sdk(gw_litellm).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "x"}], extra_headers={"x-route": "cloud"}
    )
    assert raw.headers["x-hybrid-route"] == "local"
    assert raw.headers["x-hybrid-fallback"] == "cloud->local: status:503"


async def test_litellm_error_mapping(cloud: FakeUpstream):
    backend = LitellmBackend("c", model="openai/cloud-model", api_base=cloud.base_url, api_key="k", timeout_s=5)
    opts = CallOptions(deadline=time.monotonic() + 10)
    cloud.fault = Fault("status", status=429, retry_after="3")
    with pytest.raises(BackendError) as exc:
        await backend.complete({"messages": [{"role": "user", "content": "x"}]}, opts)
    assert exc.value.kind == "status" and exc.value.status == 429 and exc.value.retryable
    cloud.fault = Fault("status", status=400)
    with pytest.raises(BackendError) as exc:
        await backend.complete({"messages": [{"role": "user", "content": "x"}]}, opts)
    assert exc.value.kind == "invalid" and not exc.value.retryable
    cloud.fault = None
    dead = LitellmBackend("d", model="openai/m", api_base="http://127.0.0.1:9/v1", api_key="k", timeout_s=2)
    with pytest.raises(BackendError) as exc:
        await dead.complete({"messages": [{"role": "user", "content": "x"}]}, opts)
    assert exc.value.kind == "connect"
