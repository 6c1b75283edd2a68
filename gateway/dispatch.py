"""Send a request along a decision's chain of targets: retries per target, then the fallbacks.

Retries use tenacity (exponential backoff with jitter, Retry-After honoured when it fits), all
bounded by the request deadline. A target the connectivity monitor already knows is offline is
skipped at once when something is left to try, instead of being discovered by a timeout. For a
stream, the first meaningful chunk is pulled before we commit to a target, so a failure before
the first token falls back transparently; so does slowness: no first token within the target's
first-token deadline (see gateway/policy/pace.py) fails the attempt as `slow_first_token`, and a
rule's `hedge_after_s` starts the next target in parallel (gateway/hedge.py). A non-streamed
request to a target with such limits is streamed from it and assembled (gateway/assemble.py), so
the same guards apply and a long answer that is arriving is not mistaken for a silent target.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from gateway.assemble import Assembler, streaming_body
from gateway.backends.base import Backend, BackendError, CallOptions
from gateway.connectivity import ConnectivityMonitor
from gateway.hedge import Hedge, race
from gateway.policy.model import Policy
from gateway.policy.pace import NO_PACE, Pace
from gateway.policy.targets import LocalTarget
from gateway.stream_deadline import SlowError, StreamDeadline

log = structlog.get_logger("gateway.dispatch")

BodyFor = Callable[[str], dict[str, Any]]  # target name -> the body to send it (redacted for cloud)
PaceFor = Callable[[str], Pace]  # target name -> its slowness limits under the request's rule


def _no_pace(target: str) -> Pace:
    return NO_PACE


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Fallback:
    source: str
    to: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}->{self.to}: {self.reason}"


@dataclass
class Part:
    """One target's share of an answer (a resumed stream has several): for the audit line, the
    token metrics and the x-hybrid-model header. `model` is the one the answer names; `usage` is
    None when the target's part ended before it said (a stream cut mid-answer)."""

    target: str
    model: str | None = None
    usage: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        usage = self.usage or {}
        return {"target": self.target, "model": self.model, "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens")}


@dataclass
class Outcome:
    target: str
    fallbacks: list[Fallback] = field(default_factory=list)
    attempts: int = 0
    response: dict[str, Any] | None = None
    head: list[dict[str, Any]] = field(default_factory=list)  # stream chunks already pulled
    rest: AsyncIterator[dict[str, Any]] | None = None  # the remaining stream
    hedge: Hedge | None = None  # a second target was started because the first was slow

    def part(self) -> Part:
        """This target's share as known now: the model its answer (or first chunk) names."""
        said = [self.response] if self.response is not None else self.head
        model = next((str(c["model"]) for c in said if c.get("model")), None)
        return Part(self.target, model, self.response.get("usage") if self.response is not None else None)


# One attempt on a target: (target, called at its first token) -> its outcome
AttemptOne = Callable[[str, Callable[[], None]], Awaitable[Outcome]]


class AllTargetsFailed(Exception):
    def __init__(self, errors: list[tuple[str, BackendError]], fallbacks: list[Fallback]) -> None:
        super().__init__("; ".join(f"{t}: {e.reason}" for t, e in errors))
        self.errors = errors
        self.fallbacks = fallbacks

    @property
    def retry_after(self) -> float | None:
        hints = [e.retry_after for _, e in self.errors if e.retry_after is not None]
        return min(hints) if hints else None

    @property
    def invalid(self) -> BackendError | None:
        """The request itself was rejected (4xx): the caller should see that error."""
        for _, e in self.errors:
            if e.kind == "invalid":
                return e
        return None


