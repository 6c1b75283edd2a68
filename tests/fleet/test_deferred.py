"""Deferred requests on the embedded queue: accepted with 202 while the cloud is down, kept in a
SQLite file that holds no raw PII, sent once when the cloud is back (across a restart of the
gateway process), the answer restored for its caller by id or on a loopback callback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.privacy.bodies import PLANTED
from tests.support import policies
from tests.support.gateway import free_port, run_gateway
from tests.support.upstream import FakeUpstream

PII = (PLANTED["email"], PLANTED["card"], PLANTED["person"])
PROMPT = f"Summarise the account of {PII[2]}, email {PII[0]}, card {PII[1]}."

REST = """
connectivity: {{probe_interval_s: 0.3, probe_timeout_s: 0.5, failures_to_offline: 1, successes_to_online: 1}}
limits: {{classify_budget_ms: 20000}}
privacy: {{analysis_budget_ms: 20000}}
deferred: {{dir: "{dir}", poll_s: 0.2, callback_hosts: [hooks.example.org]}}
rules:
  - name: batch
    when: {{header: {{x-app: batch}}}}
    route: cloud
    redact: true
    fallback: []
    defer_when_offline: true
  - name: cloud-only
    route: cloud
    redact: true
    fallback: []
"""


def write(path: Path, cloud_url_port: int, local: FakeUpstream, state_dir: Path) -> Path:
    class _Cloud:
        base_url = f"http://127.0.0.1:{cloud_url_port}/v1"

    return policies.write_policy(path, _Cloud(), local, REST.format(dir=state_dir),
                                 cloud_settings={"timeout_s": 5, "retries": 0})


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def defer(base_url: str, headers: dict[str, str], text: str = PROMPT) -> tuple[int, dict[str, Any], Any]:
    raw = sdk(base_url).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": text}], extra_headers=headers)
    return raw.status_code, raw.http_response.json(), raw.headers


def fetch(base_url: str, job_id: str) -> httpx.Response:
    return httpx.get(f"{base_url}/v1/deferred/{job_id}", timeout=10, trust_env=False)


def stored_bytes(state_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in state_dir.iterdir() if p.name.startswith("deferred.sqlite3"))


@pytest.fixture
def down_cloud() -> Iterator[FakeUpstream]:
    """A cloud upstream that is down (its port free, connections refused) until a test starts it."""
    up = FakeUpstream(model="cloud-model", name="cloud").start()
    up.stop()
    yield up
    up.stop()


def test_deferred_while_offline_then_sent_once_with_pii_restored(
        tmp_path: Path, down_cloud: FakeUpstream, local: FakeUpstream) -> None:
    path = write(tmp_path / "p.yaml", down_cloud.port, local, tmp_path / "state")
    with run_gateway(path) as gw:
        wait_for(lambda: gw.state.runtime.monitor.state("cloud") == "offline", what="cloud offline")
        status, job, headers = defer(gw.base_url, {"x-hybrid-defer": "true", "Idempotency-Key": "order-17"})
        assert status == 202, job
        assert job["object"] == "chat.completion.deferred" and job["status"] == "queued"
        assert headers["location"] == f"/v1/deferred/{job['id']}" == job["location"]
        assert headers["x-hybrid-route"] == "deferred" and int(headers["x-hybrid-redactions"]) >= 3
        # The same Idempotency-Key again: the same job, nothing new stored.
        status2, again, _ = defer(gw.base_url, {"x-hybrid-defer": "true", "Idempotency-Key": "order-17"})
        assert (status2, again["id"]) == (202, job["id"])
        # The rule's defer_when_offline marks a request without the header.
        status3, by_rule, _ = defer(gw.base_url, {"x-app": "batch"}, text="Hello from a batch job.")
        assert status3 == 202 and by_rule["id"] != job["id"]
        # A request no rule or header marks is answered at once, as before (no target: 503).
        with pytest.raises(openai.InternalServerError):
            defer(gw.base_url, {})
        disk = stored_bytes(tmp_path / "state")
        assert job["id"].encode() in disk
        for value in PII:
            assert value.encode() not in disk, "raw PII in the deferred queue's file"
        assert fetch(gw.base_url, job["id"]).json()["status"] == "queued"
        assert down_cloud.received == []

        down_cloud.start()  # the cloud comes back on the same port
        done = wait_for(lambda: (r := fetch(gw.base_url, job["id"]).json())["status"] == "completed" and r,
                        what="deferred request completed")
        wait_for(lambda: fetch(gw.base_url, by_rule["id"]).json()["status"] == "completed", what="second one")
        answer = done["response"]["choices"][0]["message"]["content"]
        for value in PII:
            assert value in answer  # restored for its caller
        assert done["target"] == "cloud" and done["attempts"] == 1 and done["error"] is None
        time.sleep(0.6)  # a few more worker ticks: nothing is sent twice
        sent = [json.dumps(b) for b in down_cloud.received]
        assert len(sent) == 2
        keys = {h.get("Idempotency-Key") for h in down_cloud.received_headers}
        assert keys == {"order-17", by_rule["id"]}  # the client's key, else ours, reaches the cloud
        for value in PII:
            assert all(value not in body for body in sent), "raw PII reached the cloud"
        for value in PII:
            assert value.encode() not in stored_bytes(tmp_path / "state")


class _Hooks(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], dict[str, Any]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(204)
        self.end_headers()


def test_callback_on_loopback_and_bad_input(tmp_path: Path, down_cloud: FakeUpstream, local: FakeUpstream) -> None:
    hooks = ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hooks.server_address[1]}/done"
    path = write(tmp_path / "p.yaml", down_cloud.port, local, tmp_path / "state")
    try:
        with run_gateway(path) as gw:
            wait_for(lambda: gw.state.runtime.monitor.state("cloud") == "offline", what="cloud offline")
            for bad, code in (("http://10.1.2.3/hook", "callback_not_allowed"),
                              ("https://evil.example.com/x", "callback_not_allowed"),
                              ("ftp://127.0.0.1/x", "invalid_callback_url")):
                with pytest.raises(openai.BadRequestError) as err:
                    defer(gw.base_url, {"x-hybrid-defer": "true", "x-hybrid-callback-url": bad})
                assert err.value.body["code"] == code  # type: ignore[index]
            with pytest.raises(openai.BadRequestError) as err:
                sdk(gw.base_url).chat.completions.create(
                    model="auto", stream=True, messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"x-hybrid-defer": "true"})
            assert err.value.body["code"] == "defer_needs_no_stream"  # type: ignore[index]
            for bad_id in ("nope", "defer_" + "0" * 32, "defer_xyz", "defer_" + "g" * 32):
                r = fetch(gw.base_url, bad_id)
                assert r.status_code == 404
                assert r.json()["error"]["code"] == "deferred_not_found"
                assert r.json()["error"]["type"] == "not_found_error"  # OpenAI's shape, as every 404 here

            status, job, _ = defer(gw.base_url, {"x-hybrid-defer": "true", "x-hybrid-callback-url": url})
            assert status == 202
            down_cloud.start()
            # Its own callback (the list is shared with the other modules' hook servers).
            headers, body = wait_for(lambda: next((hb for hb in _Hooks.received if hb[1]["id"] == job["id"]), None),
                                     what="callback")
            assert body["id"] == job["id"] and body["status"] == "completed"
            assert PII[0] in body["response"]["choices"][0]["message"]["content"]
            assert headers["idempotency-key"] == job["id"]  # no client key: ours
            wait_for(lambda: fetch(gw.base_url, job["id"]).json()["callback"] == "delivered", what="callback state")
    finally:
        hooks.shutdown()
        hooks.server_close()


def _serve(policy: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--policy", str(policy), "--port", str(port),
             "--no-watch"], stdout=out, stderr=subprocess.STDOUT, env=env)


def _ready(base_url: str, cloud_state: str) -> bool:
    try:
        r = httpx.get(base_url + "/readyz", timeout=2, trust_env=False)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.json()["targets"].get("cloud") == cloud_state


@pytest.mark.slow  # two gateway processes start one after the other
def test_nothing_lost_across_a_restart_of_the_gateway_process(
        tmp_path: Path, down_cloud: FakeUpstream, local: FakeUpstream) -> None:
    path = write(tmp_path / "p.yaml", down_cloud.port, local, tmp_path / "state")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    first = _serve(path, port, tmp_path / "first.log")
    try:
        wait_for(lambda: _ready(base, "offline"), timeout=120, what="first gateway up, cloud offline")
        status, job, _ = defer(base, {"x-hybrid-defer": "true", "Idempotency-Key": "restart-1"})
        assert status == 202
    finally:
        first.terminate()
        first.wait(timeout=30)
    down_cloud.start()
    second = _serve(path, port, tmp_path / "second.log")
    try:
        done = wait_for(lambda: _ready(base, "online") and (r := fetch(base, job["id"]).json())["status"] == "completed"
                        and r, timeout=120, what="delivered by the restarted gateway")
        assert PII[1] in done["response"]["choices"][0]["message"]["content"]
        time.sleep(0.6)
        assert len(down_cloud.received) == 1  # sent once, by the second process
    finally:
        second.terminate()
        second.wait(timeout=30)


def test_messages_and_responses_are_deferred_in_their_own_shapes(
        tmp_path: Path, down_cloud: FakeUpstream, local: FakeUpstream) -> None:
    """202 + id in each API's style, the stored request redacted (no raw PII, not even in what the
    job keeps of the wire request), the answer fetched by id in the API's own shape, restored."""
    path = write(tmp_path / "p.yaml", down_cloud.port, local, tmp_path / "state")
    defer_headers = {"x-hybrid-defer": "true"}
    with run_gateway(path) as gw:
        wait_for(lambda: gw.state.runtime.monitor.state("cloud") == "offline", what="cloud offline")
        claude = anthropic.Anthropic(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=30)
        raw = claude.messages.with_raw_response.create(
            model="auto", max_tokens=64, system=f"Write to {PII[0]} in the end.",
            messages=[{"role": "user", "content": PROMPT}], extra_headers=defer_headers)
        assert raw.status_code == 202
        msg_job = raw.http_response.json()
        assert msg_job["type"] == "message_deferred" and msg_job["status"] == "queued"
        assert msg_job["message"] is None and "object" not in msg_job
        assert raw.headers["location"] == f"/v1/deferred/{msg_job['id']}" == msg_job["location"]

        oai = sdk(gw.base_url)
        raw_r = oai.responses.with_raw_response.create(
            model="auto", input=PROMPT, instructions=f"Sign as {PII[2]}.", max_output_tokens=50,
            metadata={"ticket": PII[1]}, user=PII[0], extra_headers=defer_headers)
        assert raw_r.status_code == 202
        resp_job = raw_r.http_response.json()
        assert resp_job["object"] == "response" and resp_job["status"] == "queued"
        assert resp_job["background"] is True and resp_job["output"] == [] and resp_job["max_output_tokens"] == 50
        assert oai.responses.retrieve(resp_job["id"]).status == "queued"  # the SDK reads it back by id
        # A stream cannot be deferred: a 400 in the Messages shape.
        with pytest.raises(anthropic.BadRequestError):
            claude.messages.create(model="auto", max_tokens=64, stream=True, extra_headers=defer_headers,
                                   messages=[{"role": "user", "content": "hi"}])
        disk = stored_bytes(tmp_path / "state")
        assert msg_job["id"].encode() in disk and resp_job["id"].encode() in disk
        for value in PII:
            assert value.encode() not in disk, "raw PII in the deferred queue's file"

        down_cloud.start()
        done = wait_for(lambda: (r := fetch(gw.base_url, msg_job["id"]).json())["status"] == "completed" and r,
                        what="deferred message completed")
        message = done["message"]
        assert done["type"] == "message_deferred" and message["type"] == "message" and message["role"] == "assistant"
        assert message["content"][0]["type"] == "text" and PII[0] in message["content"][0]["text"]  # restored
        assert message["usage"]["output_tokens"] >= 1
        response = wait_for(lambda: (r := oai.responses.retrieve(resp_job["id"])).status == "completed" and r,
                            what="deferred response completed")
        assert response.id == resp_job["id"] and PII[2] in response.output_text and PII[0] in response.output_text
        assert response.max_output_tokens == 50
        with pytest.raises(openai.NotFoundError):  # a chat job is no Response
            oai.responses.retrieve(msg_job["id"])
        sent = json.dumps(down_cloud.received)
        for value in PII:
            assert value not in sent, "raw PII reached the cloud"
