"""Run the real gateway (uvicorn, real socket) on a free loopback port inside the test process."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from gateway.app import create_app
from gateway.http_protocol import uvicorn_config
from gateway.state import GatewayState, Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningGateway:
    def __init__(self, state: GatewayState, port: int) -> None:
        self.state = state
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.loop: asyncio.AbstractEventLoop | None = None

    def call(self, coro_fn, *args):  # run a coroutine on the gateway's loop, e.g. state.reload
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self.loop).result(timeout=60)

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=30, trust_env=False, **kw)


@contextmanager
def run_gateway(policy_path: str | Path, *, admin_key: str | None = "admin-secret", audit_path: str | None = None,
                watch: bool = False, force: str = "auto", audit_prompts: str = "off") -> Iterator[RunningGateway]:
    settings = Settings(policy_path=str(policy_path), admin_key=admin_key, audit_path=audit_path, watch=watch,
                        force=force, reload_grace_s=0.5, audit_prompts=audit_prompts)  # type: ignore[arg-type]
    state = GatewayState(settings)
    app = create_app(settings, state)
    port = free_port()
    config = uvicorn_config(app, host="127.0.0.1", port=port, lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    running = RunningGateway(state, port)

    def serve() -> None:
        loop = asyncio.new_event_loop()
        running.loop = loop
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.serve())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True, name="gateway")
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("gateway failed to start")
        if time.monotonic() > deadline:
            raise TimeoutError("gateway did not start in time")
        time.sleep(0.02)
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(autouse=True)
def reset_upstreams(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, the `cloud` and `local` fake upstreams it used forget what they received
    (a conftest that wants it imports it)."""
    yield
    for name in ("cloud", "local"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()
