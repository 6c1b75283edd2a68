"""Slowness is a reason to move: first-token deadlines, stalled and slow-drip streams, hedging.

The real gateway (uvicorn on loopback) in front of fake upstreams that are slow but alive: the
first byte late, stream headers then silence, tokens dripping. Each test asserts what the client
got (through the official OpenAI SDK, or raw SSE where the `[DONE]` count matters), what each
upstream received, and that an abandoned upstream really saw its connection closed. Deadlines
are 0.2 to 1 s, so a fault "first byte after 10 s" is a 3 s wait the client never sits through.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from click.testing import CliRunner
from openai.types.chat import ChatCompletion

from gateway.cli import main as cli
from gateway.policy.load import load_policy
from gateway.policy.pace import Pace
from gateway.stream_deadline import SlowError, StreamDeadline
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.policies import policy_yaml, write_policy
from tests.support.upstream import FakeUpstream, Fault

FIRST_TOKEN_S = 1.0  # the cloud target's own deadline
HEDGE_AFTER_S = 0.2
LATE_S = 3.0  # "never" at these deadlines: the upstream waits this long before its first byte
QUICK_S = 0.3  # the `quick` rule's first-token deadline
ECHO = "echo: tell me a short story"  # the cloud's whole answer (27 characters)

RULES = f"""
connectivity:
  probe_interval_s: 30
  probe_timeout_s: 0.3
  failures_to_offline: 1000   # these tests fail the cloud on purpose, again and again
  successes_to_online: 1
limits:
  request_timeout_s: 8
  classify_budget_ms: 500
privacy:
  enabled: false
difficulty:
  method: heuristic
defaults:
  fallback: [local]
rules:
  - name: hedged
    when: {{ header: {{ x-test: hedge }} }}
    route: cloud
    first_token_timeout_s: 2.0      # overrides the target's: the hedge, not the deadline, acts here
    hedge_after_s: {HEDGE_AFTER_S}
  - name: stays-home
    description: a chain without the cloud (what a sensitive request gets), hedged within itself
    when: {{ header: {{ x-test: stays-home }} }}
    route: local
    fallback: [local2]
    first_token_timeout_s: 2.0
    hedge_after_s: {HEDGE_AFTER_S}
  - name: drip
    when: {{ header: {{ x-test: drip }} }}
    route: cloud
    stall_timeout_s: 0.8
    min_tokens_per_s: 8
    min_rate_window_s: 0.5
  - name: quick
    description: a short first-token deadline, for answers that take several times longer than it
    when: {{ header: {{ x-test: quick }} }}
    route: cloud
    first_token_timeout_s: {QUICK_S}
  - name: default
    route: cloud
"""


@pytest.fixture(scope="module")
def local2() -> Iterator[FakeUpstream]:
    with FakeUpstream(model="local2-model", name="local2", reply=lambda b: "second local answer") as up:
        yield up


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream, local: FakeUpstream,
       local2: FakeUpstream) -> Iterator[RunningGateway]:
    path = tmp_path_factory.mktemp("slowness") / "policy.yaml"
    write_policy(
        path, cloud, local, rest=RULES,
        cloud_settings={"timeout_s": 5, "retries": 1, "first_token_timeout_s": FIRST_TOKEN_S, "stall_timeout_s": 0.4},
        local_settings={"timeout_s": 5, "continues_answers": True},
        more_targets={"local2": {"kind": "local", "model": "openai/local2-model", "api_base": local2.base_url,
                                 "timeout_s": 5}},
    )
    audit = path.parent / "audit.jsonl"
    with run_gateway(path, audit_path=str(audit)) as running:
        running.audit = audit  # type: ignore[attr-defined]
        yield running


@pytest.fixture(autouse=True)
def clean(cloud: FakeUpstream, local: FakeUpstream, local2: FakeUpstream) -> Iterator[None]:
    for up in (cloud, local, local2):
        up.reset()
        up.disconnects = 0
        up.chunk_chars = 4
    yield
    for up in (cloud, local, local2):
        up.reset()


def sdk(gw: RunningGateway, test: str | None = None) -> openai.OpenAI:
    headers = {"x-test": test} if test else {}
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0, timeout=15,
                         default_headers=headers)


MESSAGES = [{"role": "user", "content": "tell me a short story"}]


def ask(gw: RunningGateway, stream: bool, test: str | None = None) -> tuple[str, dict[str, str], float]:
    """The answer's text, the response headers and the seconds it took, through the OpenAI SDK."""
    t0 = time.monotonic()
    raw = sdk(gw, test).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES,  # type: ignore[call-overload]
                                                                  stream=stream)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        text = raw.parse().choices[0].message.content or ""
    return text, dict(raw.headers), time.monotonic() - t0


