"""Agents offline: tools and structured output answered by the built-in engine through the gateway.

The cloud target is forced offline, so every request is answered by the in-process engine. The
official SDKs are the clients. The table of requests goes through all three chat APIs (chat
completions, Anthropic Messages, Responses), whole and streamed, without costing six times one
API: each request is sent twice, once whole and once streamed, on two different APIs; within each
kind of request (calls, JSON, text, text-or-calls) the APIs rotate, so every API x mode gets its
share of every kind (`test_every_api_and_mode_gets_every_kind`). Every answer must parse and
validate against its schema (the grammar guarantees it); a greedy request answers the same on both
of its APIs. The policy's `local_tools: refuse` and a packed MoE model are exercised on the same
gateway."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.support.gateway import RunningGateway, run_gateway
from tests.support.three_apis import APIS, Answer, ThreeAPIs, can_express
from tests.support.upstream import FakeUpstream, Fault

pytestmark = pytest.mark.slow  # the built-in engine generates every answer under a grammar

POLICY = """
version: 1
targets:
  cloud: {kind: cloud, model: openai/gpt-x, api_base: "http://127.0.0.1:1/v1", api_key: sk-x, timeout_s: 2, retries: 0}
  local: {kind: local, engine: local_engine, model_path: "builtin:smollm2-135m", default_max_tokens: 120}
connectivity: {probe_interval_s: 30}
privacy: {enabled: false}
difficulty: {method: heuristic}
rules:
  - {name: all, route: cloud, fallback: [local]}
