"""Fixtures shared by every test package: a fake cloud and a fake local server, real and on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.upstream import FakeUpstream


@pytest.fixture(scope="module")
def cloud() -> Iterator[FakeUpstream]:
    """Echoes the last user message back (`echo: …`), so placeholders return to be restored."""
    with FakeUpstream(model="cloud-model", name="cloud") as up:
        yield up


@pytest.fixture(scope="module")
def local() -> Iterator[FakeUpstream]:
    with FakeUpstream(model="local-model", name="local", reply=lambda b: "local answer") as up:
        yield up