def raw_stream(gw: RunningGateway, test: str | None = None,
               headers_out: dict[str, str] | None = None) -> tuple[str, int, list[dict[str, Any]]]:
    """(text, number of [DONE] lines, every event) of a streamed answer, read as raw SSE; the
    response headers into `headers_out` if given."""
    text, done, events = [], 0, []
    headers = {"x-test": test} if test else {}
    with httpx.Client(base_url=gw.base_url, timeout=15, trust_env=False) as client, client.stream(
        "POST", "/v1/chat/completions", headers=headers,
        json={"model": "auto", "stream": True, "messages": MESSAGES},
    ) as resp:
        assert resp.status_code == 200
        if headers_out is not None:
            headers_out.update(resp.headers)
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done += 1
                continue
            event = json.loads(data)
            events.append(event)
            for choice in event.get("choices") or []:
                text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text), done, events


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(0.01)


def audit_record(gw: RunningGateway, request_id: str) -> dict[str, Any]:
    """The request's audit line (written once the response has been sent: waited for)."""
    def lines() -> list[dict[str, Any]]:
        return [r for r in map(json.loads, gw.audit.read_text().splitlines())  # type: ignore[attr-defined]
                if r["request_id"] == request_id]
    wait_for(lambda: bool(lines()))
    return lines()[0]


def metric(gw: RunningGateway, line_start: str) -> float:
    for line in gw.client().get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- first-token deadline ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_late_first_byte_falls_back_within_the_deadline(gw: RunningGateway, cloud: FakeUpstream,
                                                       local: FakeUpstream, stream: bool) -> None:
    cloud.fault = Fault("first_byte", seconds=LATE_S)
    failures_before = gw.state.runtime.monitor.health["cloud"].failures
    text, headers, seconds = ask(gw, stream)
    assert text == "local answer"
    assert headers["x-hybrid-route"] == "local"
    assert headers["x-hybrid-fallback"] == "cloud->local: slow_first_token"
    assert FIRST_TOKEN_S * 0.9 < seconds < FIRST_TOKEN_S + 0.7
    assert len(cloud.received) == 1, "a slow target is left, not retried"
    assert len(local.received) == 1
    wait_for(lambda: cloud.disconnects == 1)  # the abandoned call's connection was really closed
    health = gw.state.runtime.monitor.health["cloud"]
    assert health.failures == failures_before + 1 and health.last_error == "slow_first_token"


def test_headers_then_silence_falls_back(gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream) -> None:
    cloud.fault = Fault("silent_after_headers", seconds=LATE_S)
    text, done, _ = raw_stream(gw)
    assert text == "local answer" and done == 1
    assert len(cloud.received) == 1 and len(local.received) == 1
    assert local.received[0]["messages"] == MESSAGES  # a fresh start: nothing reached the client
    wait_for(lambda: cloud.disconnects == 1)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_slow_but_healthy_is_not_abandoned(gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream,
                                           stream: bool) -> None:
    cloud.fault = Fault("first_byte", seconds=0.9 * FIRST_TOKEN_S)
    text, headers, seconds = ask(gw, stream)
    assert text == "echo: tell me a short story"
    assert headers["x-hybrid-route"] == "cloud" and "x-hybrid-fallback" not in headers
    assert seconds >= 0.9 * FIRST_TOKEN_S
    assert local.received == [] and cloud.disconnects == 0


