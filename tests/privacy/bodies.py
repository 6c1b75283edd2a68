"""Request bodies with planted sensitive values, in every message shape the gateway forwards."""

from __future__ import annotations

import json
from typing import Any

# Values the analyzer must find; tests assert none of them leaves in any field.
PLANTED = {
    "person": "Margaret Thornton",
    "email": "margaret.thornton@example.org",
    "phone": "+1 (415) 555-2671",
    "card": "4111 1111 1111 1111",
    "ssn": "536-22-1234",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "ip": "192.168.10.24",
    "openai_key": "sk-proj-Q7w8E9r0T1y2U3i4O5p6A7s8D9f0G1h2",
    "aws_key": "AKIAIOSFODNN7EXAMPLQ",
    "github": "ghp_4Ab9Cd8Ef7Gh6Ij5Kl4Mn3Op2Qr1St0Uv9Wx",
    "db_password": "Tr0ub4dor-and-3",
    "tool_person": "Desmond Okafor",
    "tool_email": "desmond.okafor@corp-mail.net",
}


def user(text: str) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}]}


def every_shape() -> dict[str, Any]:
    """Multi-turn chat with a system prompt, text parts, a name field, tool calls, tool results
    and tool definitions, each carrying some of the planted values."""
    p = PLANTED
    return {
        "model": "auto",
        "messages": [
            {"role": "system", "content": f"Support bot. Escalations go to {p['email']}. Key {p['openai_key']}."},
            {
                "role": "user",
                "name": "margaret_thornton",
                "content": f"Hi, I'm {p['person']}. Call me on {p['phone']}. My card is {p['card']}.",
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "lookup_customer",
                            "arguments": json.dumps({"email": p["email"], "ssn": p["ssn"], "note": f"from {p['ip']}"}),
                        },
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": json.dumps({"owner": p["person"], "iban": p["iban"], "aws": p["aws_key"]}),
            },
            {"role": "assistant", "content": f"Thanks {p['person']}, I found your account."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"Also my deploy token is {p['github']}"},
                    {"type": "text", "text": f"and the DB is postgres://admin:{p['db_password']}@db.internal:5432/app"},
                ],
            },
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "lookup_customer",
                    "description": f"Look up a customer, e.g. {p['tool_person']}.",
                    "parameters": {
                        "type": "object",
                        "properties": {"email": {"type": "string", "description": f"like {p['tool_email']}"}},
                    },
                },
            }
        ],
    }


def leaked(blob: Any) -> list[str]:
    """Names of planted values found anywhere in `blob` (serialised as JSON)."""
    text = blob if isinstance(blob, str) else json.dumps(blob, ensure_ascii=False)
    out = [k for k, v in PLANTED.items() if v in text]
    # A value re-serialised inside JSON (tool arguments) appears escaped: check that form too.
    out += [k for k, v in PLANTED.items() if json.dumps(v)[1:-1] in text and k not in out]
    return out
