"""Fleet tests: a real redis-server and several real gateway replicas sharing it."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import pytest

from tests.fleet.redis_server import RedisServer

VAULT_KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture(scope="module")
def vault_key() -> Iterator[str]:
    # Read by each replica at startup (GATEWAY_VAULT_KEY); the same on every replica, as deployed.
    before = os.environ.get("GATEWAY_VAULT_KEY")
    os.environ["GATEWAY_VAULT_KEY"] = VAULT_KEY
    yield VAULT_KEY
    if before is None:
        os.environ.pop("GATEWAY_VAULT_KEY", None)
    else:
        os.environ["GATEWAY_VAULT_KEY"] = before


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()
