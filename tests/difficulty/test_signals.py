"""Each heuristic signal, read from real request bodies."""

from __future__ import annotations

from gateway.classify.difficulty.signals import SIGNAL_NAMES, extract_signals, extract_text_signals, vector
from tests.difficulty.conftest import body


def test_length_and_tokens():
    s = extract_text_signals("Name the capital of France, please.")
    assert s.chars == len("Name the capital of France, please.")
    assert s.tokens == 8  # 6 words + comma + full stop
    assert extract_text_signals("word " * 200).tokens == 200


def test_code_blocks_fenced_and_bare():
    fenced = "Fix this:\n```python\ndef f(x):\n    return x\n```\nand this\n```\nprint(1)\n```"
    assert extract_text_signals(fenced).code_blocks == 2
    bare = "\n".join(f"int x{i} = {i};" for i in range(10))
    assert extract_text_signals(bare).code_blocks == 2  # one per five code-looking lines
    assert extract_text_signals("Tell me a story about a dragon.").code_blocks == 0


def test_math_and_numbers():
    s = extract_text_signals(r"Solve x^2 + 3x = 10 and compute \frac{1}{2} + 0.25 for 17 apples.")
    assert s.math >= 3  # x^2, =, \frac
    assert s.numbers >= 5
    assert extract_text_signals("Simplify $a+b=c$ now.").math == 1  # an inline formula counts once
    plain = extract_text_signals("Write a friendly greeting.")
    assert plain.math == 0 and plain.numbers == 0


def test_reasoning_and_step_cues():
    s = extract_text_signals("Explain why the sky is blue, then prove it step by step. Finally, compare.")
    assert s.reasoning_cues >= 4  # explain, why, prove, step by step, compare
    assert s.step_cues >= 2  # then, finally
    listed = extract_text_signals("Do this:\n1. wash\n2. dry\n- fold")
    assert listed.step_cues == 3
    assert extract_text_signals("Hello there.").reasoning_cues == 0


def test_constraints():
    s = extract_text_signals("Answer in at most 3 sentences. You must not use jargon, and format it as JSON.")
    assert s.constraints >= 4  # at most, sentences, must, format, json
    assert extract_text_signals("Tell me about cats.").constraints == 0


def test_questions_and_non_english():
    assert extract_text_signals("Why? How? When?").questions == 3
    assert extract_text_signals("Quelle est la capitale du Japon ?").non_english == 0.0  # Latin script
    ja = extract_text_signals("日本の首都はどこですか")
    assert ja.non_english == 1.0
    mixed = extract_text_signals("Translate 東京 please")
    assert 0 < mixed.non_english < 1


def test_conversation_depth_and_tools():
    conv = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": [{"type": "text", "text": "final question"}, {"type": "image_url"}]},
    ], "tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "b"}}]}
    s = extract_signals(conv)
    assert s.turns == 3
    assert s.tools == 2
    assert s.chars == len("final question")  # judged on the last user turn, text parts only
    assert extract_signals(body("x")).turns == 1 and extract_signals(body("x")).tools == 0


def test_tool_result_turn_falls_back_to_all_text():
    b = {"messages": [{"role": "tool", "content": "result 42", "tool_call_id": "t"}]}
    assert extract_signals(b).numbers == 1


def test_vector_is_fixed_order_and_log_scaled():
    s = extract_text_signals("word " * 99)
    v = vector(s)
    assert len(v) == len(SIGNAL_NAMES)
    assert abs(v[SIGNAL_NAMES.index("tokens")] - __import__("math").log1p(99)) < 1e-9


def test_huge_prompt_is_read_from_a_bounded_prefix():
    import time

    from gateway.classify.difficulty.signals import SIGNAL_CHARS_MAX

    unit = "Explain why, step by step: 12 + 30 = 42. "
    huge = unit * (3 * SIGNAL_CHARS_MAX // len(unit))
    t = time.perf_counter()
    s = extract_text_signals(huge)
    elapsed = time.perf_counter() - t
    assert s.chars == len(huge)  # exact
    words_per_unit = len(__import__("re").findall(r"\w+|[^\w\s]", unit))
    assert abs(s.tokens - words_per_unit * len(huge) / len(unit)) / s.tokens < 0.01  # extrapolated
    assert s.reasoning_cues == extract_text_signals(huge[:SIGNAL_CHARS_MAX]).reasoning_cues
    assert elapsed < 0.5  # the full ~100 kB would cost several times the prefix
