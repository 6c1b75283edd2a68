"""Our wire conversions against litellm's, on the same bodies: time per call and what each keeps.

    flock /tmp/bench.lock .venv/bin/python benchmarks/wire_adapters.py [--n 2000]

Two directions the gateway runs on every request of issue #17's per-target wire formats:

* chat -> Anthropic Messages request (a redacted chat body to an `api: messages` target): ours,
  gateway/wire/to_messages.request, against litellm's AnthropicConfig.map_openai_params +
  transform_request (what litellm.completion does before it POSTs to Anthropic);
* Responses request -> chat (a Responses client, the pipeline's hub): ours,
  gateway/wire/responses_in.to_chat, against litellm's
  LiteLLMCompletionResponsesConfig.transform_responses_api_request_to_chat_completion_request.

Each pair is timed in the same run, interleaved, and the ratio printed; then each output is
checked for what the pipeline needs (every position with user data present, roles alternating).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MODEL = "claude-3-5-sonnet-20241022"  # one litellm knows: an unknown name costs it a failed lookup per call
EMAIL = "<EMAIL_ADDRESS_1>"  # what a redacted body carries
CHAT: dict[str, Any] = {
    "model": MODEL, "max_tokens": 256, "temperature": 0.2, "stop": ["END"],
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Mail {EMAIL} the report."},
        {"role": "assistant", "content": "Sending.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "send_mail", "arguments": json.dumps({"to": EMAIL})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": f"delivered to {EMAIL}"},
        {"role": "user", "content": "Thanks, and now?"},
    ],
    "tools": [{"type": "function", "function": {"name": "send_mail", "description": "Send mail", "parameters": {
        "type": "object", "properties": {"to": {"type": "string"}}}}}],
    "tool_choice": "auto",
}
RESPONSES: dict[str, Any] = {
    "model": "gpt-x", "instructions": "You are terse.", "max_output_tokens": 256,
    "input": [
        {"role": "user", "content": f"Mail {EMAIL} the report."},
        {"type": "function_call", "call_id": "call_1", "name": "send_mail", "arguments": json.dumps({"to": EMAIL})},
        {"type": "function_call_output", "call_id": "call_1", "output": f"delivered to {EMAIL}"},
        {"role": "user", "content": "Thanks, and now?"},
    ],
    "tools": [{"type": "function", "name": "send_mail", "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}],
}


def ours_to_messages(body: dict[str, Any]) -> dict[str, Any]:
    from gateway.wire import to_messages

    return to_messages.request(body, MODEL)


def litellm_to_messages(body: dict[str, Any]) -> dict[str, Any]:
    from litellm.llms.anthropic.chat.transformation import AnthropicConfig

    cfg = AnthropicConfig()
    non_default = {k: v for k, v in body.items() if k not in ("model", "messages")}
    params = cfg.map_openai_params(non_default, {}, MODEL, drop_params=True)
    return cfg.transform_request(MODEL, [dict(m) for m in body["messages"]], params, {}, {})


def ours_responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    from gateway.wire import responses_in

    return responses_in.to_chat(responses_in.ResponsesRequest.model_validate(body))


def litellm_responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    from litellm.responses.litellm_completion_transformation.transformation import (
        LiteLLMCompletionResponsesConfig,
    )

    params = {k: v for k, v in body.items() if k not in ("model", "input")}
    return LiteLLMCompletionResponsesConfig.transform_responses_api_request_to_chat_completion_request(
        model=body["model"], input=body["input"], responses_api_request=params, custom_llm_provider="openai")


def timed(fn: Callable[[dict[str, Any]], Any], body: dict[str, Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn(body)
    return (time.perf_counter() - t0) / n * 1e6


def messages_checks(out: dict[str, Any]) -> dict[str, bool]:
    roles = [m["role"] for m in out.get("messages", [])]
    text = json.dumps(out)
    system = out.get("system")
    return {"system kept": bool(system) and "terse" in json.dumps(system),
            "roles alternate": all(a != b for a, b in itertools.pairwise(roles)),
            "tool_use input kept": '"tool_use"' in text and EMAIL in json.dumps([m for m in out["messages"] if m["role"] == "assistant"]),
            "tool_result kept": '"tool_result"' in text and f"delivered to {EMAIL}" in text,
            "stop_sequences": out.get("stop_sequences") == ["END"], "max_tokens": out.get("max_tokens") == 256}


def chat_checks(out: dict[str, Any]) -> dict[str, bool]:
    msgs = out.get("messages", [])
    text = json.dumps(msgs)
    return {"instructions -> system": bool(msgs) and msgs[0].get("role") == "system",
            "function_call -> tool_calls": any(m.get("tool_calls") for m in msgs),
            "output -> tool message": any(m.get("role") == "tool" for m in msgs) and f"delivered to {EMAIL}" in text,
            "max_output_tokens": (out.get("max_tokens") or out.get("max_completion_tokens")) == 256}


def main() -> None:
    import litellm

    litellm.suppress_debug_info = True
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    n = parser.parse_args().n
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; n={n} calls each, interleaved x3")
    for label, ours, theirs, checks, body in (
            ("chat -> Messages request", ours_to_messages, litellm_to_messages, messages_checks, CHAT),
            ("Responses request -> chat", ours_responses_to_chat, litellm_responses_to_chat, chat_checks, RESPONSES)):
        ours(body), theirs(body)  # imports and caches outside the timing
        a = b = 0.0
        for _ in range(3):
            a += timed(ours, body, n) / 3
            b += timed(theirs, body, n) / 3
        print(f"{label}: ours {a:.1f} us, litellm {b:.1f} us per call (litellm/ours {b / a:.1f}x)")
        for name, out in (("ours", ours(body)), ("litellm", theirs(body))):
            result = checks(out)
            failed = [k for k, ok in result.items() if not ok]
            print(f"  {name}: {len(result) - len(failed)}/{len(result)} checks" + (f"; fails: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    main()
