"""Render the model's own Jinja chat template the way Hugging Face ``apply_chat_template`` does.

Same environment: sandboxed, ``trim_blocks`` + ``lstrip_blocks``, loop controls, a ``tojson``
that does not HTML-escape, ``raise_exception``, ``strftime_now``; the template sees ``messages``,
``tools``, ``documents``, ``add_generation_prompt`` and the special tokens (``bos_token``, ...).
OpenAI list-of-parts content is flattened to its text parts (the local models are text-only).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from local_engine.errors import EngineError

# Used when a model ships no template: ChatML, the most common format for small instruct models.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(EngineError):
    pass


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template: syntax error line {e.lineno}: {e.message}") from None


def _text(content: Any) -> Any:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return "" if content is None else content


def normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ChatTemplateError(f"chat message must be an object with a role, got {m!r:.80}")
        mm = dict(m)
        mm["content"] = _text(m.get("content"))
        out.append(mm)
    return out


def render(source: str | None, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
           tools: list[dict[str, Any]] | None = None, continue_final_message: bool = False,
           **special: Any) -> str:
    """The prompt text. ``continue_final_message``: the last message is an unfinished assistant
    answer the model goes on writing (HF's option of the same name): the prompt ends right after its
    text, without the end-of-turn the template would write."""
    tpl = compile_template(source or CHATML)
    msgs = normalise_messages(messages)
    if continue_final_message:
        if not msgs or msgs[-1]["role"] != "assistant":
            raise ChatTemplateError("continue_final_message: the last message must be the assistant's")
        add_generation_prompt = False
    try:
        text = tpl.render(messages=msgs, tools=tools, documents=None,
                          add_generation_prompt=add_generation_prompt, **special)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from None
    return _cut_after_final(text, msgs[-1]["content"]) if continue_final_message else text


def _cut_after_final(text: str, final: str) -> str:
    # As transformers does it: templates may strip the message, so look for its stripped text.
    core = final.strip()
    if not core:
        raise ChatTemplateError("continue_final_message: the final assistant message is empty")
    at = text.rfind(core)
    if at < 0:
        raise ChatTemplateError("continue_final_message: the template does not render the final message's text")
    if text[at:at + len(final.lstrip())] == final.lstrip():
        return text[:at + len(final.lstrip())]  # trailing spaces kept: the model continues after them
    return text[:at + len(core)]
