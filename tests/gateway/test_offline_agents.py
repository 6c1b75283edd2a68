"""Agents offline: tools and structured output answered by the built-in engine through the gateway.

The cloud target is unreachable, so every request falls back to the in-process engine. The
official SDKs are the clients. Each request of the table is sent whole and streamed; the answer
must parse and validate against its schema every time (the grammar guarantees it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.support.gateway import RunningGateway, run_gateway
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


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    path: Path = tmp_path_factory.mktemp("agents") / "p.yaml"
    path.write_text(POLICY)
    with run_gateway(path) as running:
        yield running


@pytest.fixture(scope="module")
def client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def _schemas(req: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in req.get("tools", [])}


def _check(req: dict[str, Any], expected: str, content: str | None, calls: list[tuple[str, str]], finish: str) -> None:
    """The answer is what the request allows, and every JSON in it validates."""
    schemas = _schemas(req)
    if calls:
        assert expected in ("calls", "any"), (content, calls)
        assert finish == "tool_calls" and not content
        choice = req.get("tool_choice")
        for name, args in calls:
            assert name in schemas
            if isinstance(choice, dict):
                assert name == choice["function"]["name"]
            jsonschema.validate(json.loads(args), schemas[name])
        if req.get("parallel_tool_calls") is False:
            assert len(calls) == 1
        return
    assert expected in ("json", "text", "any") and content, (content, finish)
    fmt = req.get("response_format")
    if fmt is not None:
        assert finish == "stop"
        value = json.loads(content)
        schema = fmt["json_schema"]["schema"] if fmt["type"] == "json_schema" else {"type": "object"}
        jsonschema.validate(value, schema)


@pytest.mark.parametrize("req, expected", [pytest.param(r, e, id=i) for i, r, e in CASES])
def test_answers_parse_and_validate_whole_and_streamed(client: openai.OpenAI, req: dict[str, Any], expected: str) -> None:
    body = {"model": "auto", "max_tokens": 160, **req}
    raw = client.chat.completions.with_raw_response.create(**body)
    assert raw.headers["x-hybrid-route"] == "local"
    assert "ignores" not in raw.headers.get("x-hybrid-warning", "")  # tools / response_format honoured
    r = raw.parse()
    msg = r.choices[0].message
    calls = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    assert all(c.id.startswith("call_") for c in msg.tool_calls or [])
    _check(req, expected, msg.content, calls, r.choices[0].finish_reason)

    content, streamed, finish = "", {}, None
    for chunk in client.chat.completions.create(**body, stream=True):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            slot = streamed.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
            slot["id"] = slot["id"] or tc.id
            slot["name"] += (tc.function.name or "") if tc.function else ""
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    s_calls = [(v["name"], v["arguments"]) for _, v in sorted(streamed.items())]
    assert all(v["id"] for v in streamed.values())
    _check(req, expected, content or None, s_calls, finish or "")
    if "temperature" not in req:  # greedy: the same answer both ways
        assert (content or None, s_calls) == (msg.content or None, calls)


def test_enough_cases() -> None:
    assert len(CASES) >= 30


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


def test_anthropic_sdk_gets_a_tool_use_block_offline(gw: RunningGateway) -> None:
    client = anthropic.Anthropic(base_url=gw.base_url, api_key="x", max_retries=0, timeout=120)
    tool = {"name": "get_weather", "description": "Current weather in a city",
            "input_schema": WEATHER["function"]["parameters"]}
    msg = client.messages.create(model="auto", max_tokens=60, messages=ask("Weather in Paris?"), tools=[tool],
                                 tool_choice={"type": "any"})
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and uses and uses[0].name == "get_weather"
    jsonschema.validate(uses[0].input, tool["input_schema"])
    with client.messages.stream(model="auto", max_tokens=60, messages=ask("Weather in Paris?"), tools=[tool],
                                tool_choice={"type": "any"}) as stream:  # input_json deltas, assembled by the SDK
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(u.name, u.input) for u in uses]


def test_responses_api_gets_a_function_call_and_json_offline(client: openai.OpenAI) -> None:
    tool = {"type": "function", "name": "get_time", "description": "Current time in a timezone",
            "parameters": TIME["function"]["parameters"], "strict": False}
    resp = client.responses.create(model="auto", input="What time is it in Tokyo?", tools=[tool], tool_choice="required",
                                   max_output_tokens=60)
    calls = [o for o in resp.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_time"
    jsonschema.validate(json.loads(calls[0].arguments), tool["parameters"])
    events = list(client.responses.create(model="auto", input="What time is it in Tokyo?", tools=[tool],
                                          tool_choice="required", max_output_tokens=60, stream=True))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = events[-1].response
    s_calls = [o for o in done.output if o.type == "function_call"]
    assert args == s_calls[0].arguments == calls[0].arguments  # streamed as argument deltas, same call
    resp = client.responses.create(model="auto", input="Invent a person.", max_output_tokens=60,
                                   text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(resp.output_text), PERSON)


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