"""
# The same gateway also serves a packed MoE model (pinned by name) and a rule that refuses
# structured requests on the device.
MOE_TARGET = '  moe: {kind: local, engine: local_engine, model_path: "MOE_DIR", default_max_tokens: 300, threads: 1}\n'
STRICT_RULE = "  - {name: strict-agents, when: {header: {x-agents: strict}}, route: cloud, fallback: [local], local_tools: refuse}\n"
STRICT = {"x-agents": "strict"}


def fn(name: str, description: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    f: dict[str, Any] = {"name": name, "description": description}
    if parameters is not None:
        f["parameters"] = parameters
    return {"type": "function", "function": f}


WEATHER = fn("get_weather", "Current weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]})
TIME = fn("get_time", "Current time in an IANA timezone", {
    "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]})
FLIGHT = fn("book_flight", "Book a flight", {
    "type": "object", "properties": {
        "origin": {"type": "string", "pattern": "^[A-Z]{3}$"}, "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "date": {"type": "string", "pattern": "^2027-[01][0-9]-[0-3][0-9]$"},
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
        "cabin": {"type": "string", "enum": ["economy", "business", "first"]}},
    "required": ["origin", "destination", "date", "passengers"]})
TODO = fn("add_todo", "Add a to-do item", {
    "type": "object", "properties": {
        "title": {"type": "string", "minLength": 3, "maxLength": 60},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["home", "work", "urgent"]}, "maxItems": 3},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5}, "done": {"type": "boolean"}},
    "required": ["title", "priority"]})
USER = fn("create_user", "Create a user account", {
    "type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
        "roles": {"type": "array", "items": {"type": "string", "enum": ["admin", "editor", "viewer"]}, "minItems": 1}},
    "required": ["name", "address", "roles"]})
SEARCH = fn("search_docs", "Search the documentation", {
    "type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": 20},
        "filters": {"type": "object", "properties": {"lang": {"type": "string", "enum": ["en", "fr", "de"]},
                                                     "year_min": {"type": "integer", "minimum": 1990}}}},
    "required": ["query"]})
CONVERT = fn("convert_currency", "Convert money between currencies", {
    "type": "object", "properties": {
        "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000000},
        "from": {"type": "string", "enum": ["USD", "EUR", "JPY", "GBP"]}, "to": {"type": "string", "enum": ["USD", "EUR", "JPY", "GBP"]}},
    "required": ["amount", "from", "to"], "additionalProperties": False})
RANDOM = fn("random_number", "A random number", None)  # no parameters at all
NULLABLE = fn("set_reminder", "Set or clear a reminder", {
    "type": "object", "properties": {"at": {"type": ["string", "null"]}, "note": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
    "required": ["at"]})


def rf(name: str, schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "strict": strict, "schema": schema}}


PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
RECIPE = {"type": "object", "properties": {
    "title": {"type": "string"}, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
    "ingredients": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
        "type": "object", "properties": {"item": {"type": "string"}, "grams": {"type": "number", "minimum": 0}},
        "required": ["item", "grams"], "additionalProperties": False}}},
    "required": ["title", "servings", "ingredients"], "additionalProperties": False}
EVENT = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40}, "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
    "kind": {"type": "string", "enum": ["meeting", "party", "deadline"]}, "online": {"type": "boolean"}},
    "required": ["title", "date", "kind", "online"], "additionalProperties": False}
ORDER = {"$defs": {"line": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                                                            "qty": {"type": "integer", "minimum": 1, "maximum": 10}},
                            "required": ["sku", "qty"], "additionalProperties": False}},
         "type": "object", "properties": {"customer": {"type": "object", "properties": {"name": {"type": "string"}},
                                                       "required": ["name"]},
                                          "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}, "minItems": 1, "maxItems": 3}},
         "required": ["customer", "lines"]}
OPTIONAL = {"type": "object", "properties": {"nickname": {"type": "string"}, "score": {"type": "number", "minimum": -1, "maximum": 1}},
            "additionalProperties": False}
ANSWER = {"type": "object", "properties": {"answer": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                                           "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                                           "source": {"type": ["string", "null"]}, "version": {"const": 2}},
          "required": ["answer", "confidence", "source", "version"], "additionalProperties": False}

HISTORY = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_a1", "content": '{"temp_c": 18, "sky": "clear"}'},
]
PARALLEL_HISTORY = [
    {"role": "user", "content": "Weather in Oslo and the time in Tokyo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_b1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_b2", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "Asia/Tokyo"}'}}]},
    {"role": "tool", "tool_call_id": "call_b1", "content": "3 C, snow"},
    {"role": "tool", "tool_call_id": "call_b2", "content": "21:40"},
]


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


# (id, request, expected): expected "calls" (tool calls only), "json" (content is JSON of the
# request's schema), "text" (content only), "any" (auto: text or calls)
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("weather-required", {"messages": ask("Weather in Paris?"), "tools": [WEATHER], "tool_choice": "required"}, "calls"),
    ("weather-auto", {"messages": ask("What's the weather like in Rome right now?"), "tools": [WEATHER],
                      "max_tokens": 48}, "any"),
    ("time-named", {"messages": ask("What time is it in Tokyo?"), "tools": [WEATHER, TIME], "tool_choice": named("get_time")}, "calls"),
    ("parallel-two", {"messages": ask("Weather in Oslo and the time in Tokyo?"), "tools": [WEATHER, TIME],
                      "tool_choice": "required"}, "calls"),
    ("parallel-off", {"messages": ask("Weather in Oslo and the time in Tokyo?"), "tools": [WEATHER, TIME],
                      "tool_choice": "required", "parallel_tool_calls": False}, "calls"),
    ("flight-patterns", {"messages": ask("Book 2 seats from JFK to LHR on 2027-03-14, business class."),
                         "tools": [FLIGHT], "tool_choice": "required"}, "calls"),
    ("todo-bounds", {"messages": ask("Remind me to buy milk, urgent, home."), "tools": [TODO], "tool_choice": named("add_todo")}, "calls"),
    ("user-nested", {"messages": ask("Create an editor account for Ana, 31, 5 Rue Haute, Lyon 69001."),
                     "tools": [USER], "tool_choice": "required"}, "calls"),
    ("search-optional-nested", {"messages": ask("Find French docs about caching since 2020."), "tools": [SEARCH, WEATHER],
                                "tool_choice": named("search_docs")}, "calls"),
    ("convert-number", {"messages": ask("How much is 250 dollars in euros?"), "tools": [CONVERT], "tool_choice": "required"}, "calls"),
    ("no-parameters", {"messages": ask("Give me a random number."), "tools": [RANDOM], "tool_choice": "required"}, "calls"),
    ("nullable-anyof", {"messages": ask("Clear my reminder."), "tools": [NULLABLE], "tool_choice": "required"}, "calls"),
    ("many-tools-required", {"messages": [{"role": "system", "content": "You are a travel agent."},
                                          *ask("I need a flight from CDG to NRT.")],
                             "tools": [WEATHER, TIME, FLIGHT], "tool_choice": "required", "max_tokens": 70}, "calls"),
    ("choice-none", {"messages": ask("Say hello."), "tools": [WEATHER], "tool_choice": "none", "max_tokens": 16}, "text"),
    ("auto-chitchat", {"messages": ask("Tell me a joke."), "tools": [CONVERT], "max_tokens": 24}, "any"),
    ("multiturn-final", {"messages": HISTORY, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 30}, "text"),
    ("multiturn-next-call", {"messages": [*HISTORY, {"role": "assistant", "content": "It is 18 C and clear in Paris."},
                                          {"role": "user", "content": "And the time there?"}],
                             "tools": [WEATHER, TIME], "tool_choice": named("get_time")}, "calls"),
    ("multiturn-parallel-results", {"messages": PARALLEL_HISTORY, "tools": [WEATHER, TIME], "tool_choice": "required"}, "calls"),
    ("multiturn-auto", {"messages": HISTORY, "tools": [WEATHER], "max_tokens": 30}, "any"),
    ("multiturn-parallel-final", {"messages": PARALLEL_HISTORY, "tools": [WEATHER, TIME], "tool_choice": "none",
                                  "max_tokens": 30}, "text"),
    ("json-object", {"messages": ask("Describe a cat as a JSON object."), "response_format": {"type": "json_object"},
                     "max_tokens": 200}, "json"),
    ("json-person", {"messages": ask("Invent a person."), "response_format": rf("person", PERSON)}, "json"),
    ("json-person-not-strict", {"messages": ask("Invent a person."), "response_format": rf("person", PERSON, strict=False)}, "json"),
    ("json-recipe-nested-array", {"messages": ask("A pancake recipe."), "response_format": rf("recipe", RECIPE),
                                  "max_tokens": 160}, "json"),
    ("json-event-enum-pattern", {"messages": ask("Plan a team party."), "response_format": rf("event", EVENT)}, "json"),
    ("json-order-ref", {"messages": ask("An order for Bob: two AB-123."), "response_format": rf("order", ORDER)}, "json"),
    ("json-optional-only", {"messages": ask("Rate this: great movie."), "response_format": rf("opt", OPTIONAL)}, "json"),
    ("json-anyof-const-null", {"messages": ask("What is 6 times 7?"), "response_format": rf("answer", ANSWER)}, "json"),
    ("json-with-system", {"messages": [{"role": "system", "content": "Answer in JSON."}, *ask("Invent a person.")],
                          "response_format": rf("person", PERSON), "temperature": 0.8, "seed": 7}, "json"),
    ("json-after-tool-result", {"messages": [*HISTORY, {"role": "user", "content": "Summarise as JSON."}],
                                "response_format": rf("event", EVENT)}, "json"),
    ("tools-and-json", {"messages": ask("Invent a person."), "tools": [WEATHER], "response_format": rf("person", PERSON)}, "any"),
    ("sampled-calls", {"messages": ask("Weather in Madrid in fahrenheit?"), "tools": [WEATHER], "tool_choice": "required",
                       "temperature": 1.0, "top_p": 0.9, "seed": 5}, "calls"),
]


def _rotation(k: int) -> tuple[str, ...]:
    return APIS[k % 3:] + APIS[:k % 3]


def assign(cases: list[tuple[str, dict[str, Any], str]]) -> dict[str, tuple[str, str]]:
    """Case id -> (API it is sent whole on, API it is streamed on): the APIs rotate within each kind,
    skipping one that cannot say the request."""
    seen: Counter[str] = Counter()
    out = {}
    for cid, req, kind in cases:
        k = seen[kind]
        seen[kind] += 1
        whole = next(a for a in _rotation(k) if can_express(a, req))
        out[cid] = whole, next(a for a in _rotation(k + 1) if can_express(a, req) and a != whole)
    return out


PATHS = assign(CASES)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic Qwen3-MoE (random weights, its own BPE and chat template), packed (~1 s)."""
    from click.testing import CliRunner

    from local_engine.cli import main

    root = tmp_path_factory.mktemp("moe")
    for args in (["demo-moe", str(root / "src")], ["pack", str(root / "src"), str(root / "packed")]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
    return root / "packed"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, moe_dir: Path) -> Iterator[RunningGateway]:
    path: Path = tmp_path_factory.mktemp("agents") / "p.yaml"
    policy = POLICY.replace("connectivity:", MOE_TARGET.replace("MOE_DIR", str(moe_dir)) + "connectivity:")
    path.write_text(policy.replace("rules:\n", "rules:\n" + STRICT_RULE))
    with run_gateway(path, force="offline") as running:
        yield running


