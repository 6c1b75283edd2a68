"""A real `redis-server` on a free loopback port, started and killed by the tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.support.gateway import free_port


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed: `make system-tools` installs it where it runs as root "
                    "(elsewhere: sudo apt-get install redis-server)")
    return path


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = redis_binary()
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        # No persistence: a killed server comes back empty, the harder case for "state returns".
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def dump(self) -> list[bytes]:
        """Every key and every value (strings and hash fields) now in the server."""
        c = self.client()
        out: list[bytes] = []
        for key in c.scan_iter(count=1000):
            out.append(key)
            kind = c.type(key)
            if kind == b"string":
                out.append(c.get(key) or b"")
            elif kind == b"hash":
                for f, v in c.hgetall(key).items():
                    out += [f, v]
        return out