def test_last_resort_gets_no_first_token_deadline(gw: RunningGateway, cloud: FakeUpstream,
                                                  local: FakeUpstream) -> None:
    """Cloud silent, local slow: the local answer is waited for, not failed (nowhere left to go)."""
    cloud.fault = Fault("first_byte", seconds=LATE_S)
    local.fault = Fault("first_byte", seconds=0.5)
    text, headers, seconds = ask(gw, True)
    assert text == "local answer" and headers["x-hybrid-route"] == "local"
    assert seconds > FIRST_TOKEN_S + 0.4


def test_flapping_between_fast_and_slow(gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream) -> None:
    """Each request is judged on its own: fast ones stay on the cloud, slow ones move."""
    for slow in (True, False, True, False):
        cloud.fault = Fault("first_byte", seconds=LATE_S) if slow else None
        text, headers, _ = ask(gw, True)
        assert headers["x-hybrid-route"] == ("local" if slow else "cloud")
        assert text == ("local answer" if slow else "echo: tell me a short story")
    wait_for(lambda: cloud.disconnects == 2)
    assert len(local.received) == 2


def test_messages_and_responses_apis_fall_back_on_a_silent_cloud(gw: RunningGateway, cloud: FakeUpstream,
                                                                   local: FakeUpstream) -> None:
    cloud.fault = Fault("first_byte", seconds=LATE_S)
    client = anthropic.Anthropic(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=15)
    t0 = time.monotonic()
    with client.messages.stream(model="auto", max_tokens=64, messages=MESSAGES) as stream:  # type: ignore[arg-type]
        assert stream.response.headers["x-hybrid-fallback"] == "cloud->local: slow_first_token"
        assert "".join(stream.text_stream) == "local answer"
    assert time.monotonic() - t0 < FIRST_TOKEN_S + 0.7
    resp = sdk(gw).responses.with_raw_response.create(model="auto", input="tell me a short story")
    assert resp.headers["x-hybrid-fallback"] == "cloud->local: slow_first_token"
    assert resp.parse().output_text == "local answer"
    assert len(cloud.received) == 2 and len(local.received) == 2
    wait_for(lambda: cloud.disconnects == 2)


def test_monitor_marks_a_persistently_slow_cloud_offline(tmp_path: Path, cloud: FakeUpstream,
                                                         local: FakeUpstream, local2: FakeUpstream) -> None:
    """Slow first tokens count like other failures, with the policy's hysteresis: two in a row
    here, then the cloud is skipped at once instead of being waited on again."""
    path = tmp_path / "policy.yaml"
    write_policy(
        path, cloud, local, rest=RULES.replace("failures_to_offline: 1000", "failures_to_offline: 2"),
        cloud_settings={"timeout_s": 5, "first_token_timeout_s": 0.3},
        more_targets={"local2": {"kind": "local", "model": "openai/local2-model", "api_base": local2.base_url}},
    )
    cloud.fault = Fault("first_byte", seconds=LATE_S)
    with run_gateway(path) as g:
        for _ in range(2):
            _, headers, _ = ask(g, True)
            assert headers["x-hybrid-fallback"] == "cloud->local: slow_first_token"
        assert g.state.runtime.monitor.state("cloud") == "offline"
        _, headers, seconds = ask(g, True)
        assert headers["x-hybrid-fallback"] == "cloud->local: offline" and seconds < 0.3
    assert len(cloud.received) == 2


# -- stalled and slow-drip streams -------------------------------------------------------------


