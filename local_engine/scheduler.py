"""Continuous batching: many requests share the engine, one engine thread runs them all.

    sched = Scheduler(engine, max_batch=8, max_waiting=16)
    sched.submit(engine.chat(messages, max_tokens=64, should_stop=...), on_delta, on_done)
    ...                                    # on_delta(text) / on_done(error or None) from the engine thread
    sched.stats(); sched.close()

A request becomes a ``Sequence`` (local_engine/sequence.py). Each iteration of the engine thread,
under ``engine.lock``:

1. admit waiting requests in arrival order while fewer than ``max_batch`` are active (a full
   waiting queue refuses at ``submit``: ``QueueFull``, the gateway's 503);
2. end every sequence whose ``should_stop`` is true (client gone, deadline), prefilling or not:
   a cancel is seen between prefill chunks and between decode steps;
3. run one prefill chunk (``prefill_chunk`` tokens) of the prefilling sequence served least so
   far: a long prompt advances one chunk per iteration while short ones that arrive behind it get
   theirs in between, and the decoding sequences get a step after every chunk;
4. every decoding sequence chooses its next token (its own sampler, grammar mask, stop rules) and
   the chosen tokens run as one batched step (``model.step_batch``: each weight block is read once
   for the whole batch; attention per sequence over its own cache).

Greedy output equals a serial ``Generation``'s: the prompt is prefilled in the same chunks and a
batch row computes what a single-row step does (to the rounding of the multi-row kernel, which
sums a block's products in another order from 4 rows up; see docs/engine.md, serving).
A model without ``step_batch`` (the MoE engine) runs each chosen token alone, still interleaved.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from local_engine.errors import EngineError
from local_engine.models.layers import ATTN_GROUP
from local_engine.models.llama import PREFILL_CHUNK
from local_engine.sequence import Sequence

if TYPE_CHECKING:
    from local_engine.engine import Engine
    from local_engine.generation import Generation

# Time-to-first-token buckets (seconds) of the per-request histogram in ``stats()``.
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class QueueFull(EngineError):
    """The waiting queue is full: the caller answers 503 (or retries later)."""


@runtime_checkable
class BatchesDecode(Protocol):
    """A model that runs one decode token for each of several sequences at once (models/llama.py)."""

    def step_batch(self, ids: torch.Tensor, caches: list[Any]) -> torch.Tensor: ...


@dataclass
class _Request:
    gen: Generation
    on_delta: Callable[[str], None]
    on_done: Callable[[BaseException | None], None]
    enqueued: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, engine: Engine, *, max_batch: int = 8, max_waiting: int = 16,
                 prefill_chunk: int | None = None) -> None:
        if max_batch < 1 or max_waiting < 0:
            raise ValueError("max_batch must be >= 1 and max_waiting >= 0")
        self.engine = engine
        self.max_batch, self.max_waiting = max_batch, max_waiting
        engine.max_batch = max(engine.max_batch, max_batch)  # its memory() counts this many KV caches
        # the serial path's chunk by default; any chunk is cut at a multiple of ATTN_GROUP, so a
        # chunk edge never splits an attention group and the logits are a serial run's, bitwise
        chunk = int(prefill_chunk or PREFILL_CHUNK)
        self.prefill_chunk = max(ATTN_GROUP, chunk - chunk % ATTN_GROUP)
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._active: list[tuple[_Request, Sequence]] = []
        self._running = 0  # taken from the queue and not finished (admitted ones included): under _cv
        self._closed = False
        self._thread: threading.Thread | None = None
        # counters read by stats() from other threads: plain ints, written by the engine thread only
        self.admitted = self.finished = self.rejected = self.iterations = 0
        self.prefill_chunks = self.decode_steps = self.decode_tokens = 0
        self.last_batch = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.ttft_n = 0

    # ---------------------------------------------------------------------------- callers' side
    def submit(self, gen: Generation, on_delta: Callable[[str], None],
               on_done: Callable[[BaseException | None], None]) -> None:
        """Queue ``gen`` (from ``Engine.chat``/``generate``, not iterated); raises QueueFull.

        ``on_delta(text)`` for each piece of text and then ``on_done(None)``, or ``on_done(error)``
        (an EngineError for a bad request, anything else is a bug), from the engine thread;
        ``gen`` holds finish_reason, text, usage and stats by then."""
        with self._cv:
            if self._closed:
                raise EngineError("scheduler is closed")
            if len(self._waiting) >= self.max_waiting and self._running + len(self._waiting) >= self.max_batch:
                self.rejected += 1
                raise QueueFull(f"engine queue is full ({self.max_batch} running, {len(self._waiting)} waiting)")
            self._waiting.append(_Request(gen, on_delta, on_done))
            self._cv.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="engine-scheduler", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; whatever is queued or running ends as cancelled."""
        with self._cv:
            self._closed = True
            self._cv.notify()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def stats(self) -> dict[str, Any]:
        steps = self.decode_steps
        pc = self.engine.prefix_cache
        return {"queue_depth": len(self._waiting), "active_sequences": len(self._active),
                "max_batch": self.max_batch, "max_waiting": self.max_waiting,
                "batch_size": self.last_batch,
                "mean_batch_size": round(self.decode_tokens / steps, 3) if steps else 0.0,
                "admitted": self.admitted, "finished": self.finished, "rejected_queue_full": self.rejected,
                "iterations": self.iterations, "prefill_chunks": self.prefill_chunks,
                "decode_steps": self.decode_steps, "decode_tokens": self.decode_tokens,
                "prefix_cache_hit_ratio": round(pc.hits / pc.lookups, 4) if pc.lookups else 0.0,
                "ttft": {"buckets": list(TTFT_BUCKETS), "counts": list(self.ttft_counts),
                         "sum": round(self.ttft_sum, 6), "count": self.ttft_n}}

    # ---------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self._active:
                    self._cv.wait()
                if self._closed:
                    left = list(self._waiting)
                    self._waiting.clear()
                    break
                new = []
                while self._waiting and self._running < self.max_batch:
                    new.append(self._waiting.popleft())
                    self._running += 1
            try:
                self._iteration(new)
            except Exception as e:  # a bug must not strand every caller: end them all with it
                for req, seq in self._active:
                    self._done(req, seq, e)
                self._active = []
        with self.engine.lock:
            for req, seq in list(self._active):
                seq.reason = "cancelled"
                self._done(req, seq, None)
        for req in left:
            req.gen.finish_reason = "cancelled"
            req.on_done(None)

    def _iteration(self, new: list[_Request]) -> None:
        eng = self.engine
        with eng.lock, torch.inference_mode():
            for req in new:
                self._admit(req)
            self.iterations += 1
            for req, seq in list(self._active):
                if seq.reason is None and seq.cancelled():
                    seq.reason = "cancelled"
                if seq.reason is not None:
                    self._done(req, seq, None)
            self._prefill_one()
            self._decode()

    def _admit(self, req: _Request) -> None:
        seq = Sequence(req.gen, req.on_delta, req.enqueued)
        self.admitted += 1
        try:
            run = seq.begin(self.engine)
        except EngineError as e:
            self._done(req, seq, e)
            return
        if run:
            self._active.append((req, seq))
        else:
            self._done(req, seq, None)

    def _prefill_one(self) -> None:
        pre = [(req, seq) for req, seq in self._active if seq.prefilling]
        if not pre:
            return
        req, seq = min(pre, key=lambda rs: rs[1].served)  # min is stable: oldest first on ties
        try:
            seq.prefill(self.engine.model, self.prefill_chunk)
        except (EngineError, ValueError) as e:
            self._done(req, seq, e if isinstance(e, EngineError) else EngineError(str(e)))
            return
        self.engine.steps += 1
        self.prefill_chunks += 1

    def _decode(self) -> None:
        eng = self.engine
        stop_ids = eng.tokenizer.stop_ids
        rows: list[tuple[_Request, Sequence, int]] = []
        for req, seq in list(self._active):
            if seq.logits is None or seq.reason is not None:
                continue
            try:
                nxt = seq.choose(stop_ids)
            except EngineError as e:  # a grammar that cannot go on
                self._done(req, seq, e)
                continue
            if seq.ttft_s is not None and not seq.ttft_recorded:
                self._record_ttft(seq)
            if nxt is None:
                self._done(req, seq, None)
            else:
                rows.append((req, seq, nxt))
        if not rows:
            return
        model = eng.model
        ids = torch.tensor([t for _, _, t in rows], dtype=torch.long)
        caches = [seq.cache for _, seq, _ in rows]
        try:
            if isinstance(model, BatchesDecode):
                logits = model.step_batch(ids, caches)
            else:
                logits = torch.cat([model.forward(ids[b:b + 1], caches[b], last_only=True) for b in range(len(rows))])
        except ValueError as e:  # a sequence ran past the context: end the batch's sequences with it
            for req, seq, _ in rows:
                self._done(req, seq, EngineError(str(e)))
            return
        eng.steps += 1
        self.decode_steps += 1
        self.decode_tokens += len(rows)
        self.last_batch = len(rows)
        for b, (_, seq, _) in enumerate(rows):
            seq.logits = logits[b]

    def _record_ttft(self, seq: Sequence) -> None:
        t = seq.ttft_s
        if t is None:
            return
        seq.ttft_recorded = True
        i = next((k for k, edge in enumerate(TTFT_BUCKETS) if t <= edge), len(TTFT_BUCKETS))
        self.ttft_counts[i] += 1
        self.ttft_sum += t
        self.ttft_n += 1

    def _done(self, req: _Request, seq: Sequence, error: BaseException | None) -> None:
        self._active = [(r, s) for r, s in self._active if r is not req]
        with self._cv:
            self._running -= 1
        self.finished += 1
        try:
            seq.finish(self.engine)
        except Exception as e:  # flushing text to a caller that is gone
            error = error or e
        req.on_done(error)
