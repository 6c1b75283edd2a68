"""OpenTelemetry traces: the span tree of real requests through a real gateway (the SDK's
in-memory exporter), one real OTLP/HTTP export to a loopback receiver that decodes the protobuf,
and no raw PII in any span, attribute or exported byte."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.tracing import build_tracing, endpoint_from_env
from tests.privacy.bodies import PLANTED
from tests.support import policies
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream, Fault

PII = (PLANTED["email"], PLANTED["card"], PLANTED["person"], PLANTED["phone"])
PROMPT = f"Write to {PLANTED['person']} at {PLANTED['email']} about card {PLANTED['card']}, tel {PLANTED['phone']}."
STAGES = {"classify", "decide", "redact", "restore"}

REST = """
limits: {classify_budget_ms: 20000}
privacy: {analysis_budget_ms: 20000}
rules:
  - name: cloud-redacted
    route: cloud
    redact: true
    fallback: [local]
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream, local: FakeUpstream) -> Iterator[RunningGateway]:
    path = policies.write_policy(tmp_path_factory.mktemp("tracing") / "p.yaml", cloud, local, REST,
                                 cloud_settings={"timeout_s": 5, "retries": 0})
    with run_gateway(path) as running:
        yield running


@pytest.fixture
def spans(gw: RunningGateway, cloud: FakeUpstream) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    before = gw.state.tracing
    gw.state.tracing = build_tracing(None, exporter=exporter)
    yield exporter
    gw.state.tracing = before
    cloud.reset()