def test_stall_after_first_tokens_is_resumed(gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream) -> None:
    cloud.fault = Fault("silent_mid", seconds=LATE_S, after_chunks=2)
    local_tokens = metric(gw, 'hybrid_tokens_total{kind="completion",route="local"}')
    t0 = time.monotonic()
    headers: dict[str, str] = {}
    text, done, _ = raw_stream(gw, headers_out=headers)
    assert time.monotonic() - t0 < 0.4 + 1.0
    assert done == 1
    assert text == "echo: te" + "local answer"  # two cloud chunks, then the local target goes on
    cont = local.received[0]
    assert cont["messages"][-1] == {"role": "assistant", "content": "echo: te"}
    assert cont["continue_final_message"] is True
    wait_for(lambda: cloud.disconnects == 1)
    # Honest accounting: the headers (sent before the break) name the part that started; the
    # audit line names both, the true cause, and the tokens of the part that reported them.
    assert headers["x-hybrid-route"] == "cloud" and headers["x-hybrid-model"] == "cloud-model"
    record = audit_record(gw, headers["x-request-id"])
    assert record["fallbacks"] == ["cloud->local: resumed_mid_stream:stalled"]
    assert record["served_model"] == "cloud-model"
    assert record["parts"] == [
        {"target": "cloud", "model": "cloud-model", "prompt_tokens": None, "completion_tokens": None},
        {"target": "local", "model": "local-model", "prompt_tokens": 5, "completion_tokens": 3},
    ]
    assert metric(gw, 'hybrid_tokens_total{kind="completion",route="local"}') == local_tokens + 3


def test_one_token_a_second_drip_is_resumed(gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream) -> None:
    cloud.fault = Fault("drip", tokens_per_s=1)
    headers: dict[str, str] = {}
    text, done, events = raw_stream(gw, "drip", headers)
    assert done == 1 and not any("error" in e for e in events)
    assert text.startswith("echo") and text.endswith("local answer")
    assert text.count("local answer") == 1
    assert local.received[0]["messages"][-1]["content"] == text.removesuffix("local answer")
    assert len({e["id"] for e in events}) == 1  # one answer, as the client sees it
    wait_for(lambda: cloud.disconnects == 1)
    assert audit_record(gw, headers["x-request-id"])["fallbacks"] == ["cloud->local: resumed_mid_stream:slow_stream"]


def test_healthy_drip_above_the_floor_is_kept(gw: RunningGateway, cloud: FakeUpstream,
                                              local: FakeUpstream) -> None:
    cloud.fault = Fault("drip", tokens_per_s=25)
    cloud.chunk_chars = 1  # 27 chunks: about a second, two rate windows
    text, done, _ = raw_stream(gw, "drip")
    assert text == "echo: tell me a short story" and done == 1
    assert local.received == [] and cloud.disconnects == 0


async def _dripping(gaps: list[float]) -> AsyncIterator[int]:
    for i, gap in enumerate(gaps):
        await asyncio.sleep(gap)
        yield i


@pytest.mark.parametrize(("gaps", "reason"), [
    ([0.0, 0.05, 0.6], "stalled"),  # silent past the 0.3 s stall limit
    ([0.0] + [0.2] * 10, "slow_stream"),  # 5 chunks/s, under the floor of 8, never silent for 0.3 s
])
def test_guard_names_the_reason(gaps: list[float], reason: str) -> None:
    async def run() -> tuple[list[int], SlowError]:
        guard = StreamDeadline(time.monotonic() + 10, Pace(stall_s=0.3, min_tokens_per_s=8, rate_window_s=0.5))
        got: list[int] = []
        it = _dripping(gaps)
        try:
            while True:
                got.append(await guard.next(it))
        except SlowError as exc:
            return got, exc
        finally:
            guard.close()

    got, exc = asyncio.run(run())
    assert exc.reason == reason and exc.kind == "timeout" and not exc.retryable
    assert got[:1] == [0]