@pytest.fixture(scope="module")
def apis(gw: RunningGateway) -> ThreeAPIs:
    return ThreeAPIs(gw.base_url)


@pytest.fixture(scope="module")
def client(apis: ThreeAPIs) -> openai.OpenAI:
    return apis.openai


def _schemas(req: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in req.get("tools", [])}


def _check(req: dict[str, Any], expected: str, a: Answer) -> None:
    """The answer is what the request allows, and every JSON in it validates."""
    schemas = _schemas(req)
    if a.calls:
        assert expected in ("calls", "any"), a
        assert a.finish == "tool_calls" and not a.content
        choice = req.get("tool_choice")
        for name, args in a.calls:
            assert name in schemas
            if isinstance(choice, dict):
                assert name == choice["function"]["name"]
            jsonschema.validate(json.loads(args), schemas[name])
        if req.get("parallel_tool_calls") is False:
            assert len(a.calls) == 1
        return
    assert expected in ("json", "text", "any") and a.content, a
    fmt = req.get("response_format")
    if fmt is not None:
        assert a.finish == "stop"
        value = json.loads(a.content)
        schema = fmt["json_schema"]["schema"] if fmt["type"] == "json_schema" else {"type": "object"}
        jsonschema.validate(value, schema)


@pytest.mark.parametrize("req, expected, whole_api, stream_api",
                         [pytest.param(r, e, *PATHS[i], id=f"{i}:{PATHS[i][0]}/{PATHS[i][1]}-streamed")
                          for i, r, e in CASES])
