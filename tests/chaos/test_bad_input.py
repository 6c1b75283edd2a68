"""Bad input: fuzz the HTTP API from its own OpenAPI schema, plus hostile hand-written requests.

Every answer must be < 500, in OpenAI's error shape when it is an error, and never a stack trace.
Cases already covered by tests/gateway/test_api.py (plain malformed JSON, top-level invalid UTF-8,
one stalled body, unknown model, body over the limit) are not repeated here.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.support.gateway import RunningGateway, run_gateway
from tests.support.policies import OFFLINE_LOCAL, write_policy
from tests.support.upstream import FakeUpstream


def _load_schemathesis_now() -> None:
    """Import the modules schemathesis loads lazily while this module is collected, before any test.

    pytest rewrites the modules of a pytest plugin's distribution as they are imported. CPython
    3.11.7 leaves the AST constructor's recursion counter off after a RecursionError somewhere in
    the process, and a later rewrite then fails with "SystemError: AST constructor recursion depth
    mismatch": which test ran before the fuzzer decided whether it failed.
    """
    import schemathesis.transport.requests  # what case.call uses

    tiny = {"openapi": "3.0.0", "info": {"title": "warm-up", "version": "1"}, "paths": {"/x": {"post": {
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"a": {"type": "string"}}}}}},
        "responses": {"200": {"description": "ok"}}}}}}
    op = next(iter(schemathesis.openapi.from_dict(tiny).get_all_operations())).ok()
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
        @settings(max_examples=1, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        @given(case=op.as_strategy(generation_mode=mode))
        def draw(case: schemathesis.Case) -> None:
            pass

        draw()


_load_schemathesis_now()

# A real privacy pipeline (presidio) sees the fuzzed bodies: it walks every message part, so it is
# where odd shapes would crash. Difficulty uses the cheap heuristic to keep the budget.
POLICY = """
connectivity:
  probe_interval_s: 1
limits:
  max_body_bytes: 4000000
  request_timeout_s: 20
  body_read_timeout_s: 1
  classify_budget_ms: 5000
difficulty:
  method: heuristic
""" + OFFLINE_LOCAL + """  - name: to-cloud
    when: { header: { x-route: cloud } }
    route: cloud
  - name: default
    route: local
