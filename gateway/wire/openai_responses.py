"""OpenAI Responses (POST /v1/responses) <-> the chat-completions body the pipeline runs on: the
request in (gateway/wire/responses_in.py), the `response` object or its stream out
(gateway/wire/responses_out.py). Stateless: nothing is stored between requests.
"""

from __future__ import annotations

from gateway.wire.base import WireAdapter
from gateway.wire.responses_in import ResponsesRequest, to_chat
from gateway.wire.responses_out import ResponsesStream, from_chat, native_answer

PATH = "/v1/responses"

OPENAI_RESPONSES = WireAdapter(
    endpoint=PATH, request_model=ResponsesRequest, api="responses", to_chat=to_chat, from_chat=from_chat,
    translator=lambda req, input_tokens, request_id: ResponsesStream(req), native_answer=native_answer)