def test_guard_waits_on_when_nothing_could_take_over() -> None:
    async def run() -> list[int]:
        guard = StreamDeadline(time.monotonic() + 10, Pace(stall_s=0.1), may_move=lambda: False)
        try:
            return [i async for i in _guarded(guard, _dripping([0.0, 0.3, 0.0]))]
        finally:
            guard.close()

    assert asyncio.run(run()) == [0, 1, 2]


def test_guard_does_not_blame_the_upstream_for_a_slow_client() -> None:
    """The client busy for longer than the stall limit: no stall, and the timer does not spin."""
    async def run() -> tuple[list[int], int]:
        guard = StreamDeadline(time.monotonic() + 10, Pace(stall_s=0.05))
        fires = 0
        fire = guard._fire

        def counted() -> None:
            nonlocal fires
            fires += 1
            fire()

        guard._fire = counted  # type: ignore[method-assign]
        it = _dripping([0.0, 0.0, 0.0])
        try:
            got = [await guard.next(it)]
            await asyncio.sleep(0.3)  # the client, not the upstream, is slow
            got += [await guard.next(it), await guard.next(it)]
            return got, fires
        finally:
            guard.close()

    got, fires = asyncio.run(run())
    assert got == [0, 1, 2] and fires < 20


async def _guarded(guard: StreamDeadline, it: AsyncIterator[int]) -> AsyncIterator[int]:
    while True:
        try:
            yield await guard.next(it)
        except StopAsyncIteration:
            return


# -- non-streamed requests: streamed upstream, assembled ----------------------------------------


def plain(gw: RunningGateway, test: str | None = None) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    with httpx.Client(base_url=gw.base_url, timeout=15, trust_env=False) as client:
        resp = client.post("/v1/chat/completions", headers={"x-test": test} if test else {},
                           json={"model": "auto", "messages": MESSAGES})
    return resp, time.monotonic() - t0


def test_long_plain_answer_arriving_healthily_is_served_whole(gw: RunningGateway, cloud: FakeUpstream,
                                                              local: FakeUpstream) -> None:
    """A non-streamed request whose answer takes 4x the first-token deadline: the cloud is asked
    for a stream, its first token comes at once, and the answer is waited for and returned as the
    one JSON completion the client asked for (it used to be thrown away as slow_first_token)."""
    cloud.chunk_chars = 1  # 27 chunks, 26 gaps over 4x the deadline
    cloud.fault = Fault("drip", tokens_per_s=26 / (4 * QUICK_S))
    resp, seconds = plain(gw, "quick")
    assert resp.status_code == 200
    assert seconds >= 4 * QUICK_S * 0.9
    completion = ChatCompletion.model_validate(resp.json())
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == ECHO and completion.choices[0].finish_reason == "stop"
    assert (completion.id, completion.model) == ("chatcmpl-test", "cloud-model")
    assert completion.usage is not None and completion.usage.completion_tokens == len(ECHO)
    assert resp.headers["x-hybrid-route"] == "cloud" and "x-hybrid-fallback" not in resp.headers
    assert resp.headers["x-hybrid-model"] == "cloud-model"
    assert len(cloud.received) == 1 and local.received == []
    assert cloud.received[0]["stream"] is True and cloud.received[0]["stream_options"] == {"include_usage": True}
    record = audit_record(gw, resp.headers["x-request-id"])
    assert record["stream"] is False and record["completion_tokens"] == len(ECHO)
    assert record["parts"] == [{"target": "cloud", "model": "cloud-model", "prompt_tokens": 5,
                                "completion_tokens": len(ECHO)}]


