"""Resume a stream that broke after tokens were sent, on the next target that can continue it.

Once the first token has reached the client the answer cannot be restarted elsewhere, and the
incumbents end such a stream with an error. But a target that can go on writing an unfinished
assistant message (the in-process engine always can; an OpenAI-compatible server such as vLLM,
whose `continue_final_message` extension we then send, when the policy marks it
`continues_answers: true`) can write the rest of the same answer. The client sees one answer; the
metrics and the audit log see one more fallback.

Privacy: the text sent so far goes to the next target as the unfinished assistant message, in
that target's view of the conversation: redacted (placeholders) for a cloud target under a
redacting rule, the client's view otherwise. Text that came from a target that saw the raw prompt
may carry personal data the vault does not know, so it never goes to a redacting cloud target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.policy.model import Policy
from gateway.privacy.vault import Vault

BodyFor = Callable[[str], dict[str, Any]]


def can_continue(policy: Policy, target: str, is_engine: bool) -> bool:
    flag = policy.targets[target].continues_answers
    return is_engine if flag is None else flag


@dataclass
class Partial:
    """The answer as the client has seen it so far, and how to keep the resumed part seamless."""

    visible: list[str] = field(default_factory=list)
    content_chunks: int = 0
    tool_calls: bool = False  # an interrupted tool call cannot be continued as text
    choices: set[int] = field(default_factory=set)
    raw_seen: bool = False  # some text came from a target that saw the unredacted prompt
    identity: dict[str, Any] | None = None  # id / model / created of the first chunk the client got

    def seen(self, chunk: dict[str, Any]) -> None:
        if self.identity is None and chunk.get("choices"):
            self.identity = {k: chunk[k] for k in ("id", "model", "created") if k in chunk}
        for choice in chunk.get("choices") or []:
            self.choices.add(choice.get("index", 0))
            delta = choice.get("delta") or {}
            if delta.get("tool_calls"):
                self.tool_calls = True
            text = delta.get("content")
            if isinstance(text, str) and text:
                self.visible.append(text)
                self.content_chunks += 1

    @property
    def text(self) -> str:
        return "".join(self.visible)

    def resumable(self) -> bool:
        return not self.tool_calls and self.choices <= {0} and bool(self.text.strip())


def candidates(chain: tuple[str, ...], failed: str, partial: Partial, *, policy: Policy,
               redacting: bool, is_engine: Callable[[str], bool]) -> tuple[str, ...]:
    """The targets after `failed` in the chain that may write the rest of this answer."""
    if not partial.resumable() or failed not in chain:
        return ()
    out = []
    for t in chain[chain.index(failed) + 1:]:
        if not can_continue(policy, t, is_engine(t)):
            continue
        if redacting and policy.is_cloud(t) and partial.raw_seen:
            continue
        out.append(t)
    return tuple(out)


def continuation_body(base: dict[str, Any], partial: Partial, *, engine: bool, vault: Vault | None) -> dict[str, Any]:
    """`base` (what this target would get for the original request) plus the unfinished answer.

    `vault` is given when the target sees the redacted conversation: the answer so far is then
    sent with the same placeholders the target's prompt has.
    """
    text = vault.redact_text(partial.text) if vault is not None else partial.text
    body = dict(base)
    body["messages"] = [*base.get("messages", []), {"role": "assistant", "content": text}]
    body["continue_final_message"] = True
    if not engine:
        body["add_generation_prompt"] = False  # vLLM wants both; the engine implies it
    # The token budget is the client's for the whole answer; a content chunk is about a token.
    for key in ("max_completion_tokens", "max_tokens"):
        if isinstance(base.get(key), int):
            body[key] = max(1, base[key] - partial.content_chunks)
    return body


def seamless(chunk: dict[str, Any], partial: Partial) -> dict[str, Any] | None:
    """A chunk of the resumed stream, dressed as part of the first one; None if it says nothing."""
    choices = []
    for choice in chunk.get("choices") or []:
        delta = {k: v for k, v in (choice.get("delta") or {}).items() if k != "role"}
        if not delta.get("content") and not delta.get("tool_calls") and not choice.get("finish_reason"):
            continue
        choices.append({**choice, "delta": delta})
    if not choices and not chunk.get("usage"):
        return None
    return {**chunk, **(partial.identity or {}), "choices": choices}