def test_answers_parse_and_validate(apis: ThreeAPIs, req: dict[str, Any], expected: str, whole_api: str,
                                    stream_api: str) -> None:
    answers = []
    for api, stream in ((whole_api, False), (stream_api, True)):
        said, answer = apis.send(api, req, stream=stream)
        assert answer.headers["x-hybrid-route"] == "local"
        assert "x-hybrid-warning" not in answer.headers  # tools / response_format honoured, nothing dropped
        # Messages says "JSON" as a forced tool: the answer is a call whose input is the JSON
        _check(said.request, "calls" if said.translated else expected, answer)
        answers.append((said.translated, answer))
    (t1, whole), (t2, streamed) = answers
    if "temperature" not in req and not (t1 or t2):  # greedy: the same answer on both APIs
        assert whole.same_as(streamed), (whole, streamed)


def test_every_api_and_mode_gets_every_kind() -> None:
    assert len(CASES) >= 30
    kinds = {e for _, _, e in CASES}
    share: dict[tuple[str, str], set[str]] = {}
    for cid, _, kind in CASES:
        whole, streamed = PATHS[cid]
        assert whole != streamed
        share.setdefault((whole, "whole"), set()).add(kind)
        share.setdefault((streamed, "stream"), set()).add(kind)
    assert {k: v for k, v in share.items() if v != kinds} == {}
    assert len(share) == 6


