"""Translate foreign errors into `BackendError`, once, at the seam (as httpx maps httpcore's)."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import orjson

from gateway.backends.base import BackendError, ErrorKind


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _upstream_message(content: bytes) -> str:
    try:
        data = orjson.loads(content)
        msg = data.get("error", {}).get("message") if isinstance(data, dict) else None
        if isinstance(msg, str):
            return msg[:300]
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return ""


def status_error(target: str, status: int, retry_after: str | None, content: bytes = b"") -> BackendError:
    kind: ErrorKind = "status" if status >= 500 or status in (408, 409, 429) else "invalid"
    detail = _upstream_message(content) if kind == "invalid" else ""
    message = f"{target} answered HTTP {status}" + (f": {detail}" if detail else "")
    return BackendError(kind, message, status=status, retry_after=parse_retry_after(retry_after))


def _caused_by_connect(exc: BaseException) -> bool:
    """litellm wraps transport errors in status-500 exceptions; look at what it wrapped."""
    import httpx
    import openai

    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, httpx.ConnectError | httpx.RemoteProtocolError | openai.APIConnectionError | ConnectionError):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def from_litellm(target: str, exc: BaseException) -> BackendError:
    """Map a litellm / openai SDK exception by its status and class, never by its text."""
    import litellm  # imported lazily: litellm is slow to import

    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, litellm.Timeout | TimeoutError):
        return BackendError("timeout", f"{target}: timeout")
    status = getattr(exc, "status_code", None)
    headers: Any = getattr(exc, "litellm_response_headers", None) or getattr(exc, "headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    retry_after = None
    if headers is not None:
        try:
            retry_after = headers.get("retry-after") or headers.get("Retry-After")
        except AttributeError:
            retry_after = None
    if isinstance(exc, litellm.APIConnectionError) or status is None or _caused_by_connect(exc):
        return BackendError("connect", f"{target}: {type(exc).__name__}")
    return status_error(target, int(status), retry_after)
