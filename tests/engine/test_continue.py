"""Continuing an unfinished assistant message (what the gateway needs to resume a broken stream)."""

from __future__ import annotations

import pytest

from local_engine import chat_template
from local_engine.chat_template import CHATML, ChatTemplateError

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_prompt_ends_right_after_the_unfinished_answer() -> None:
    msgs = [*QUESTION, {"role": "assistant", "content": "The capital of"}]
    text = chat_template.render(CHATML, msgs, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nThe capital of")
    # without the option the template closes the turn
    assert chat_template.render(CHATML, msgs, add_generation_prompt=False).endswith("The capital of<|im_end|>\n")


def test_trailing_space_is_kept_for_the_model_to_continue_after() -> None:
    msgs = [*QUESTION, {"role": "assistant", "content": "The capital is "}]
    assert chat_template.render(CHATML, msgs, continue_final_message=True).endswith("The capital is ")


@pytest.mark.parametrize("msgs", [QUESTION, [*QUESTION, {"role": "assistant", "content": "  "}]])
def test_needs_a_final_assistant_message_with_text(msgs) -> None:
    with pytest.raises(ChatTemplateError, match="continue_final_message"):
        chat_template.render(CHATML, msgs, continue_final_message=True)


def test_greedy_continuation_completes_the_same_answer(smol) -> None:
    full = "".join(smol.chat(QUESTION, max_tokens=24))
    # cut at a token boundary of the answer, so the continuation is the same greedy path
    ids = smol.tokenizer.encode(full)
    prefix = smol.tokenizer.decode(ids[:3])
    assert full.startswith(prefix) and prefix.strip()
    gen = smol.chat([*QUESTION, {"role": "assistant", "content": prefix}], continue_final_message=True,
                    max_tokens=24 - 3)
    rest = "".join(gen)
    assert prefix + rest == full
    assert gen.usage["completion_tokens"] == 24 - 3 or gen.finish_reason == "stop"