def test_unenforceable_schema_is_a_400_naming_the_keyword(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="auto", messages=ask("ids?"), response_format=rf("ids", schema))
    err = e.value.body
    assert "uniqueItems" in err["message"] and err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model="auto", messages=ask("x"), tools=[WEATHER], tool_choice=named("nope"))


def test_agent_loop_three_steps_offline(client: openai.OpenAI) -> None:
    """call -> tool result -> call -> tool result -> final answer, the way an agent drives the SDK."""
    def get_weather(city: str, unit: str = "celsius") -> str:
        return json.dumps({"city": city, "temp": 18 if unit == "celsius" else 64, "unit": unit})

    def get_time(tz: str) -> str:
        return json.dumps({"tz": tz, "time": "14:05"})

    impl = {"get_weather": get_weather, "get_time": get_time}
    messages: list[Any] = [{"role": "system", "content": "Use the tools, one at a time, then answer."},
                           *ask("What's the weather in Paris, and what time is it there?")]
    # an agent that wants both facts first: a call is required until it has them, then it answers
    plan = ["required", named("get_time"), "none"]
    finishes = []
    for choice in plan:
        r = client.chat.completions.create(model="auto", messages=messages, tools=[WEATHER, TIME], tool_choice=choice,
                                           parallel_tool_calls=False, max_tokens=60)
        msg, finish = r.choices[0].message, r.choices[0].finish_reason
        finishes.append(finish)
        messages.append(msg.model_dump(exclude_none=True))
        for call in msg.tool_calls or []:
            args = json.loads(call.function.arguments)
            messages.append({"role": "tool", "tool_call_id": call.id, "content": impl[call.function.name](**args)})
    roles = [m["role"] for m in messages[2:]]
    assert roles == ["assistant", "tool", "assistant", "tool", "assistant"], roles
    assert finishes[:2] == ["tool_calls", "tool_calls"] and finishes[2] in ("stop", "length")
    assert messages[4]["tool_calls"][0]["function"]["name"] == "get_time"
    assert messages[6]["content"] and not messages[6].get("tool_calls")