def sdk(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def tree(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, list[ReadableSpan]]:
    finished = exporter.get_finished_spans()
    roots = [s for s in finished if s.parent is None]
    assert len(roots) == 1, [s.name for s in finished]
    root = roots[0]
    children = [s for s in finished if s.parent is not None]
    for child in children:
        assert child.parent.span_id == root.context.span_id and child.context.trace_id == root.context.trace_id
    return root, children


def no_pii(exporter: InMemorySpanExporter) -> None:
    for span in exporter.get_finished_spans():
        text = span.to_json()
        for value in PII:
            assert value not in text, f"raw PII in span {span.name}"


def test_a_redacted_request_has_one_span_per_stage_with_genai_attributes(
        gw: RunningGateway, spans: InMemorySpanExporter, cloud: FakeUpstream) -> None:
    resp = sdk(gw).chat.completions.create(model="auto", max_tokens=50, temperature=0.2,
                                           messages=[{"role": "user", "content": PROMPT}])
    assert PII[0] in (resp.choices[0].message.content or "")  # restored for the client
    root, children = tree(spans)
    assert root.name == "POST /v1/chat/completions"
    assert root.kind.name == "SERVER"
    a = root.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "auto"
    assert a["gen_ai.request.max_tokens"] == 50 and a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.response.model"] == "cloud-model"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (5, 7)  # the upstream's usage
    assert a["hybrid.route"] == "cloud" and a["hybrid.rule"] == "cloud-redacted"
    assert a["http.response.status_code"] == 200 and a["hybrid.redactions"] >= 4
    assert "EMAIL_ADDRESS" in a["hybrid.entities"]
    names = [s.name for s in children]
    assert set(names) >= STAGES and names.count("chat cloud-model") == 1
    attempt = next(s for s in children if s.name == "chat cloud-model")
    assert attempt.kind.name == "CLIENT"
    assert attempt.attributes["gen_ai.provider.name"] == "openai"
    assert attempt.attributes["server.address"] == "127.0.0.1" and attempt.attributes["hybrid.target"] == "cloud"
    order = sorted(children, key=lambda s: s.start_time)
    assert [s.name for s in order] == ["classify", "decide", "redact", "chat cloud-model", "restore"]
    assert root.start_time <= order[0].start_time and order[-1].end_time <= root.end_time
    no_pii(spans)


def test_a_stream_and_a_fallback_are_traced_without_pii(gw: RunningGateway, spans: InMemorySpanExporter,
                                                        cloud: FakeUpstream) -> None:
    stream = sdk(gw).chat.completions.create(model="auto", stream=True,
                                             messages=[{"role": "user", "content": PROMPT}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert PII[1] in text
    root, children = tree(spans)
    assert root.attributes["hybrid.stream"] is True
    restore = next(s for s in children if s.name == "restore")
    assert restore.attributes["hybrid.stream"] is True
    no_pii(spans)

    spans.clear()
    cloud.once(Fault("status", status=500))
    resp = sdk(gw).chat.completions.create(model="auto", messages=[{"role": "user", "content": PROMPT}])
    assert resp.choices[0].message.content == "local answer"
    root, children = tree(spans)
    attempts = sorted((s for s in children if s.kind.name == "CLIENT"), key=lambda s: s.start_time)
    assert [s.attributes["hybrid.target"] for s in attempts] == ["cloud", "local"]
    assert attempts[0].status.status_code.name == "ERROR" and attempts[0].attributes["error.type"] == "status:500"
    assert attempts[1].status.status_code.name == "UNSET"
    assert root.attributes["hybrid.route"] == "local"
    assert root.attributes["hybrid.fallbacks"][0].startswith("cloud")
    no_pii(spans)

    spans.clear()
    with pytest.raises(openai.NotFoundError):
        sdk(gw).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": PROMPT}])
    root, children = tree(spans)
    assert root.attributes["http.response.status_code"] == 404 and children == []
    no_pii(spans)


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: decodes each ExportTraceServiceRequest it is sent."""

    requests: list[tuple[str, bytes]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.requests.append((self.path, body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()


def test_spans_are_exported_over_otlp_http_to_a_real_receiver(
        tmp_path: Path, cloud: FakeUpstream, local: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.server_address[1]}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-under-test")
    path = policies.write_policy(tmp_path / "p.yaml", cloud, local, REST)
    try:
        with run_gateway(path) as running:
            assert running.state.tracing is not None
            resp = sdk(running).chat.completions.create(model="auto", messages=[{"role": "user", "content": PROMPT}])
            assert PII[2] in (resp.choices[0].message.content or "")
        # Leaving the gateway flushed the batch.
        assert _Collector.requests and all(p == "/v1/traces" for p, _ in _Collector.requests)
        exported = []
        for _, raw in _Collector.requests:
            for value in PII:
                assert value.encode() not in raw, "raw PII in the OTLP export"
            req = ExportTraceServiceRequest()
            req.ParseFromString(raw)
            for rs in req.resource_spans:
                service = {kv.key: kv.value.string_value for kv in rs.resource.attributes}["service.name"]
                assert service == "gateway-under-test"
                for ss in rs.scope_spans:
                    exported += [(s.name, {kv.key: kv.value for kv in s.attributes}) for s in ss.spans]
        names = [n for n, _ in exported]
        assert "POST /v1/chat/completions" in names and set(names) >= STAGES and "chat cloud-model" in names
        root = dict(exported)["POST /v1/chat/completions"]
        assert root["gen_ai.request.model"].string_value == "auto"
        assert root["gen_ai.usage.output_tokens"].int_value == 7
    finally:
        collector.shutdown()
        collector.server_close()
        cloud.reset()


def test_off_by_default_and_the_sdk_is_never_imported() -> None:
    assert endpoint_from_env({}) is None and build_tracing(None) is None
    assert endpoint_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318/"}) == "http://h:4318/v1/traces"
    assert endpoint_from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h/t"}) == "http://h/t"
    assert endpoint_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h", "OTEL_SDK_DISABLED": "true"}) is None
    code = ("import sys, os\n"
            "for k in [k for k in os.environ if k.startswith('OTEL_')]: del os.environ[k]\n"
            "import gateway.app, gateway.pipeline, gateway.dispatch\n"
            "from gateway.state import Settings\n"
            "assert Settings(policy_path='p.yaml').otlp_endpoint is None\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
            "'opentelemetry.exporter')))))\n").replace("import sys, os", "import sys, os, json")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
