"""Helpers to read the text of an OpenAI chat request the same way in every classifier."""

from __future__ import annotations

from typing import Any


def content_text(content: Any) -> str:
    """The text of a message `content`: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def last_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return content_text(msg.get("content"))
    return ""


def all_text(body: dict[str, Any]) -> str:
    return "\n".join(
        content_text(m.get("content")) for m in body.get("messages") or [] if isinstance(m, dict)
    )
