"""TurnCoalescingTransport: the writes of one event-loop turn leave as one, none waits longer."""

from __future__ import annotations

import asyncio

from gateway.http_protocol import TurnCoalescingTransport
from tests.support.gateway import RunningGateway


class _RecordingTransport(asyncio.Transport):
    """The real transport's write side, recorded (the wrapper's only job is what reaches it)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.writes_after_close: list[bytes] = []  # what uvloop would raise on
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        (self.writes_after_close if self.closed else self.writes).append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0


async def test_writes_of_one_turn_leave_in_one_write() -> None:
    real = _RecordingTransport()
    t = TurnCoalescingTransport(real, asyncio.get_running_loop())
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(b"data: 1\n\n")
    t.write(b"data: 2\n\n")
    assert real.writes == []  # still this turn
    assert t.get_write_buffer_size() == 37
    await asyncio.sleep(0)
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\ndata: 1\n\ndata: 2\n\n"]


async def test_a_write_leaves_at_the_end_of_its_turn_not_with_the_next() -> None:
    real = _RecordingTransport()
    t = TurnCoalescingTransport(real, asyncio.get_running_loop())
    t.write(b"first")
    await asyncio.sleep(0)
    assert real.writes == [b"first"]
    t.write(b"second")
    await asyncio.sleep(0)
    assert real.writes == [b"first", b"second"]


async def test_close_sends_what_is_pending_first_and_abort_drops_it() -> None:
    loop = asyncio.get_running_loop()
    real = _RecordingTransport()
    t = TurnCoalescingTransport(real, loop)
    t.write(b"last words")
    t.close()
    assert real.writes == [b"last words"] and real.closed
    await asyncio.sleep(0)  # the turn's own flush finds nothing left: no write after close
    assert real.writes == [b"last words"] and real.writes_after_close == []

    real = _RecordingTransport()
    t = TurnCoalescingTransport(real, loop)
    t.write(b"never sent")
    t.abort()
    await asyncio.sleep(0)
    assert real.writes == [] and real.aborted


async def test_writes_pending_when_the_connection_drops_are_dropped_not_raised() -> None:
    real = _RecordingTransport()
    t = TurnCoalescingTransport(real, asyncio.get_running_loop())
    t.write(b"half an answer")
    real.closed = True  # the peer reset the connection before the turn ended
    await asyncio.sleep(0)  # the turn's flush
    assert real.writes == [] and real.writes_after_close == []


def test_the_gateway_serves_through_it(gw: RunningGateway) -> None:
    # The suite's gateway runs on the production protocol: every streamed and plain answer in the
    # other tests crosses the wrapper; here a streamed answer is read back event by event.
    with gw.client() as c, c.stream("POST", "/v1/chat/completions", json={
        "model": "auto", "stream": True, "messages": [{"role": "user", "content": "hello there"}],
    }) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert len(lines) > 2 and all(line.startswith("data: ") for line in lines)
