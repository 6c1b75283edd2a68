"""A real OpenAI-compatible HTTP server on loopback, for tests and benchmarks.

It records every request body it receives (so privacy tests assert on what actually left the
gateway) and injects faults on demand:

    server.fault = Fault("status", status=503, retry_after="1")   # every request until cleared
    server.once(Fault("reset"))                                    # the next request only
    server.stop(); server.start()                                  # connection refused, then back

Kinds: status, latency, reset (close mid-body), stall_first (sleep before any byte),
stall_mid (a few chunks then sleep), truncated (SSE without [DONE]), invalid_json,
captive (200 text/html, for the probe too).

Slowness kinds, which answer normally once their wait is over and watch the client meanwhile (a
client that hangs up is counted in `disconnects`): first_byte (nothing for `seconds`),
silent_after_headers (stream headers and the role chunk, then nothing for `seconds`),
silent_mid (`after_chunks` content chunks, then nothing for `seconds`), drip (content chunks at
`tokens_per_s`).

Answers echo the last user message (`echo: <text>`), so placeholders come back to be restored.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Fault:
    kind: str
    status: int = 500
    retry_after: str | None = None
    seconds: float = 0.0
    after_chunks: int = 2
    paths: tuple[str, ...] = ("/chat/completions",)
    tokens_per_s: float = 0.0  # drip


def _last_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # see shared/ENVIRONMENT-NOTES.md: 44 ms per request otherwise
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: bytes, ctype: str = "application/json", extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _client_gone(self) -> bool:
        """The client closed the connection (EOF or reset), checked without consuming anything."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _wait(self, seconds: float) -> bool:
        """Sleep `seconds` watching the client; False (and counted) if it hung up meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self._client_gone():
                self._hung_up()
                return False
            time.sleep(min(0.01, left))
        return True

    def _hung_up(self) -> None:
        owner = self.server.owner
        with owner.lock:
            owner.disconnects += 1
        self.close_connection = True

    def _fault_for(self, path: str) -> Fault | None:
        owner = self.server.owner
        with owner.lock:
            if owner.queue and any(path.endswith(p) for p in owner.queue[0].paths):
                return owner.queue.pop(0)
            f = owner.fault
        return f if f and any(path.endswith(p) for p in f.paths) else None

    def _common_fault(self, fault: Fault | None) -> bool:
        """Apply faults that do not depend on the endpoint. True when the response is done."""
        if fault is None:
            return False
        if fault.kind == "latency":
            time.sleep(fault.seconds)
            return False
        if fault.kind == "status":
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            body = json.dumps({"error": {"message": f"injected {fault.status}", "type": "server_error"}}).encode()
            self._send(fault.status, body, extra=extra)
            return True
        if fault.kind == "captive":
            self._send(200, b"<html><body>Please log in to the Wi-Fi</body></html>", "text/html")
            return True
        if fault.kind == "stall_first":
            time.sleep(fault.seconds)
            self.close_connection = True
            return True
        if fault.kind == "reset":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"id": "x", "choi')
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.close_connection = True
            return True
        if fault.kind == "invalid_json":
            self._send(200, b"{not json")
            return True
        if fault.kind == "first_byte":
            return not self._wait(fault.seconds)
        return False

    def do_GET(self) -> None:
        owner = self.server.owner
        owner.probes += 1
        fault = self._fault_for(self.path)
        if self._common_fault(fault):
            return
        if self.path.rstrip("/").endswith("/models"):
            body = json.dumps({"object": "list", "data": [{"id": owner.model, "object": "model"}]}).encode()
            self._send(200, body)
            return
        self._send(404, b'{"error": {"message": "not found"}}')

    def _receive(self) -> dict[str, Any] | None:
        """Read and record the JSON body; None (after a 400) when it is not JSON."""
        owner = self.server.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, b'{"error": {"message": "bad json"}}')
            return None
        with owner.lock:
            owner.received.append(body)
            owner.received_headers.append(dict(self.headers))
        return body

    def do_POST(self) -> None:
        owner = self.server.owner
        if (body := self._receive()) is None:
            return
        fault = self._fault_for(self.path)
        if self._common_fault(fault):
            return
        reply = owner.reply(body)
        if body.get("stream"):
            self._stream(body, reply, fault)
        else:
            self._send(200, json.dumps(owner.completion(body, reply)).encode())

    def _stream(self, body: dict[str, Any], reply: str, fault: Fault | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def write(data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def event(obj: Any) -> None:
            write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        try:
            self._stream_events(body, reply, fault, write, event)
        except (BrokenPipeError, ConnectionResetError):
            self._hung_up()

    def _stream_events(self, body: dict[str, Any], reply: str, fault: Fault | None,
                       write: Callable[[bytes], None], event: Callable[[Any], None]) -> None:
        owner = self.server.owner
        base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": owner.model}
        pieces = [reply[i : i + owner.chunk_chars] for i in range(0, len(reply), owner.chunk_chars)] or [""]
        event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        if fault and fault.kind == "silent_after_headers" and not self._wait(fault.seconds):
            return
        for i, piece in enumerate(pieces):
            if fault and fault.kind == "drip" and i > 0 and not self._wait(1 / fault.tokens_per_s):
                return
            if fault and fault.kind == "silent_mid" and i == fault.after_chunks and not self._wait(fault.seconds):
                return
            if fault and i == fault.after_chunks:
                if fault.kind == "stall_mid":
                    time.sleep(fault.seconds)
                    self.close_connection = True
                    return
                if fault.kind == "truncated":
                    write(b"")  # end the chunked body cleanly, but without [DONE]
                    self.close_connection = True
                    return
            event({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
            if owner.chunk_delay:
                time.sleep(owner.chunk_delay)
        event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        usage = {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}
        if (body.get("stream_options") or {}).get("include_usage"):
            event({**base, "choices": [], "usage": usage})
        write(b"data: [DONE]\n\n")
        write(b"")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: FakeUpstream

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_sockets: set[socket.socket] = set()
        self.accepted = 0  # connections accepted since start: keep-alive reuse shows here

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        self.open_sockets.add(sock)
        self.accepted += 1
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        self.open_sockets.discard(request)
        super().shutdown_request(request)

    def kill_connections(self) -> None:
        """A dead server also drops the keep-alive connections it was serving."""
        for sock in list(self.open_sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.open_sockets.clear()


class FakeUpstream:
    handler: type[BaseHTTPRequestHandler] = _Handler  # subclasses swap in their own

    def __init__(self, model: str = "fake-model", reply: Callable[[dict[str, Any]], str] | None = None,
                 port: int = 0, name: str = "upstream") -> None:
        self.model = model
        self.name = name
        self.reply = reply or (lambda body: "echo: " + _last_user_text(body))
        self.received: list[dict[str, Any]] = []
        self.received_headers: list[dict[str, str]] = []
        self.fault: Fault | None = None
        self.queue: list[Fault] = []
        self.lock = threading.Lock()
        self.chunk_chars = 4
        self.chunk_delay = 0.0
        self.probes = 0
        self.disconnects = 0  # clients that hung up while a slowness fault was waiting or writing
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def completion(self, body: dict[str, Any], reply: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply}
        if body.get("tools") and owner_wants_tool(body):
            tool = body["tools"][0]["function"]["name"]
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": tool, "arguments": json.dumps({"echo": _last_user_text(body)})}}]}
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if "tool_calls" in message else "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }

    def once(self, fault: Fault) -> None:
        with self.lock:
            self.queue.append(fault)

    def start(self) -> Self:
        self._server = _Server(("127.0.0.1", self.port), self.handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name=f"fake-{self.name}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket: new connections are refused until start() again."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server.kill_connections()
            self._server = None

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
            self.received_headers.clear()
            self.fault = None
            self.queue.clear()
        self.chunk_delay = 0.0

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def owner_wants_tool(body: dict[str, Any]) -> bool:
    return body.get("tool_choice") not in (None, "none")
