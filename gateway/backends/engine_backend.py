"""The in-process engine as a gateway Backend (``engine: local_engine`` targets).

Requests share the model through continuous batching (local_engine/scheduler.py): up to
``max_batch`` sequences decode together, one engine thread runs them. A worker thread takes the
requests in arrival order, renders and tokenises each (and loads the model on first use), and
hands it to the scheduler. At most ``max_queue`` (default 4 x ``max_batch``) requests are in the backend at once (running or
waiting): one more is answered at once with ``BackendError("overloaded", 503, retry_after)``,
never an unbounded pile-up. The event loop only awaits results: text deltas come over with
``loop.call_soon_threadsafe``. A target with speculative decoding on runs its requests one at a
time on the worker (speculation is a single-stream path: local_engine/speculative.py).

Deadline (``opts.deadline``) and cancellation (the client went away: the async generator is
closed, or the awaiting task cancelled) both reach the worker through a flag it polls between
tokens, so it stops within one decode step. A deadline hit after some text came out ends the
answer with ``finish_reason="length"``; with nothing produced it is a ``timeout`` error.

Request fields used: messages, max_tokens / max_completion_tokens, temperature (absent -> greedy:
a small local model answers best greedy), top_p, seed, stop, and the non-OpenAI extras top_k,
repetition_penalty and continue_final_message (vLLM's name: go on writing the last, unfinished
assistant message; the gateway uses it to resume a broken stream), and response_format, tools,
tool_choice, parallel_tool_calls: honoured by grammar-constrained decoding (local_engine/grammar.py,
local_engine/tools.py); calls come back as ``tool_calls`` (streamed as argument deltas) with
``finish_reason: "tool_calls"``, and a format that cannot be enforced is a 400 ("invalid"), never
unconstrained text. Others (n, penalties) are ignored here.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.backends.base import Backend, BackendError, CallOptions

if TYPE_CHECKING:
    from local_engine.engine import Engine
    from local_engine.generation import Generation
    from local_engine.scheduler import Scheduler

_SENTINEL = object()
_STRUCTURE = ("response_format", "tools", "tool_choice", "parallel_tool_calls")  # passed to Engine.chat


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class _Job:
    messages: list[dict[str, Any]]
    sampling: dict[str, Any]
    deadline: float
    emit: Callable[[tuple[str, Any]], None]  # thread-safe: puts an event on the caller's loop
    continue_final: bool = False  # go on writing the unfinished last assistant message
    structure: dict[str, Any] = field(default_factory=dict)  # response_format / tools / tool_choice / ...
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)


# The default bound on requests in the backend (running + waiting), in batches of max_batch.
QUEUE_BATCHES = 4


class EngineBackend(Backend):
    supports_embeddings = True  # the device's own MiniLM (gateway/backends/local_embeddings.py)

    def __init__(self, name: str, model_path: str, *, threads: int | None = None, max_queue: int | None = None,
                 max_batch: int = 8, default_max_tokens: int = 256, **engine_opts: Any) -> None:
        self.name = name
        self.model_path = model_path
        self.threads = threads
        # a queue as deep as the batch made the (max_batch + 1)th concurrent request a 503 at once,
        # though it would have started within one request's time: room for 4 batches' worth
        max_queue = max_queue or QUEUE_BATCHES * max(1, max_batch)
        self.max_queue = max_queue
        self.max_batch = max(1, min(max_batch, max_queue))
        self._scheduler: Scheduler | None = None
        self._flight_lock = threading.Lock()
        self.default_max_tokens = default_max_tokens
        self.engine_opts = engine_opts
        # What OpenAI's system_fingerprint means: the configuration the answers come from.
        self.fingerprint = "fp_" + hashlib.sha256(f"{model_path}|{sorted(engine_opts.items())}".encode()).hexdigest()[:12]
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self._load_lock = threading.Lock()
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._slots = threading.BoundedSemaphore(max_queue)  # queued + running jobs
        self._worker: threading.Thread | None = None
        self._closed = False
        self._ids = itertools.count()
        self._stats: dict[str, Any] = {"requests": 0, "completed": 0, "rejected_overloaded": 0, "timeouts": 0,
                                       "cancelled": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                       "in_flight": 0, "load_s": None, "last_prefill_tok_s": None,
                                       "last_decode_tok_s": None, "avg_job_s": None,
                                       "last_start_step": None}

    # ---------------------------------------------------------------------------- lifecycle
    @property
    def ready(self) -> bool:
        return self.engine is not None

    def load(self) -> None:
        """Load the model now (blocking; idempotent). Raises BackendError if it cannot be loaded."""
        self._loaded()

    def _loaded(self) -> Engine:
        """The engine, loaded first if it was not (BackendError when it cannot be)."""
        with self._load_lock:
            if self.engine is not None:
                return self.engine
            if self.load_error is not None:
                raise BackendError("connect", self.load_error)
            from local_engine.engine import Engine
            from local_engine.errors import EngineError

            t0 = time.monotonic()
            opts = dict(self.engine_opts)
            if self.threads:
                opts["threads"] = self.threads
            try:
                engine = self.engine = Engine.open(self.model_path, **opts)
            except (EngineError, OSError) as e:  # the engine's error tree (local_engine/errors.py)
                self.load_error = f"{self.name}: cannot load model: {e}"
                raise BackendError("connect", self.load_error) from None
            # the memory stats count the KV of every sequence the scheduler may run at once
            self.engine.max_batch = self.max_batch
            self._stats["load_s"] = round(time.monotonic() - t0, 2)
            return engine

    def start_loading(self) -> None:
        """Load in the worker thread without blocking (``ready`` turns true when done)."""
        self._ensure_worker()
        self._jobs.put(None)  # a None job just triggers the lazy load

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
            self._worker.start()

    async def aclose(self) -> None:
        self._closed = True
        if self._worker is not None and self._worker.is_alive():
            self._jobs.put(_SENTINEL)
            await asyncio.to_thread(self._worker.join, 5.0)
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.close, 5.0)
        if self.engine is not None and (self._worker is None or not self._worker.is_alive()):
            # nothing runs the model any more: release its files and threads (a packed MoE's
            # expert store). A worker stuck past the join keeps them; the process exit frees them.
            self.engine.close()

    def stats(self) -> dict[str, Any]:
        s = dict(self._stats)
        s["queued"] = self._jobs.qsize()
        s["ready"] = self.ready
        s["max_queue"] = self.max_queue
        if self.engine is not None:
            s["engine_steps"] = self.engine.steps
            s.update(self.engine.prefix_cache.stats())  # numbers: /metrics exports them per target
            s.update({f"memory_{k}": v for k, v in self.engine.memory().items()})  # weights + experts + KV
            s["speculative"] = self.engine.spec_totals.as_dict()  # exported as hybrid_speculative_*
        sched = self._scheduler
        if sched is not None:
            s["serving"] = sched.stats()  # exported as hybrid_engine_{queue_depth,batch_size,ttft_seconds,...}
        if self.load_error:
            s["load_error"] = self.load_error
        moe = self._moe_stats()
        if moe is not None:
            s["moe"] = moe  # a dict: the metrics collector exports it as hybrid_moe_* families
        return s

    def _moe_stats(self) -> dict[str, Any] | None:
        """Streaming stats of a packed MoE model (cumulative since load), else None."""
        eng = self.engine
        if eng is None or eng.format != "flash-moe-pack":
            return None
        try:
            return dict(eng.model.stats())
        except Exception:  # read while the worker runs: never fail a scrape over it
            return None

    # ---------------------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _SENTINEL:
                return
            if job is None:
                try:
                    self.load()
                except BackendError:
                    pass
                continue
            self._flight(+1)
            handed = False
            try:
                handed = self._serve(job)
            finally:
                if not handed:
                    self._release(job)

    def _flight(self, n: int) -> None:
        with self._flight_lock:
            self._stats["in_flight"] += n

    def _release(self, job: _Job) -> None:
        """The job left the backend (answered, failed or cancelled): its slot is free again."""
        self._flight(-1)
        self._slots.release()
        dt = time.monotonic() - job.enqueued
        avg = self._stats["avg_job_s"]
        self._stats["avg_job_s"] = round(dt if avg is None else 0.8 * avg + 0.2 * dt, 3)

    def _batching(self, engine: Engine) -> Scheduler | None:
        """The scheduler, made on first use; None when requests run one at a time (speculation on)."""
        if engine.speculative != "off":
            return None
        if self._scheduler is None:
            from local_engine.scheduler import Scheduler

            self._scheduler = Scheduler(engine, max_batch=self.max_batch, max_waiting=self.max_queue)
        return self._scheduler

    def _serve(self, job: _Job) -> bool:
        """Start ``job``; True when the scheduler took it (it releases the slot when done)."""
        if job.cancel.is_set():
            job.emit(("end", None))
            return False
        if time.monotonic() >= job.deadline:
            self._stats["timeouts"] += 1
            job.emit(("error", BackendError("timeout", f"{self.name}: deadline passed while queued")))
            return False
        try:
            engine = self._loaded()
        except BackendError as e:
            self._stats["errors"] += 1
            job.emit(("error", e))
            return False

        def should_stop() -> bool:
            return job.cancel.is_set() or time.monotonic() >= job.deadline

        try:
            gen = engine.chat(job.messages, should_stop=should_stop, continue_final_message=job.continue_final,
                                   **job.structure, **job.sampling)
            sched = self._batching(engine)
            if sched is not None:
                def done(error: BaseException | None) -> None:
                    try:
                        if error is None:
                            self._report(job, gen)
                        else:
                            self._failed(job, error)
                    finally:
                        self._release(job)

                sched.submit(gen, lambda delta: job.emit(("delta", delta)), done)
                return True
            for delta in gen:
                job.emit(("delta", delta))
        except Exception as e:  # an EngineError is the request's fault (400), anything else a bug
            self._failed(job, e)
            return False
        self._report(job, gen)
        return False

    def _failed(self, job: _Job, e: BaseException) -> None:
        from local_engine.errors import EngineError

        self._stats["errors"] += 1
        if isinstance(e, EngineError):
            job.emit(("error", BackendError("invalid", f"{self.name}: {e}")))
        else:  # a bug in the engine must not kill the worker thread
            job.emit(("error", BackendError("protocol", f"{self.name}: engine failed: {type(e).__name__}: {e}")))

    def _report(self, job: _Job, gen: Generation) -> None:
        """Count a finished generation and send its end (or the deadline's error) to the caller."""
        st = gen.stats
        self._stats["last_start_step"] = gen.start_step
        self._stats["completed"] += 1
        self._stats["prompt_tokens"] += st.prompt_tokens
        self._stats["completion_tokens"] += st.completion_tokens
        if st.prefill_tok_s:
            self._stats["last_prefill_tok_s"] = round(st.prefill_tok_s, 1)
        if st.decode_tok_s:
            self._stats["last_decode_tok_s"] = round(st.decode_tok_s, 1)
        reason = gen.finish_reason
        if reason == "cancelled":
            if job.cancel.is_set():
                self._stats["cancelled"] += 1
            else:  # the deadline stopped it
                self._stats["timeouts"] += 1
                if not gen.text:
                    job.emit(("error", BackendError("timeout", f"{self.name}: no output before the deadline")))
                    return
            reason = "length"
        content, calls = gen.parsed()
        if calls and reason == "stop":
            reason = "tool_calls"
        job.emit(("end", {"finish_reason": reason, "usage": gen.usage, "content": content,
                          "calls": [(c.name, c.arguments) for c in calls], "stop_sequence": gen.stop_sequence}))

    # ---------------------------------------------------------------------------- requests
    def _sampling(self, body: dict[str, Any]) -> dict[str, Any]:
        mt = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        s: dict[str, Any] = {"max_tokens": int(mt), "temperature": float(body.get("temperature") or 0.0)}
        for key in ("top_p", "seed", "top_k", "repetition_penalty"):
            if body.get(key) is not None:
                s[key] = body[key]
        stop = body.get("stop")
        if stop:
            s["stop"] = [stop] if isinstance(stop, str) else list(stop)
        return s

    def _submit(self, body: dict[str, Any], opts: CallOptions) -> tuple[_Job, asyncio.Queue[tuple[str, Any]]]:
        if self._closed:
            raise BackendError("connect", f"{self.name}: backend closed")
        if self.load_error is not None:
            raise BackendError("connect", self.load_error)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BackendError("invalid", f"{self.name}: request has no messages")
        self._stats["requests"] += 1
        if not self._slots.acquire(blocking=False):
            self._stats["rejected_overloaded"] += 1
            avg = self._stats["avg_job_s"] or 5.0
            raise BackendError("overloaded", f"{self.name}: local engine queue is full ({self.max_queue})",
                               status=503, retry_after=max(1.0, round(avg * self.max_queue / 2, 1)))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(ev: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the caller's loop is gone: nobody is listening
                job.cancel.set()

        structure = {k: body[k] for k in _STRUCTURE if body.get(k) is not None}
        job = _Job(msgs, self._sampling(body), opts.deadline, emit,
                   continue_final=bool(body.get("continue_final_message")), structure=structure)
        self._ensure_worker()
        self._jobs.put(job)
        return job, events

    async def _next(self, job: _Job, events: asyncio.Queue[tuple[str, Any]]) -> tuple[str, Any]:
        # the worker polls the deadline between tokens; this extra margin covers a stuck prefill
        remaining = job.deadline - time.monotonic()
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the inner result and drops
        # a cancel that lands in the same loop turn as an event (bpo-42130); with a token every
        # ~10 ms that lost about one abandoned request in five, which then ran to max_tokens.
        try:
            async with asyncio.timeout(max(remaining, 0) + 30.0):
                return await events.get()
        except TimeoutError:
            job.cancel.set()
            raise BackendError("timeout", f"{self.name}: engine did not answer before the deadline") from None

    def _ids_now(self) -> tuple[str, int]:
        return f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def _model(self, body: dict[str, Any]) -> str:
        return str(body.get("model") or self.name)

    def prompt_tokens(self, body: dict[str, Any]) -> int | None:
        """Counted as Engine.chat renders the prompt: the chat template, with the tools as the
        template (or the tool prompt) writes them."""
        engine = self.engine
        if engine is None or not isinstance(body.get("messages"), list):
            return None
        from local_engine import tools as tools_mod
        from local_engine.errors import EngineError

        try:
            spec = tools_mod.parse_spec(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
            msgs, tpl_tools = tools_mod.prompt_messages(
                body["messages"], spec, tools_mod.template_renders_tools(engine.tokenizer.chat_template))
            text = engine.render_chat(msgs, tools=tpl_tools,
                                      continue_final_message=bool(body.get("continue_final_message")))
        except (EngineError, ValueError, TypeError, KeyError):
            return None  # a request the engine will refuse anyway: the caller estimates
        return len(engine.tokenizer.encode(text))

    async def embed(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        # Embeddings are the MiniLM's, not the chat model's: they need no engine slot or load.
        from gateway.backends.local_embeddings import embed_locally

        return await embed_locally(body)

    async def complete(self, body: dict[str, Any], opts: CallOptions) -> dict[str, Any]:
        job, events = self._submit(body, opts)
        parts: list[str] = []
        try:
            while True:
                kind, val = await self._next(job, events)
                if kind == "delta":
                    parts.append(val)
                elif kind == "error":
                    raise val
                else:
                    break
        finally:
            job.cancel.set()  # no-op when finished; stops the worker if we were cancelled
        cid, created = self._ids_now()
        end = val or {"finish_reason": "stop", "usage": {"prompt_tokens": 0, "completion_tokens": 0,
                                                           "total_tokens": 0}}
        message: dict[str, Any] = {"role": "assistant", "content": "".join(parts)}
        if end.get("calls"):
            message["content"] = end["content"]
            message["tool_calls"] = [{"id": _call_id(), "type": "function",
                                      "function": {"name": name, "arguments": args}} for name, args in end["calls"]]
        choice = {"index": 0, "message": message, "finish_reason": end["finish_reason"], "logprobs": None}
        if end.get("stop_sequence"):
            choice["stop_reason"] = end["stop_sequence"]  # vLLM's field: the stop string that matched
        return {
            "id": cid, "object": "chat.completion", "created": created, "model": self._model(body),
            "system_fingerprint": self.fingerprint, "choices": [choice], "usage": end["usage"],
        }

    async def stream(self, body: dict[str, Any], opts: CallOptions) -> AsyncIterator[dict[str, Any]]:
        job, events = self._submit(body, opts)
        cid, created = self._ids_now()
        model = self._model(body)

        def chunk(delta: dict[str, Any], finish: str | None = None, stop: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            if stop:
                choice["stop_reason"] = stop  # vLLM's field: the stop string that matched
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": self.fingerprint, "choices": [choice]}

        from local_engine.tools import CallStream  # lazy, like the engine itself: torch is heavy

        # with tools allowed, text is held back until it is clearly content or a call
        calls = CallStream() if job.structure.get("tools") and job.structure.get("tool_choice") != "none" else None

        def deltas(events_: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for ev in events_:
                if ev[0] == "content":
                    out.append({"content": ev[1]})
                elif ev[0] == "call":
                    out.append({"tool_calls": [{"index": ev[1], "id": _call_id(), "type": "function",
                                                "function": {"name": ev[2], "arguments": ""}}]})
                else:
                    out.append({"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]})
            return out

        try:
            first = True
            while True:
                kind, val = await self._next(job, events)
                if kind == "error":
                    raise val
                if kind == "delta":
                    pieces = deltas(list(calls.feed(val))) if calls is not None else [{"content": val}]
                elif val is None:  # cancelled before it started
                    return
                else:
                    pieces = deltas(list(calls.close())) if calls is not None else []
                for d in pieces:
                    if first:
                        yield chunk({"role": "assistant", "content": "" if "content" in d else None})
                        first = False
                    yield chunk(d)
                if kind == "delta":
                    continue
                if first:
                    yield chunk({"role": "assistant", "content": ""})
                yield chunk({}, val["finish_reason"], val.get("stop_sequence"))
                yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": val["usage"]}
                return
        finally:
            job.cancel.set()  # client disconnect (aclose/cancel) lands here: the worker stops soon
