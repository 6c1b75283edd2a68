"""The chat side of the translators to another API's upstream (to_messages.py, to_responses.py):
what they read from a chat request and the chat answer they build from the upstream's."""

from __future__ import annotations

from typing import Any

from gateway.classify.text import content_text

# -- requests out -------------------------------------------------------------------------------


def chat_functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A chat request's function tools, flat: {name, parameters, strict, description?}, what
    Messages' and Responses' tools are made of (parameters an empty object schema when absent)."""
    out = []
    for tool in tools:
        fn = tool.get("function") or {}
        one: dict[str, Any] = {"name": fn.get("name") or "",
                               "parameters": fn.get("parameters") or {"type": "object", "properties": {}},
                               "strict": bool(fn.get("strict"))}
        if fn.get("description"):
            one["description"] = fn["description"]
        out.append(one)
    return out


def split_system(messages: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """The system and developer messages' text, joined (None without any), and the other messages
    in order: Messages' `system` and Responses' `instructions` are one string beside the turns."""
    texts, turns = [], []
    for msg in messages:
        if msg.get("role") in ("system", "developer"):
            texts.append(content_text(msg.get("content")))
        else:
            turns.append(msg)
    return "\n".join(t for t in texts if t) or None, turns


# -- answers back -------------------------------------------------------------------------------


def function_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A chat tool call."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def assistant_message(texts: list[str], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """A chat assistant message of an answer's text parts and tool calls (content null when it
    holds calls only, as chat's own)."""
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def chat_completion(answer_id: str, created: int, model: str, choice: dict[str, Any],
                    usage: dict[str, int]) -> dict[str, Any]:
    return {"id": answer_id, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage}
