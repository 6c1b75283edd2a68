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


def test_gateway_resumes_a_broken_cloud_stream_on_the_engine(tmp_path) -> None:
    """End to end: the cloud's stream breaks mid-answer; the real engine writes the rest of it."""
    import openai

    from tests.support.gateway import run_gateway
    from tests.support.upstream import FakeUpstream, Fault

    policy = tmp_path / "p.yaml"
    with FakeUpstream(model="cloud-model", reply=lambda b: "The capital of France is Paris, of course.") as cloud:
        policy.write_text(f"""
version: 1
targets:
  cloud: {{kind: cloud, model: openai/cloud-model, api_base: "{cloud.base_url}", api_key: sk-x, retries: 0}}
  local: {{kind: local, engine: local_engine, model_path: "builtin:smollm2-135m", default_max_tokens: 24}}
connectivity: {{probe_interval_s: 30}}
privacy: {{enabled: false}}
difficulty: {{method: heuristic}}
rules:
  - {{name: all, route: cloud, fallback: [local]}}
""")
        cloud.fault = Fault("truncated", after_chunks=4)  # "The capital of F", then the connection ends
        with run_gateway(policy) as gw:
            client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="x", max_retries=0)
            chunks = list(client.chat.completions.create(
                model="auto", messages=QUESTION, stream=True, timeout=120))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("The capital of F") and len(text) > len("The capital of F")
    assert "Paris" in text  # the engine continued the same sentence, not a new answer
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] in (["stop"], ["length"])
