"""Grammar-constrained decoding on the built-in model: JSON schemas, tools, and how the mask
composes with sampling, stop strings and continue_final_message."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from local_engine import grammar, tools
from local_engine.errors import EngineError

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog", "fish"]}}},
    "required": ["name", "age", "pets"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}


def _rf(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": schema}}


def _ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_mask_allows_exactly_the_grammar(smol) -> None:
    g = grammar.Grammar.json_schema({"type": "string", "enum": ["yes", "no"]})
    proc = grammar.GrammarProcessor(g, grammar.grammar_tokenizer(smol.tokenizer))
    logits = torch.zeros(smol.tokenizer.vocab_size)
    masked = proc.mask(logits)
    allowed = torch.isfinite(masked).nonzero().flatten().tolist()
    assert allowed and all(smol.tokenizer.decode([i]).startswith('"') for i in allowed)
    assert torch.all(logits == 0)  # the caller's logits are left alone
    eos = sorted(smol.tokenizer.stop_ids)
    assert not any(i in allowed for i in eos)  # not accepting yet: the turn cannot end


@pytest.mark.parametrize("opts", [{"temperature": 0}, {"temperature": 1.2, "top_p": 0.95, "seed": 3},
                                  {"temperature": 0.9, "top_k": 20, "seed": 11, "repetition_penalty": 1.3}])
def test_json_schema_output_validates_under_sampling(smol, opts) -> None:
    gen = smol.chat(_ask("Describe a person with pets."), response_format=_rf(PERSON), max_tokens=90, **opts)
    text = "".join(gen)
    assert gen.finish_reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)
    if "seed" in opts:  # seeded draws stay reproducible under the mask
        again = "".join(smol.chat(_ask("Describe a person with pets."), response_format=_rf(PERSON),
                                  max_tokens=90, **opts))
        assert again == text


def test_json_object_is_an_object(smol) -> None:
    text = "".join(gen := smol.chat(_ask("Give me a book as JSON."), response_format={"type": "json_object"},
                                    max_tokens=200))
    assert gen.finish_reason == "stop" and isinstance(json.loads(text), dict)


def test_stop_strings_cut_free_text_but_never_json(smol) -> None:
    free = smol.chat(_ask("What is the capital of France?"), tools=[WEATHER], tool_choice="auto",
                     stop=["Paris"], max_tokens=30)
    text = "".join(free)
    assert free.finish_reason == "stop" and "Paris" not in text and text  # the text answer was cut
    structured = smol.chat(_ask("Describe a person with pets."), response_format=_rf(PERSON),
                           stop=[",", '"'], max_tokens=90)
    jsonschema.validate(json.loads("".join(structured)), PERSON)  # stop strings inside JSON ignored


def test_continue_final_message_resumes_inside_the_json(smol) -> None:
    partial = '{"name": "Ada", "age": 3'
    msgs = [*_ask("Describe a person with pets."), {"role": "assistant", "content": partial}]
    rest = "".join(smol.chat(msgs, response_format=_rf(PERSON), continue_final_message=True, max_tokens=60))
    jsonschema.validate(json.loads(partial + rest), PERSON)
    bad = [*_ask("hi"), {"role": "assistant", "content": "Sure, here"}]
    with pytest.raises(grammar.GrammarError, match="does not match"):
        smol.chat(bad, response_format=_rf(PERSON), continue_final_message=True, max_tokens=5)


@pytest.mark.parametrize("schema, word", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ({"type": 12}, "not a valid JSON Schema"),
])
def test_unenforceable_schema_is_an_error_naming_the_keyword(smol, schema, word) -> None:
    with pytest.raises(grammar.GrammarError, match=word):
        smol.chat(_ask("x"), response_format=_rf(schema), max_tokens=5)
    with pytest.raises(EngineError, match=word):
        smol.chat(_ask("x"), tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}],
                  max_tokens=5)


def test_generation_schema_is_narrower_never_wider() -> None:
    narrowed = grammar.json_for_generation(PERSON)
    assert narrowed["additionalProperties"] is False and narrowed["properties"]["pets"]["maxItems"] == grammar.MAX_ITEMS
    assert narrowed["properties"]["name"]["maxLength"] == grammar.MAX_STRING
    keep = {"type": "array", "minItems": 20, "items": {"type": "string", "enum": ["a"], "minLength": 1}}
    assert grammar.json_for_generation(keep)["maxItems"] == 20 and "maxLength" not in keep["items"]
    # an open-ended pattern is capped (the built-in model wrote [a-z_]+ until max_tokens) unless
    # no match would fit under the cap
    assert grammar.json_for_generation({"type": "string", "pattern": "^[a-z_]+$"})["maxLength"] == grammar.MAX_STRING
    assert "maxLength" not in grammar.json_for_generation({"type": "string", "pattern": "^a{100}$"})


@pytest.mark.parametrize("choice, names", [("required", None), ({"type": "function", "function": {"name": "get_time"}},
                                                                 {"get_time"})])
def test_tool_calls_are_well_formed(smol, choice, names) -> None:
    gen = smol.chat(_ask("What's the weather in Paris and the time in Tokyo?"), tools=[WEATHER, TIME],
                    tool_choice=choice, max_tokens=80)
    "".join(gen)
    content, calls = gen.parsed()
    assert gen.finish_reason == "stop" and content is None and calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for c in calls:
        assert names is None or c.name in names
        jsonschema.validate(json.loads(c.arguments), schemas[c.name])


def test_parallel_false_makes_one_call(smol) -> None:
    gen = smol.chat(_ask("What's the weather in Paris and the time in Tokyo?"), tools=[WEATHER, TIME],
                    tool_choice="required", parallel_tool_calls=False, max_tokens=80)
    "".join(gen)
    assert len(gen.parsed()[1]) == 1


def test_bad_tool_requests() -> None:
    with pytest.raises(tools.ToolError, match="not in tools"):
        tools.parse_spec([WEATHER], {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(tools.ToolError, match="no tools"):
        tools.parse_spec(None, "required")
    with pytest.raises(tools.ToolError, match="unique"):
        tools.parse_spec([WEATHER, WEATHER])


def test_fallback_prompt_renders_tools_calls_and_results(smol) -> None:
    assert not tools.template_renders_tools(smol.tokenizer.chat_template)  # SmolLM2 has no tool convention
    history = [*_ask("Weather in Paris?"),
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C, clear"}]
    spec = tools.parse_spec([WEATHER], "auto")
    msgs, tpl_tools = tools.prompt_messages(history, spec, template_has_tools=False)
    text = smol.render_chat(msgs, tools=tpl_tools)
    assert "<tools>" in text and '"get_weather"' in text and text.index("<tools>") < text.index("Weather in Paris?")
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n18 C, clear\n</tool_response><|im_end|>" in text


def test_an_answer_that_may_not_call_does_not_imitate_a_call(smol) -> None:
    """After a history of calls and results, tool_choice none (or no tools at all) answers in words:
    unconstrained, the built-in model wrote a <tool_call> block as its text answer."""
    history = [*_ask("What's the weather in Paris, and what time is it there?"),
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18, "sky": "clear"}'},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_2", "type": "function", "function": {
                   "name": "get_time", "arguments": '{"tz": "Europe/Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_2", "content": '{"time": "14:05"}'}]
    for kw in ({"tools": [WEATHER, TIME], "tool_choice": "none"}, {}):
        text = "".join(gen := smol.chat(history, max_tokens=40, **kw))
        assert text and not text.startswith("<") and "<tool" not in text, text
        assert gen.parsed() == (text, [])
    assert tools.shows_calls(history) and not tools.shows_calls(_ask("hi"))  # plain chat: no grammar


def test_template_with_its_own_tool_convention_gets_the_tools() -> None:
    tpl = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
           "{% for m in messages %}{{ m.role }}: {% if m.tool_calls %}{% for c in m.tool_calls %}"
           "CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}{% else %}{{ m.content }}{% endif %}\n"
           "{% endfor %}")
    assert tools.template_renders_tools(tpl)
    history = [*_ask("hi"), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
    msgs, tpl_tools = tools.prompt_messages(history, tools.parse_spec([WEATHER]), template_has_tools=True)
    from local_engine.chat_template import render

    out = render(tpl, msgs, tools=tpl_tools, add_generation_prompt=False)
    assert out.startswith("TOOLS:get_weather;") and "CALL get_weather Oslo" in out  # arguments as an object


def test_call_stream_matches_whole_parse() -> None:
    text = (tools.call_text("get_weather", {"city": "Paris", "note": "a}b"}) + "\n"
            + tools.call_text("get_time", {"tz": "UTC"}))
    for step in (1, 3, 7, len(text)):
        cs = tools.CallStream()
        events = [e for i in range(0, len(text), step) for e in cs.feed(text[i:i + step])] + list(cs.close())
        names = [e[2] for e in events if e[0] == "call"]
        args: dict[int, str] = {}
        for e in events:
            if e[0] == "args":
                args[e[1]] = args.get(e[1], "") + e[2]
        content, calls = tools.parse(text)
        assert content is None and names == [c.name for c in calls] == ["get_weather", "get_time"]
        assert [args[i] for i in range(2)] == [c.arguments for c in calls]
    cs = tools.CallStream()
    plain = [e for ch in "<tool is not a call" for e in cs.feed(ch)] + list(cs.close())
    assert "".join(e[1] for e in plain) == "<tool is not a call" and {e[0] for e in plain} == {"content"}


def test_a_call_that_would_not_fit_is_not_started(smol) -> None:
    msgs = _ask("What's the weather in Paris and the time in Tokyo?")
    whole = smol.chat(msgs, tools=[WEATHER, TIME], tool_choice="required", max_tokens=160)
    "".join(whole)
    first = whole.parsed()[1][0]
    one_call = len(smol.tokenizer.encode(tools.call_text(first.name, json.loads(first.arguments))))
    assert len(whole.parsed()[1]) == 2  # with room, the model makes a second call ...
    gen = smol.chat(msgs, tools=[WEATHER, TIME], tool_choice="required", max_tokens=one_call + 10)
    text = "".join(gen)
    assert gen.finish_reason == "stop" and text.endswith("</tool_call>")  # ... without, it ends after the first
    assert [c.name for c in gen.parsed()[1]] == [first.name]


def test_a_call_cut_by_max_tokens_is_a_call_not_markup(smol) -> None:
    """As OpenAI's finish_reason "length": the call with the arguments written so far, the same
    whole as streamed (the gateway's answer used to carry the raw <tool_call> text as content)."""
    gen = smol.chat(_ask("What's the weather in Paris?"), tools=[WEATHER], tool_choice="required", max_tokens=20)
    text = "".join(gen)
    assert gen.finish_reason == "length" and text.startswith(tools.OPEN) and not text.endswith(tools.CLOSE)
    content, calls = gen.parsed()
    assert content is None and [c.name for c in calls] == ["get_weather"]
    assert calls[0].arguments and text.endswith(calls[0].arguments)
    cs = tools.CallStream()
    streamed = "".join(e[2] for e in (*cs.feed(text), *cs.close()) if e[0] == "args")
    assert streamed == calls[0].arguments


def test_a_packed_moe_model_is_constrained_too(tmp_path) -> None:
    """The grammar works on any model the engine opens: the synthetic Qwen3-MoE (random weights,
    its own 512-token BPE) writes gibberish, yet valid JSON and well-formed calls."""
    from click.testing import CliRunner

    from local_engine.cli import main
    from local_engine.engine import Engine

    for args in (["demo-moe", str(tmp_path / "src")], ["pack", str(tmp_path / "src"), str(tmp_path / "packed")]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
    eng = Engine.open(tmp_path / "packed", threads=1)
    try:
        assert eng.format == "flash-moe-pack"
        text = "".join(gen := eng.chat(_ask("hi"), response_format=_rf(PERSON), max_tokens=300))
        assert gen.finish_reason == "stop"
        jsonschema.validate(json.loads(text), PERSON)
        "".join(gen := eng.chat(_ask("hi"), tools=[WEATHER], tool_choice="required", max_tokens=300))
        (call,) = gen.parsed()[1]
        assert call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    finally:
        eng.close()