def test_local_tools_refuse_answers_each_api_in_its_own_shape(gw: RunningGateway) -> None:
    """A rule with `local_tools: refuse`, the cloud offline: a structured request is refused with an
    error naming the rule, in chat's, Responses' and Messages' shapes, streamed or not; plain chat
    through the same rule is still answered on the device."""
    strict = ThreeAPIs(gw.base_url, headers=STRICT)
    with pytest.raises(openai.PermissionDeniedError) as e:
        strict.openai.chat.completions.create(model="auto", messages=ask("Weather in Paris?"), tools=[WEATHER])
    assert e.value.body["code"] == "local_tools_refused" and e.value.body["type"] == "permission_error"
    assert e.value.body["message"] == (
        "This request has tools, and rule 'strict-agents' does not answer those on local targets "
        "(policy: local_tools = refuse); no cloud target of its chain is online (cloud offline).")
    assert e.value.response.headers["x-hybrid-rule"] == "strict-agents"
    with pytest.raises(openai.PermissionDeniedError, match="rule 'strict-agents'"):
        strict.openai.chat.completions.create(model="auto", messages=ask("Invent a person."), stream=True,
                                              response_format=rf("person", PERSON))
    with pytest.raises(openai.PermissionDeniedError) as e:
        strict.openai.responses.create(model="auto", input="Invent a person.", text={"format": {
            "type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    assert e.value.body["code"] == "local_tools_refused"
    assert e.value.body["message"].startswith("This request has a response_format, and rule 'strict-agents'")
    tool = {"name": "get_weather", "description": "Weather", "input_schema": WEATHER["function"]["parameters"]}
    for stream in (False, True):
        with pytest.raises(anthropic.PermissionDeniedError) as ae:
            strict.anthropic.messages.create(model="auto", max_tokens=60, messages=ask("Weather in Paris?"),
                                             tools=[tool], stream=stream)
        assert ae.value.body["type"] == "error" and ae.value.body["error"]["type"] == "permission_error"
        assert "rule 'strict-agents'" in ae.value.body["error"]["message"]
    plain = strict.openai.chat.completions.with_raw_response.create(model="auto", messages=ask("Hi"), max_tokens=4)
    assert (plain.headers["x-hybrid-rule"], plain.headers["x-hybrid-route"]) == ("strict-agents", "local")


def test_explain_shows_what_a_structured_request_will_get(gw: RunningGateway) -> None:
    body = {"model": "auto", "messages": ask("Invent a person."), "response_format": rf("person", PERSON)}
    with gw.client() as c:
        honoured = c.post("/v1/route/explain", json=body).json()
        refused = c.post("/v1/route/explain", json=body, headers=STRICT).json()
    assert honoured["features"]["has_response_format"] is True
    d = honoured["decision"]
    assert (d["action"], d["target"], d["fallbacks"], d["local_tools"]) == ("route", "cloud", ["local"], "honour")
    assert "a response_format: honoured on local targets local (local_tools: honour)" in d["notes"]
    d = refused["decision"]
    assert (d["action"], d["rule"], d["local_tools"]) == ("block", "strict-agents", "refuse")
    assert d["block"]["status"] == 403 and "local_tools = refuse" in d["block"]["message"]


@pytest.mark.parametrize("api", APIS)
def test_a_packed_moe_model_honours_tools_and_json_schema(apis: ThreeAPIs, api: str) -> None:
    """The synthetic MoE writes gibberish, yet through each API, whole and streamed, its calls and its
    JSON parse and validate."""
    for req, expected in (({"messages": ask("hi"), "tools": [WEATHER], "tool_choice": "required"}, "calls"),
                          ({"messages": ask("hi"), "response_format": rf("person", PERSON)}, "json")):
        for stream in (False, True):
            said, answer = apis.send(api, {**req, "model": "moe", "max_tokens": 300}, stream=stream)
            assert answer.headers["x-hybrid-route"] == "moe"
            _check(said.request, "calls" if said.translated else expected, answer)


def test_json_stream_broken_mid_answer_is_finished_under_the_schema(tmp_path: Path) -> None:
    """Mid-stream resume (continue_final_message) with a response_format: the engine's grammar
    starts from the cloud's partial JSON, so the joined answer still validates."""
    whole = '{"name": "Ada Lovelace", "age": 36}'
    with FakeUpstream(model="cloud-model", name="cloud", reply=lambda body: whole) as cloud:
        cloud.fault = Fault("truncated", after_chunks=3)  # 3 chunks of 4 characters, then cut
        path = tmp_path / "p.yaml"
        path.write_text(POLICY.replace('"http://127.0.0.1:1/v1"', f'"{cloud.base_url}"').replace("timeout_s: 2", "timeout_s: 5"))
        with run_gateway(path) as gw:
            client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0, timeout=120)
            chunks = list(client.chat.completions.create(model="auto", messages=ask("Invent a person."), stream=True,
                                                         response_format=rf("person", PERSON), max_tokens=60))
            wanted = 'hybrid_fallbacks_total{reason="resumed_mid_stream:protocol",source="cloud",to="local"} 1.0'
            with httpx.Client(base_url=gw.base_url) as c:
                for _ in range(50):  # recorded a moment after the client's [DONE]
                    if wanted in c.get("/metrics").text:
                        break
                    time.sleep(0.05)
                else:
                    raise AssertionError("no resumed_mid_stream fallback recorded")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(whole[:12]) and cloud.received  # the cloud's part, then the engine's
    jsonschema.validate(json.loads(text), PERSON)