def test_plain_request_to_a_cloud_silent_after_headers_falls_back(gw: RunningGateway, cloud: FakeUpstream,
                                                                   local: FakeUpstream) -> None:
    cloud.fault = Fault("silent_after_headers", seconds=LATE_S)
    resp, seconds = plain(gw)
    assert ChatCompletion.model_validate(resp.json()).choices[0].message.content == "local answer"
    assert resp.headers["x-hybrid-fallback"] == "cloud->local: slow_first_token"
    assert resp.headers["x-hybrid-model"] == "local-model"
    assert FIRST_TOKEN_S * 0.9 < seconds < FIRST_TOKEN_S + 0.7
    assert local.received[0]["stream"] is False  # the last resort has no limit: asked plainly
    wait_for(lambda: cloud.disconnects == 1)


def test_plain_request_stalled_mid_answer_gets_the_next_targets_whole_answer(
        gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream) -> None:
    """Nothing of the cloud's half answer reached the client, so the next target starts afresh
    (no continuation) and the client gets its whole answer as one completion."""
    cloud.fault = Fault("silent_mid", seconds=LATE_S, after_chunks=2)
    resp, seconds = plain(gw)
    assert ChatCompletion.model_validate(resp.json()).choices[0].message.content == "local answer"
    assert resp.headers["x-hybrid-route"] == "local"
    assert resp.headers["x-hybrid-fallback"] == "cloud->local: stalled"
    assert seconds < 0.4 + 1.0  # the cloud's stall limit, not its 3 s silence
    assert len(cloud.received) == 1, "a stalled target is left, not retried"
    assert local.received[0]["messages"] == MESSAGES and "continue_final_message" not in local.received[0]
    wait_for(lambda: cloud.disconnects == 1)
    assert gw.state.runtime.monitor.health["cloud"].last_error == "stalled"


def test_plain_route_already_answering_is_not_hedged(gw: RunningGateway, cloud: FakeUpstream,
                                                      local: FakeUpstream) -> None:
    """Not streamed, the hedge is for a silent route, not for a long answer on its way."""
    cloud.chunk_chars = 1
    cloud.fault = Fault("drip", tokens_per_s=40)  # first token at once, the whole answer in ~0.65 s
    text, headers, seconds = ask(gw, False, "hedge")
    assert text == ECHO and headers["x-hybrid-route"] == "cloud" and "x-hybrid-fallback" not in headers
    assert seconds > HEDGE_AFTER_S + 0.2
    assert local.received == []


def test_plain_answer_through_the_stream_is_restored(tmp_path: Path, cloud: FakeUpstream,
                                                     local: FakeUpstream) -> None:
    """A redacting rule: the cloud's stream carries placeholders (cut across chunks), the
    assembled answer comes back with the real value."""
    email = "maria.gonzalez@example.com"
    path = tmp_path / "policy.yaml"
    write_policy(path, cloud, local, cloud_settings={"timeout_s": 5, "first_token_timeout_s": 1}, rest="""
        connectivity: { probe_interval_s: 30, failures_to_offline: 1000 }
        limits: { classify_budget_ms: 20000 }
        privacy: { nlp_model: none }
        difficulty: { method: heuristic }
        rules:
          - name: out
            route: cloud
            fallback: [local]
            redact: true
        """)
    with run_gateway(path) as g:
        resp = sdk(g).chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": f"write to {email} today"}])
    assert resp.parse().choices[0].message.content == f"echo: write to {email} today"
    assert resp.headers["x-hybrid-route"] == "cloud"
    sent = cloud.received[0]
    assert sent["stream"] is True and email not in json.dumps(sent) and "example.com" not in json.dumps(sent)


