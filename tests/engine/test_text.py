"""Tokenizer, chat template, streaming decode and sampling on the built-in model."""

from __future__ import annotations

import pytest

from local_engine.tokenizer import StreamDecoder

SAMPLES = [
    "Hello world!",
    "What is the capital of France?",
    "  leading  spaces\n\nnewlines\ttabs   ",
    "héllo wörld — ünïcödé 日本語 한국어 🤖🎉 emoji",
    "<|im_start|>user\nhi<|im_end|>\n",
    "123456 7.89 x=y+z; don't I'll WE'RE",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 😊"}, {"role": "user", "content": "Tell me a joke"}],
]


@pytest.mark.timeout(900)
def test_tokenizer_matches_hf(smol, hf_smol_tokenizer) -> None:
    for s in SAMPLES:
        assert smol.tokenizer.encode(s) == hf_smol_tokenizer(s, add_special_tokens=False)["input_ids"], s
        ids = smol.tokenizer.encode(s)
        assert smol.tokenizer.decode(ids, skip_special=False) == hf_smol_tokenizer.decode(ids), s


@pytest.mark.timeout(900)
def test_chat_template_matches_hf(smol, hf_smol_tokenizer) -> None:
    for msgs in CHATS:
        for gen in (True, False):
            ref = hf_smol_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert smol.render_chat(msgs, add_generation_prompt=gen) == ref


def test_chat_template_flattens_openai_parts(smol) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert "Hi there" in smol.render_chat(parts)


def test_stream_decoder_never_splits_characters(smol) -> None:
    text = "日本語 🤖🎉 ünï"
    ids = smol.tokenizer.encode(text)
    dec = StreamDecoder(smol.tokenizer)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(ids) > len([d for d in deltas if d])  # some tokens carried partial characters


def test_builtin_answers_paris(smol) -> None:
    gen = smol.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=32)
    text = "".join(gen)
    assert "Paris" in text
    assert gen.finish_reason == "stop"
    assert gen.usage["completion_tokens"] > 0
    assert gen.usage["total_tokens"] == gen.usage["prompt_tokens"] + gen.usage["completion_tokens"]
    assert gen.text == text


def test_max_tokens_and_length(smol) -> None:
    gen = smol.generate("Once upon a time", max_tokens=5)
    list(gen)
    assert gen.finish_reason == "length" and gen.usage["completion_tokens"] == 5


def test_seeded_sampling_is_reproducible_and_varies(smol) -> None:
    kw = dict(max_tokens=12, temperature=1.2, top_k=50, top_p=0.95, repetition_penalty=1.1)
    a = "".join(smol.generate("My favourite animal is", seed=7, **kw))
    b = "".join(smol.generate("My favourite animal is", seed=7, **kw))
    others = {"".join(smol.generate("My favourite animal is", seed=s, **kw)) for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1


def test_top_k_1_is_greedy(smol) -> None:
    greedy = "".join(smol.generate("The sky is", max_tokens=8))
    assert "".join(smol.generate("The sky is", max_tokens=8, temperature=0.9, top_k=1, seed=3)) == greedy


def test_stop_string_cuts_output(smol) -> None:
    full = "".join(smol.generate("1, 2, 3, 4, 5,", max_tokens=12))
    assert "7" in full
    gen = smol.generate("1, 2, 3, 4, 5,", max_tokens=12, stop=["7"])
    out = "".join(gen)
    assert gen.finish_reason == "stop" and "7" not in out and full.startswith(out)


def test_should_stop_cancels(smol) -> None:
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    gen = smol.generate("Once upon a time", max_tokens=50, should_stop=stop)
    list(gen)
    assert gen.finish_reason == "cancelled" and gen.usage["completion_tokens"] == 3


def test_bad_sampling_option(smol) -> None:
    from local_engine.errors import EngineError

    with pytest.raises(EngineError, match="top_p"):
        smol.generate("x", top_p=0.0)