def _meaningful(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("tool_calls") or choice.get("finish_reason"):
            return True
    return bool(chunk.get("usage")) and not chunk.get("choices")


# Exponential backoff with jitter; stateless (it reads only the attempt number), so shared.
_BACKOFF = wait_exponential_jitter(initial=0.05, max=2.0, jitter=0.05)


@dataclass(frozen=True)
class _Attempt:
    """What tenacity's wait strategies read from a retry state."""

    attempt_number: int


class _OutOfTime(stop_base):
    """Stop retrying once the request's deadline is all but reached."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def now(self) -> bool:
        return time.monotonic() >= self.deadline - 0.05

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.now()


def _counts_against_connectivity(e: BackendError) -> bool:
    return e.kind in ("connect", "timeout", "protocol") or (e.kind == "status" and (e.status or 0) >= 500)


class Dispatcher:
    def __init__(self, policy: Policy, backends: dict[str, Backend], monitor: ConnectivityMonitor) -> None:
        self.policy = policy
        self.backends = backends
        self.monitor = monitor

    async def _attempts(self, target: str, deadline: float, call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """Run `call` under the target's retry policy; return its outcome or raise the last error.

        The first attempt runs bare and tenacity takes over only after a retryable failure: setting
        up its retry loop costs ~0.3 ms per call here, a third of our whole per-request budget, and
        almost every call succeeds at once.
        """
        try:
            return await call()
        except BackendError as first:
            return await self._retry(target, deadline, call, first)

    async def _retry(self, target: str, deadline: float, call: Callable[[], Awaitable[Outcome]],
                     first: BackendError) -> Outcome:
        """Attempts 2.. after `first` failed, or `first` re-raised when a retry is not worth it."""
        cfg = self.policy.targets[target]
        max_after = cfg.max_retry_after_s

        def should_retry(exc: BaseException) -> bool:
            if not isinstance(exc, BackendError) or not exc.retryable:
                return False
            if exc.retry_after is not None and exc.retry_after > max_after:
                return False  # not worth the wait: the fallback answers sooner
            return True

        def delay_after(attempt: int, exc: BaseException | None) -> float:
            hinted = exc.retry_after if isinstance(exc, BackendError) else None
            delay = hinted if hinted is not None else _BACKOFF(cast(RetryCallState, _Attempt(attempt)))
            return max(0.0, min(delay, deadline - time.monotonic() - 0.05))

        out_of_time = _OutOfTime(deadline)
        if cfg.retries < 1 or not should_retry(first) or out_of_time.now():
            raise first
        await asyncio.sleep(delay_after(1, first))

        def wait(state: RetryCallState) -> float:  # tenacity's attempt n is our attempt n + 1
            return delay_after(state.attempt_number + 1, state.outcome.exception() if state.outcome else None)

        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(cfg.retries) | out_of_time,
            wait=wait,
            retry=retry_if_exception(should_retry),
            reraise=True,
        ):
            with attempt:
                outcome = await call()
        return outcome

    def _record(self, target: str, error: BackendError | None) -> None:
        if not self.policy.is_cloud(target):
            return
        if error is None or not _counts_against_connectivity(error):
            self.monitor.record(target, True)
        else:
            self.monitor.record(target, False, error.reason)

    async def _walk(self, chain: tuple[str, ...], opts: CallOptions, attempt_one: AttemptOne,
                    on_first_token: Callable[[], None] = _nothing) -> Outcome:
        errors: list[tuple[str, BackendError]] = []
        fallbacks: list[Fallback] = []
        attempts = 0  # over the whole chain

        async def one_attempt(target: str) -> Outcome:
            nonlocal attempts
            attempts += 1
            if opts.trace is None:
                return await untraced(target)
            with opts.trace.attempt(target, *self._described(target)) as span:
                try:
                    return await untraced(target)
                except BackendError as e:
                    opts.trace.failed(span, e.reason)
                    raise

        async def untraced(target: str) -> Outcome:
            try:
                return await attempt_one(target, on_first_token)
            except BackendError as e:
                self._record(target, e)
                raise
            except Exception as exc:
                # A backend bug or a library raising outside its documented errors (seen:
                # AttributeError from a socket torn down mid-call) must not lose the request:
                # treat it as a failed attempt and fall back.
                err = BackendError("protocol", f"{target}: unexpected {type(exc).__name__}")
                self._record(target, err)
                raise err from None

        for i, target in enumerate(chain):
            nxt = chain[i + 1] if i + 1 < len(chain) else None
            if time.monotonic() >= opts.deadline:
                errors.append((target, BackendError("timeout", "request deadline passed")))
                break
            if self.monitor.disabled(target):
                errors.append((target, BackendError("connect", f"{target} has no API key configured")))
                if nxt:
                    fallbacks.append(Fallback(target, nxt, "not_configured"))
                continue
            # A known-offline target is skipped when something is left to try; one forced offline
            # is never called at all (offline on purpose means no traffic to it).
            if self.monitor.state(target) == "offline" and (nxt or self.monitor.forced_offline(target)):
                if nxt:
                    fallbacks.append(Fallback(target, nxt, "offline"))
                errors.append((target, BackendError("connect", f"{target} is offline")))
                continue
            try:
                outcome = await self._attempts(target, opts.deadline, functools.partial(one_attempt, target))
                self._record(target, None)
                outcome.fallbacks, outcome.attempts = fallbacks, attempts
                return outcome
            except BackendError as e:
                log.warning("target_failed", target=target, reason=e.reason, request_id=opts.request_id)
                errors.append((target, e))
                if e.kind == "invalid":
                    break  # the request itself is wrong: another target would refuse it too
                if nxt:
                    fallbacks.append(Fallback(target, nxt, e.reason))
        raise AllTargetsFailed(errors, fallbacks)

    def _described(self, target: str) -> tuple[str | None, str | None, str]:
        """A target's model, API base and GenAI provider name, for its attempt spans."""
        cfg = self.policy.targets[target]
        if isinstance(cfg, LocalTarget) and cfg.engine == "local_engine":
            return (cfg.model_path or "").removeprefix("builtin:").rsplit("/", 1)[-1] or None, None, "local_engine"
        model = cfg.model or ""
        provider, _, name = model.partition("/")
        return (name or model) or None, cfg.api_base, provider if name else "openai"

    def _usable(self, target: str) -> bool:
        return not self.monitor.disabled(target) and self.monitor.state(target) != "offline"

    def _can_move_on(self, chain: tuple[str, ...]) -> dict[str, bool]:
        """Whether a later target of the chain could still answer after each one: from the last
        resort (or before targets all switched off or offline) there is nowhere to move to."""
        return {target: any(self._usable(t) or (t == chain[-1] and not self.monitor.disabled(t))
                            for t in chain[i + 1:])
                for i, target in enumerate(chain)}

    def _first_token_limits(self, chain: tuple[str, ...], pace: PaceFor) -> dict[str, float | None]:
        """Each target's first-token deadline, where a later target could still answer: with
        nowhere left to go, waiting beats failing."""
        movable = self._can_move_on(chain)
        return {t: pace(t).first_token_s if movable[t] else None for t in chain}

    async def _go(self, chain: tuple[str, ...], opts: CallOptions, attempt_one: AttemptOne,
                  hedge_after_s: float | None) -> Outcome:
        if hedge_after_s is None or len(chain) < 2 or not self._usable(chain[0]):
            return await self._walk(chain, opts, attempt_one)
        route, rest = chain[0], chain[1:]
        # The hedge is for a route that has not started answering; a route already writing its
        # (non-streamed, so not yet returned) answer is left to finish it.
        progressed = asyncio.Event()
        r = await race(lambda: self._walk((route,), opts, attempt_one, progressed.set),
                       lambda: self._walk(rest, opts, attempt_one),
                       hedge_after_s, lambda o: aclose_quietly(o.rest), progressed)
        first = r.first_error if isinstance(r.first_error, AllTargetsFailed) else None
        if r.first_error is not None and first is None:
            raise r.first_error
        if not r.hedged:
            if r.value is not None:
                return r.value
            assert first is not None
            try:  # the route failed before the hedge was due: down the chain as usual
                outcome = await self._walk(rest, opts, attempt_one)
            except AllTargetsFailed as exc:
                raise _joined(route, rest, first, exc) from None
            return _after(route, rest[0], first, outcome)
        if r.value is None:
            second = r.second_error
            if not isinstance(second, AllTargetsFailed):
                raise second or AssertionError("hedge race ended without a result")
            raise _joined(route, rest, first, second) if first else second
        outcome = r.value
        hedge = Hedge(route, rest[0], outcome.target)
        if r.from_hedge:
            outcome = _after(route, outcome.target if not first else rest[0], first, outcome,
                             reason=None if first else "hedge_won")
        outcome.hedge = hedge
        return outcome

    async def _open(self, target: str, body: dict[str, Any], opts: CallOptions, limit: float | None,
                    on_first_token: Callable[[], None]) -> Outcome:
        """Start a stream and pull it up to its first meaningful chunk, within `limit` if given."""
        it = aiter(self.backends[target].stream(body, opts))
        head: list[dict[str, Any]] = []

        async def first_token() -> None:
            while True:
                try:
                    chunk = await anext(it)
                except StopAsyncIteration:
                    return
                head.append(chunk)
                if _meaningful(chunk):
                    on_first_token()
                    return

        try:
            if limit is None:
                await first_token()
            else:
                # One timer per attempt, not per chunk; on expiry the pending read is cancelled,
                # which closes the upstream connection (the backend's stream ends there).
                timer = asyncio.timeout(limit)
                try:
                    async with timer:
                        await first_token()
                except (TimeoutError, BackendError):
                    if timer.expired():
                        raise SlowError("slow_first_token",
                                        f"{target}: no first token within {limit:g} s") from None
                    raise
        except BaseException:
            await aclose_quietly(it)
            raise
        return Outcome(target=target, head=head, rest=it)

    async def complete(self, chain: tuple[str, ...], body_for: BodyFor, opts: CallOptions,
                       pace: PaceFor = _no_pace, hedge_after_s: float | None = None) -> Outcome:
        """One whole answer. A target with slowness limits is asked for a stream, read under the
        same guards as a streamed request's, and its chunks assembled (gateway/assemble.py): a
        long answer that is arriving is waited for, a silent or stalled one is left."""
        movable = self._can_move_on(chain)
        limits = self._first_token_limits(chain, pace)

        async def one(target: str, on_first_token: Callable[[], None]) -> Outcome:
            limit = limits.get(target)
            watch = pace(target) if movable[target] and pace(target).watches_stream else None
            if limit is None and watch is None:
                return Outcome(target=target, response=await self.backends[target].complete(body_for(target), opts))
            opened = await self._open(target, streaming_body(body_for(target)), opts, limit, on_first_token)
            return Outcome(target=target, response=await _assembled(opened, opts, watch))

        return await self._go(chain, opts, one, hedge_after_s)

    async def stream(self, chain: tuple[str, ...], body_for: BodyFor, opts: CallOptions,
                     pace: PaceFor = _no_pace, hedge_after_s: float | None = None) -> Outcome:
        limits = self._first_token_limits(chain, pace)

        async def one(target: str, on_first_token: Callable[[], None]) -> Outcome:
            return await self._open(target, body_for(target), opts, limits.get(target), on_first_token)

        return await self._go(chain, opts, one, hedge_after_s)


async def _assembled(opened: Outcome, opts: CallOptions, pace: Pace | None) -> dict[str, Any]:
    """The rest of an opened stream read to its end under the request deadline (and `pace`'s stall
    and rate limits, which end it with SlowError), as one chat completion."""
    asm = Assembler()
    for chunk in opened.head:
        asm.feed(chunk)
    it = opened.rest
    assert it is not None
    guard = StreamDeadline(opts.deadline, pace)
    try:
        while True:
            try:
                asm.feed(await guard.next(it))
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise BackendError("timeout", f"{opened.target}: request deadline passed mid-answer") from None
    finally:
        guard.close()
        await aclose_quietly(it)
    completion = asm.completion()
    if not completion["choices"]:
        raise BackendError("protocol", f"{opened.target}: the stream ended without an answer")
    return completion


def _after(route: str, to: str, failed: AllTargetsFailed | None, outcome: Outcome,
           reason: str | None = None) -> Outcome:
    """`outcome` of the rest of the chain (which starts at `to`), as reached from `route`."""
    why = reason or (failed.errors[-1][1].reason if failed and failed.errors else "failed")
    outcome.fallbacks = [*(failed.fallbacks if failed else []), Fallback(route, to, why),
                         *outcome.fallbacks]
    return outcome


def _joined(route: str, rest: tuple[str, ...], first: AllTargetsFailed | None,
            second: AllTargetsFailed) -> AllTargetsFailed:
    if first is None:
        return second
    why = first.errors[-1][1].reason if first.errors else "failed"
    return AllTargetsFailed([*first.errors, *second.errors],
                            [*first.fallbacks, Fallback(route, rest[0], why), *second.fallbacks])


async def aclose_quietly(it: AsyncIterator[Any] | None) -> None:
    """Close a stream we stop reading, ignoring what closing it raises. The Backend seam declares
    an AsyncIterator (no aclose); every stream here is an async generator, which has one."""
    if isinstance(it, AsyncGenerator):
        try:
            await it.aclose()
        except Exception:
            pass