"""


class TolerantUpstream(FakeUpstream):
    """The fake upstream builds tool calls from `tools[0]`; a fuzzed but schema-valid `tools`
    would crash its handler (a dropped connection, so a 503 from us). Answer plainly instead:
    the fuzz is aimed at the gateway, not at the test double."""

    def completion(self, body: dict, reply: str) -> dict:
        try:
            return super().completion(body, reply)
        except (KeyError, IndexError, TypeError, AttributeError):
            return super().completion({}, reply)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with TolerantUpstream(model="cloud-model", name="cloud") as cloud, \
            TolerantUpstream(model="local-model", name="local") as local:
        yield cloud, local


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstreams: tuple[FakeUpstream, FakeUpstream]) -> Iterator[RunningGateway]:
    cloud, local = upstreams
    with run_gateway(write_policy(tmp_path_factory.mktemp("bad") / "policy.yaml", cloud, local, POLICY)) as running:
        yield running


def assert_clean(resp: httpx.Response | object, status: int, text: str, anthropic: bool = False) -> None:
    """No 5xx, no trace; an error has exactly OpenAI's shape (Anthropic's on its own API)."""
    assert status < 500, (status, text[:300])
    assert "Traceback" not in text and 'File "' not in text, text[:300]
    if status >= 400 and anthropic:
        body = json.loads(text)
        assert set(body) == {"type", "error", "request_id"} and body["type"] == "error", body  # as published
        assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body
    elif status >= 400:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]


# --- schema-driven fuzzing ------------------------------------------------------------------

# The operations the schema must expose: a new endpoint makes this test fail until it is added
# here, so nothing escapes the fuzzer unnoticed.
OPERATIONS = {
    "POST /v1/chat/completions", "POST /v1/route/explain", "POST /v1/messages", "POST /v1/responses",
    "POST /v1/embeddings", "GET /v1/models", "GET /healthz", "GET /readyz",
    "GET /metrics", "GET /admin/connectivity", "POST /admin/connectivity", "GET /dashboard/data",
    "GET /v1/usage", "GET /admin/usage", "POST /admin/reload", "GET /v1/deferred/{job_id}",
    "GET /v1/responses/{job_id}",
}
BODYLESS_POSTS = {"POST /admin/reload"}  # re-reads the policy file: nothing to send
EXAMPLES_PER_MODE = 15
ADMIN = {"authorization": "Bearer admin-secret"}  # so the admin operations get past auth to their bodies


def refs(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def resolves(spec: dict, ref: str) -> bool:
    node: object = spec
    for part in ref.removeprefix("#/").split("/"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_openapi_refs_resolve(gw: RunningGateway) -> None:
    # An unresolvable ref (it was `#/$defs/Message`) makes schemathesis silently drop the body.
    with gw.client() as c:
        spec = c.get("/openapi.json").json()
    dangling = sorted(r for r in refs(spec) if not resolves(spec, r))
    assert not dangling, dangling


def test_openapi_fuzz_no_5xx_openai_errors(gw: RunningGateway) -> None:
    # schemathesis' pytest loader (`from_fixture`) does not work with pytest 9 (it reads
    # `node._nodeid`), so we draw its generated cases through hypothesis ourselves.
    with gw.client() as c:
        spec = c.get("/openapi.json").json()
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
    # Valid data means a model we serve: otherwise every positive case stops at 404.
    for path in ("/v1/chat/completions", "/v1/route/explain", "/v1/messages", "/v1/responses", "/v1/embeddings"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        body["properties"]["model"] = {"type": "string", "enum": models}
    schema = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == OPERATIONS
    # schemathesis drops a body schema it cannot resolve without a word: make sure it has them.
    assert all(len(op.body) for op in operations
               if op.method.upper() == "POST" and f"POST {op.path}" not in BODYLESS_POSTS)
    statuses: Counter[int] = Counter()
    per_op: Counter[str] = Counter()
    with requests.Session() as session:
        session.trust_env = False
        for op in operations:
            # Negative data needs something to break: operations without inputs get positive only.
            modes = [schemathesis.GenerationMode.POSITIVE]
            if len(op.body) or len(op.query) or len(op.headers):
                modes.append(schemathesis.GenerationMode.NEGATIVE)
            for mode in modes:
                @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck), phases=[Phase.generate])
                @given(case=op.as_strategy(generation_mode=mode))
                def fuzz(case: schemathesis.Case) -> None:
                    resp = case.call(base_url=gw.base_url, session=session, timeout=30, headers=ADMIN)
                    statuses[resp.status_code] += 1
                    per_op[f"{case.method} {case.path} {resp.status_code}"] += 1
                    assert_clean(resp, resp.status_code, resp.text, anthropic=case.path == "/v1/messages")

                fuzz()
        with gw.client() as c:  # the fuzzer may have forced the cloud offline
            c.post("/admin/connectivity", json={"force": "auto"}, headers=ADMIN)
    print(dict(per_op))
    print(f"\nfuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    # Both sides were exercised: served requests and rejected ones.
    assert statuses[200] >= 15 and sum(n for s, n in statuses.items() if 400 <= s < 500) >= 15


# --- hand-written hostile requests ----------------------------------------------------------

def post(gw: RunningGateway, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    with gw.client() as c:
        return c.post("/v1/chat/completions", content=content,
                      headers={"content-type": "application/json", **(headers or {})})


def nested(depth: int) -> dict:
    node: dict = {"leaf": "x"}
    for _ in range(depth):
        node = {"n": node}
    return node


def msg(**extra: object) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": "hello"}], **extra}


CASES: dict[str, tuple[bytes, set[int]]] = {
    # Deep nesting inside an otherwise valid request, within what every JSON layer accepts: it
    # reaches the privacy walk and the upstream serialiser and must be served.
    "nested_100_in_metadata": (json.dumps(msg(metadata=nested(100))).encode(), {200}),
    "nested_100_in_content_part": (json.dumps({"model": "auto", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi", "extra": nested(100)}]}]}).encode(), {200}),
    "nested_200_in_metadata": (json.dumps(msg(metadata=nested(200))).encode(), {400}),
    # Beyond the JSON parser's own limit (1024): refused while parsing.
    "nested_5000_in_tools": (b'{"model":"auto","messages":[{"role":"user","content":"x"}],"tools":['
                             + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"]}", {400}),
    # Invalid UTF-8 inside a string value, and a lone surrogate escape (valid JSON, not Unicode).
    "invalid_utf8_in_content": (b'{"model":"auto","messages":[{"role":"user","content":"caf\xc3\x28 \xff"}]}', {400}),
    "lone_surrogate": (b'{"model":"auto","messages":[{"role":"user","content":"a \\ud800 b"}]}', {200, 400}),
    "nul_bytes": (json.dumps(msg(messages=[{"role": "user", "content": "a\u0000b" * 50}])).encode(), {200}),
    # Missing fields and wrong types.
    "message_without_role": (json.dumps({"model": "auto", "messages": [{"content": "x"}]}).encode(), {400}),
    "messages_is_string": (json.dumps({"model": "auto", "messages": "hello"}).encode(), {400}),
    "messages_of_strings": (json.dumps({"model": "auto", "messages": ["hello"]}).encode(), {400}),
    "messages_of_nulls": (json.dumps({"model": "auto", "messages": [None]}).encode(), {400}),
    "no_model": (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), {200, 400}),
    "content_is_number": (json.dumps({"model": "auto", "messages": [{"role": "user", "content": 42}]}).encode(), {400}),
    "content_parts_of_garbage": (json.dumps({"model": "auto", "messages": [
        {"role": "user", "content": [1, "two", None, {"type": "image_url"}]}]}).encode(), {200, 400}),
    "stream_is_string": (json.dumps(msg(stream="yes please")).encode(), {400}),
    "max_tokens_negative": (json.dumps(msg(max_tokens=-5)).encode(), {200, 400}),
    "n_is_huge": (json.dumps(msg(n=10**30)).encode(), {200, 400}),
    "temperature_nan": (b'{"model":"auto","messages":[{"role":"user","content":"x"}],"temperature":NaN}', {400}),
    "tools_not_a_list": (json.dumps(msg(tools={"type": "function"})).encode(), {400}),
    "tool_message_without_id": (json.dumps({"model": "auto", "messages": [
        {"role": "user", "content": "x"}, {"role": "tool", "content": "result"}]}).encode(), {200, 400}),
    "stream_options_wrong_type": (json.dumps(msg(stream=True, stream_options="all")).encode(), {400}),
    "duplicate_keys": (b'{"model":"auto","model":"nope","messages":[{"role":"user","content":"x"}]}', {200, 404}),
    "huge_number": (b'{"model":"auto","messages":[{"role":"user","content":"x"}],"seed":' + b"9" * 5000 + b"}",
                    {200, 400}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_bodies(gw: RunningGateway, name: str) -> None:
    content, allowed = CASES[name]
    r = post(gw, content)
    assert r.status_code in allowed, (name, r.status_code, r.text[:300])
    assert_clean(r, r.status_code, r.text)


def conversation(n: int) -> bytes:
    return json.dumps({"model": "auto", "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(n)]}).encode()


def test_ten_thousand_messages_refused_fast_two_thousand_served_whole(
    gw: RunningGateway, upstreams: tuple[FakeUpstream, FakeUpstream]
) -> None:
    classified = gw.state.metrics.classify_seconds.labels("sensitivity")._sum.get()
    t0 = time.monotonic()
    r = post(gw, conversation(10_000))
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages", r.text[:300]
    assert_clean(r, r.status_code, r.text)
    # Refused before any classification work (no analyser time was spent on it); 10 s = hang guard.
    assert gw.state.metrics.classify_seconds.labels("sensitivity")._sum.get() == classified
    assert time.monotonic() - t0 < 10

    t0 = time.monotonic()
    r = post(gw, conversation(2_000))
    assert r.status_code == 200, r.text[:300]
    assert len(upstreams[1].received[-1]["messages"]) == 2_000  # forwarded whole, not truncated
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (json.dumps(msg()).encode(), {"content-type": "text/plain"}, {200, 400, 415}),
        # A compressed body we do not decode: refused as not JSON, not a crash.
        (gzip.compress(json.dumps(msg()).encode()), {"content-encoding": "gzip"}, {400, 415}),
        (json.dumps(msg()).encode("utf-16"), {"content-type": "application/json; charset=utf-16"}, {400, 415}),
    ],
    ids=["text-plain", "gzip", "utf16"],
)
def test_odd_content_headers(gw: RunningGateway, content: bytes, headers: dict[str, str], status: set[int]) -> None:
    r = post(gw, content, headers)
    assert r.status_code in status, r.text[:300]
    assert_clean(r, r.status_code, r.text)


def test_chunked_body_over_limit_without_content_length(gw: RunningGateway) -> None:
    # No Content-Length to check up front: the limit must hold while reading.
    def gen() -> Iterator[bytes]:
        yield b'{"model":"auto","messages":[{"role":"user","content":"'
        for _ in range(100):
            yield b"x" * 65536
        yield b'"}]}'

    with gw.client() as c:
        r = c.post("/v1/chat/completions", content=gen(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert_clean(r, r.status_code, r.text)


def _raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(15)
    return s


def test_trickled_body_is_cut_at_the_read_deadline(gw: RunningGateway) -> None:
    # One byte every 0.2 s never trips a per-read timeout; the whole-body deadline (1 s) must.
    s = _raw(gw.port)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 400\r\n\r\n")
    t0 = time.monotonic()
    answer = b""
    s.setblocking(False)
    while time.monotonic() - t0 < 10:
        try:
            s.send(b" ")
        except OSError:
            pass
        time.sleep(0.2)
        try:
            answer += s.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            break
        if b"\r\n\r\n" in answer:
            break
    s.close()
    assert answer.split(b"\r\n")[0].endswith(b"408 Request Timeout"), answer[:200]
    assert time.monotonic() - t0 < 4


def test_slow_loris_crowd_does_not_starve_real_clients(gw: RunningGateway) -> None:
    # 60 connections each holding a half-sent body; a normal client must still be answered at
    # once, and every slow one must get its 408 and be closed, not left hanging.
    slow = []
    for _ in range(60):
        s = _raw(gw.port)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\":")
        slow.append(s)
    t0 = time.monotonic()
    r = post(gw, json.dumps(msg()).encode())
    assert r.status_code == 200 and time.monotonic() - t0 < 5  # served while they hang, not after

    answers: list[bytes] = []
    lock = threading.Lock()

    def read(s: socket.socket) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                part = s.recv(4096)
                if not part:
                    break
                data += part
        except OSError:
            pass
        with lock:
            answers.append(data)
        s.close()

    threads = [threading.Thread(target=read, args=(s,)) for s in slow]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(answers) == 60
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:30] for a in answers}


def test_headers_never_finished(gw: RunningGateway) -> None:
    # A client that never finishes its headers: the server must not crash or stop serving.
    s = _raw(gw.port)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    r = post(gw, json.dumps(msg()).encode())
    assert r.status_code == 200
    s.close()