# -- hedging ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
def test_hedge_wins_over_a_silent_route(gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream,
                                        stream: bool) -> None:
    cloud.fault = Fault("first_byte", seconds=LATE_S)
    started = metric(gw, 'hybrid_hedges_total{source="cloud",started="local"}')
    won = metric(gw, 'hybrid_hedge_wins_total{target="local"}')
    text, headers, seconds = ask(gw, stream, "hedge")
    assert text == "local answer"
    assert headers["x-hybrid-route"] == "local"
    assert headers["x-hybrid-fallback"] == "cloud->local: hedge_won"
    assert HEDGE_AFTER_S <= seconds < HEDGE_AFTER_S + 0.6
    assert len(cloud.received) == 1 and len(local.received) == 1  # both started
    wait_for(lambda: cloud.disconnects == 1)  # the loser was closed, not left running
    assert metric(gw, 'hybrid_hedges_total{source="cloud",started="local"}') == started + 1
    assert metric(gw, 'hybrid_hedge_wins_total{target="local"}') == won + 1
    request_id = headers["x-request-id"]
    lines = [json.loads(line) for line in gw.audit.read_text().splitlines()]  # type: ignore[attr-defined]
    record = next(r for r in lines if r["request_id"] == request_id)
    assert record["hedge"] == {"source": "cloud", "started": "local", "won": "local"}
    assert record["fallbacks"] == ["cloud->local: hedge_won"]


def test_route_that_answers_first_wins_the_hedge(gw: RunningGateway, cloud: FakeUpstream,
                                                 local: FakeUpstream) -> None:
    cloud.fault = Fault("first_byte", seconds=HEDGE_AFTER_S + 0.2)
    local.fault = Fault("first_byte", seconds=LATE_S)
    won = metric(gw, 'hybrid_hedge_wins_total{target="cloud"}')
    text, headers, _ = ask(gw, True, "hedge")
    assert text == "echo: tell me a short story"
    assert headers["x-hybrid-route"] == "cloud" and "x-hybrid-fallback" not in headers
    assert len(local.received) == 1
    wait_for(lambda: local.disconnects == 1)  # the hedge lost and was closed
    assert cloud.disconnects == 0
    assert metric(gw, 'hybrid_hedge_wins_total{target="cloud"}') == won + 1


def test_no_hedge_when_the_route_is_quick(gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream) -> None:
    text, headers, _ = ask(gw, True, "hedge")
    assert headers["x-hybrid-route"] == "cloud" and text == "echo: tell me a short story"
    time.sleep(HEDGE_AFTER_S + 0.1)
    assert local.received == []


def test_hedge_stays_inside_the_chain(gw: RunningGateway, cloud: FakeUpstream, local: FakeUpstream,
                                      local2: FakeUpstream) -> None:
    """The rule's chain has no cloud target (as for a sensitive request): the hedge goes to the
    chain's next target, and the cloud, though fast and online, receives nothing."""
    local.fault = Fault("first_byte", seconds=LATE_S)
    text, headers, _ = ask(gw, True, "stays-home")
    assert text == "second local answer"
    assert headers["x-hybrid-route"] == "local2"
    assert headers["x-hybrid-fallback"] == "local->local2: hedge_won"
    assert local2.received[0]["messages"] == MESSAGES
    wait_for(lambda: local.disconnects == 1)
    time.sleep(0.1)
    assert cloud.received == []


def test_hedge_to_the_cloud_sends_the_redacted_body(tmp_path: Path, cloud: FakeUpstream,
                                                    local: FakeUpstream) -> None:
    """A redacting rule whose route is local: the hedge to the cloud carries placeholders, exactly
    what the cloud would get as a fallback, and the answer comes back restored."""
    email = "maria.gonzalez@example.com"
    path = tmp_path / "policy.yaml"
    write_policy(path, cloud, local, rest=f"""
        connectivity: {{ probe_interval_s: 30, failures_to_offline: 1000 }}
        limits: {{ classify_budget_ms: 20000 }}
        privacy: {{ nlp_model: none }}
        difficulty: {{ method: heuristic }}
        rules:
          - name: home-first
            route: local
            fallback: [cloud]
            redact: true
            hedge_after_s: {HEDGE_AFTER_S}
        """)
    local.fault = Fault("first_byte", seconds=LATE_S)
    with run_gateway(path) as g:
        raw = sdk(g).chat.completions.with_raw_response.create(
            model="auto", stream=True, messages=[{"role": "user", "content": f"write to {email} today"}])
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert raw.headers["x-hybrid-route"] == "cloud"
    assert raw.headers["x-hybrid-fallback"] == "local->cloud: hedge_won"
    sent = json.dumps(cloud.received[0])
    assert email not in sent and "example.com" not in sent
    assert text == f"echo: write to {email} today"  # the placeholder restored for the client
    assert local.received[0]["messages"][0]["content"] == f"write to {email} today"  # home saw it raw


