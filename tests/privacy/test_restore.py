"""Restoring originals in completions, whole and streamed (including a hypothesis property)."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.privacy.vault import Vault

NAME = "Margaret Thornton"
EMAIL = "margaret.thornton@example.org"
QUOTED = 'Acme "West" \\ branch'  # needs escaping inside JSON


def make_vault() -> Vault:
    v = Vault()
    assert v.replacement_for("PERSON", NAME) == "<PERSON_1>"
    assert v.replacement_for("EMAIL_ADDRESS", EMAIL) == "<EMAIL_ADDRESS_1>"
    assert v.replacement_for("ORG_NAME", QUOTED) == "<ORG_NAME_1>"
    for i in range(2, 12):  # PERSON_10 and PERSON_11 exist: PERSON_1 must not eat their prefix
        v.replacement_for("PERSON", f"Person Number{i}")
    return v


def chunk(content: str | None = None, *, finish: str | None = None, index: int = 0, **delta: Any) -> dict[str, Any]:
    d: dict[str, Any] = dict(delta)
    if content is not None:
        d["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": index, "delta": d, "finish_reason": finish}],
    }


def texts(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(
        c["delta"].get("content") or ""
        for ch in chunks
        for c in ch.get("choices", [])
        if c.get("index", 0) == index
    )


def args_of(chunks: list[dict[str, Any]], call: int = 0) -> str:
    return "".join(
        tc["function"].get("arguments", "")
        for ch in chunks
        for c in ch.get("choices", [])
        for tc in c["delta"].get("tool_calls", [])
        if tc.get("index", 0) == call and "function" in tc
    )


def test_restore_completion_content_and_tool_arguments() -> None:
    v = make_vault()
    completion = {
        "id": "x",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Dear <PERSON_1>, PERSON_1's mail is <Email_Address_1>. Not <PERSON_99> or XPERSON_1.",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "send", "arguments": '{"to": "<EMAIL_ADDRESS_1>", "org": "<ORG_NAME_1>"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
    }
    out = v.restore_completion(completion)
    msg = out["choices"][0]["message"]
    assert msg["content"] == f"Dear {NAME}, {NAME}'s mail is {EMAIL}. Not <PERSON_99> or XPERSON_1."
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"to": EMAIL, "org": QUOTED}
    assert completion["choices"][0]["message"]["content"].startswith("Dear <PERSON_1>")  # input untouched
    assert v.restore_text("[PERSON_10] and <person_11>") == "[Person Number10] and Person Number11"


def test_placeholder_split_across_chunks_is_restored() -> None:
    r = make_vault().stream_restorer()
    out = []
    for piece in ["Hello <PER", "SON_", "1>'s order for ", "EMAIL_ADD", "RESS_1 is ready"]:
        out += r.feed(chunk(piece))
    out += r.feed(chunk(finish="stop"))
    out += r.flush()
    assert texts(out) == f"Hello {NAME}'s order for {EMAIL} is ready"
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


def test_plain_text_is_not_held_back() -> None:
    r = make_vault().stream_restorer()
    # First token of a normal answer: forwarded at once (TTFT unchanged).
    first = r.feed(chunk("The answer"))
    assert texts(first) == "The answer"
    # Only a tail that could still become a placeholder waits, and only until it can't.
    assert texts(r.feed(chunk(" is P"))) == " is "
    assert texts(r.feed(chunk("lease"))) == "Please"


def test_finish_chunk_releases_held_text_first_in_order() -> None:
    r = make_vault().stream_restorer()
    out = r.feed(chunk("Thanks PERSON_1"))
    assert texts(out) == "Thanks "
    fin = r.feed(chunk(finish="stop"))
    assert [c["choices"][0]["finish_reason"] for c in fin] == [None, "stop"]
    assert texts(fin) == NAME
    assert r.flush() == []


def test_finish_chunk_with_own_content() -> None:
    r = make_vault().stream_restorer()
    out = r.feed(chunk("Bye <PERSON")) + r.feed(chunk("_1>", finish="stop")) + r.flush()
    assert texts(out) == f"Bye {NAME}"
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


def test_flush_at_end_of_stream_without_finish() -> None:
    r = make_vault().stream_restorer()
    out = r.feed(chunk("cc: <EMAIL_ADDRESS_1")) + r.flush()
    assert texts(out) == f"cc: {EMAIL}"


def test_streamed_tool_call_arguments() -> None:
    r = make_vault().stream_restorer()
    out = r.feed(
        chunk(
            None,
            role="assistant",
            tool_calls=[{"index": 0, "id": "c1", "type": "function", "function": {"name": "send", "arguments": ""}}],
        )
    )
    for piece in ['{"to": "<EMAIL_', 'ADDRESS_1>", "org": "ORG', '_NAME_1"', "}"]:
        out += r.feed(chunk(None, tool_calls=[{"index": 0, "function": {"arguments": piece}}]))
    out += r.feed(chunk(None, finish="tool_calls"))
    out += r.flush()
    assert json.loads(args_of(out)) == {"to": EMAIL, "org": QUOTED}
    first_call = out[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first_call["id"] == "c1" and first_call["function"]["name"] == "send"


def test_choices_are_restored_independently() -> None:
    r = make_vault().stream_restorer()
    out = r.feed(chunk("A: <PERSON", index=0)) + r.feed(chunk("B: <EMAIL_ADDRESS", index=1))
    out += r.feed(chunk("_1>", index=1)) + r.feed(chunk("_1>", index=0))
    out += r.feed(chunk(finish="stop", index=0)) + r.feed(chunk(finish="stop", index=1)) + r.flush()
    assert texts(out, 0) == f"A: {NAME}"
    assert texts(out, 1) == f"B: {EMAIL}"


def test_usage_only_chunk_passes_through() -> None:
    r = make_vault().stream_restorer()
    usage = {"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": {"total_tokens": 3}}
    assert r.feed(usage) == [usage]


# -- property: streaming == whole, for any text and any chunking --------------------------------

_KEYS = ["PERSON_1", "PERSON_10", "PERSON_11", "EMAIL_ADDRESS_1", "ORG_NAME_1", "PERSON_99"]
_placeholder = st.builds(
    lambda key, case, lt, gt, tail: ("<" if lt else "") + case(key) + (">" if gt else "") + tail,
    st.sampled_from(_KEYS),
    st.sampled_from([str.upper, str.lower, str.title, lambda s: s]),
    st.booleans(),
    st.booleans(),
    st.sampled_from(["", "'s", " ", "x", "1", "_", ".", ">", "<"]),
)
_plain = st.text(alphabet=st.sampled_from(list("ab PERSONemail_<>1\"'\\.\n,é")), max_size=12)
_texts = st.lists(st.one_of(_placeholder, _plain), max_size=12).map("".join)


def _chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None, database=None)
@given(text=_texts, cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=20), finish=st.booleans())
def test_streamed_restoration_equals_whole(text: str, cuts: list[int], finish: bool) -> None:
    v = make_vault()
    expected = v.restore_text(text)
    expected_args = v.restore_text(text, json_escape=True)
    r = v.stream_restorer()
    out: list[dict[str, Any]] = []
    for piece in _chunked(text, cuts):
        out += r.feed(chunk(piece))
        out += r.feed(chunk(None, tool_calls=[{"index": 0, "function": {"arguments": piece}}]))
    out += r.feed(chunk(finish="stop")) if finish else []
    out += r.flush()
    assert texts(out) == expected
    assert args_of(out) == expected_args


@settings(max_examples=200, deadline=None, database=None)
@given(prefix=st.text(alphabet=st.sampled_from(list("ab .,\n")), max_size=40), word=st.sampled_from(["PERSON", "Person_", "<EMAIL_ADDRESS", "ab"]))
def test_hold_back_is_bounded(prefix: str, word: str) -> None:
    """Whatever arrives, at most one placeholder's length (+1) is ever held."""
    v = make_vault()
    r = v.stream_restorer()
    released = texts(r.feed(chunk(prefix + word)))
    held = len(prefix + word) - len(released)
    assert released == (prefix + word)[: len(released)]
    assert held <= max(len(k) for k in _KEYS) + 2
    assert held <= len(word)


def test_streamed_surrogates_are_restored_across_chunks() -> None:
    v = Vault("surrogate")
    sur = v.replacement_for("PERSON", NAME)
    assert sur != NAME and "<" not in sur
    text = f"Hello {sur}, and again {sur}."
    r = v.stream_restorer()
    out = []
    for i in range(0, len(text), 3):
        out += r.feed(chunk(text[i : i + 3]))
    out += r.flush()
    assert texts(out) == f"Hello {NAME}, and again {NAME}."