# -- explain, policy check, the default policy --------------------------------------------------


def test_explain_shows_the_deadlines_in_force(gw: RunningGateway) -> None:
    r = gw.client(headers={"x-test": "hedge"}).post("/v1/route/explain",
                                                    json={"model": "auto", "messages": MESSAGES})
    decision = r.json()["decision"]
    assert decision["hedge_after_s"] == HEDGE_AFTER_S
    assert decision["deadlines"]["cloud"]["first_token_timeout_s"] == 2.0  # the rule's, over the target's
    assert decision["deadlines"]["cloud"]["stall_timeout_s"] == 0.4  # the target's
    assert decision["deadlines"]["local"]["first_token_timeout_s"] is None  # the last resort waits
    plain = gw.client().post("/v1/route/explain", json={"model": "auto", "messages": MESSAGES}).json()
    assert plain["decision"]["deadlines"]["cloud"]["first_token_timeout_s"] == FIRST_TOKEN_S
    assert plain["decision"]["hedge_after_s"] is None


def test_default_policy_leaves_a_silent_cloud_within_two_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUD_API_KEY", "sk-test")
    policy = load_policy(Path(__file__).parents[2] / "policies" / "default.yaml")
    cloud_limit = policy.targets["cloud"].first_token_timeout_s
    assert cloud_limit is not None and cloud_limit <= 2.0
    assert policy.targets["local"].first_token_timeout_s is None
    result = CliRunner().invoke(cli, ["policy", "check", str(Path(__file__).parents[2] / "policies" / "default.yaml")])
    assert result.exit_code == 0, result.output
    assert "hard-redacted-to-cloud: cloud first token 2s" in result.output


def test_policy_check_warns_when_the_hedge_can_never_fire(tmp_path: Path) -> None:
    """A hedge due no sooner than the route's first-token deadline (the target's, or the rule's
    override) never starts: the route is given up first. Warned at the rule's hedge_after_s line."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy_yaml("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1",
                                cloud={"first_token_timeout_s": 1.5}, local={}, rest="""
        defaults: { fallback: [local] }
        rules:
          - name: late-hedge
            when: { header: { x-a: "1" } }
            route: cloud
            hedge_after_s: 1.5
          - name: rule-deadline
            when: { header: { x-b: "1" } }
            route: cloud
            first_token_timeout_s: 0.5
            hedge_after_s: 1
          - name: home-first
            when: { header: { x-c: "1" } }
            route: local
            fallback: [cloud]
            hedge_after_s: 5
          - name: fine
            route: cloud
            hedge_after_s: 0.5
        """))
    lines = path.read_text().splitlines()
    result = CliRunner().invoke(cli, ["policy", "check", "--strict", str(path)])
    assert result.exit_code == 1, result.output
    warned = [w for w in result.output.splitlines() if "never fires" in w]
    assert [int(w.split(":")[1]) for w in warned] == [
        lines.index("    hedge_after_s: 1.5") + 1, lines.index("    hedge_after_s: 1") + 1]
    assert ("rule 'late-hedge': hedge_after_s 1.5s is not below the first-token deadline of its route 'cloud' "
            "(1.5s, the target's first_token_timeout_s)") in warned[0]
    assert "'rule-deadline'" in warned[1] and "(0.5s, the rule's first_token_timeout_s)" in warned[1]
