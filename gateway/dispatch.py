"""Send a request along a decision's chain of targets: retries per target, then the fallbacks.

Retries use tenacity (exponential backoff with jitter, Retry-After honoured when it fits), all
bounded by the request deadline. A target the connectivity monitor already knows is offline is
skipped at once when something is left to try, instead of being discovered by a timeout. For a
stream, the first meaningful chunk is pulled before we commit to a target, so a failure before
the first token falls back transparently; so does slowness: no first token within the target's
first-token deadline (see gateway/policy/pace.py) fails the attempt as `slow_first_token`, and a
rule's `hedge_after_s` starts the next target in parallel (gateway/hedge.py).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from gateway.backends.base import Backend, BackendError, CallOptions
from gateway.connectivity import ConnectivityMonitor
from gateway.hedge import Hedge, race
from gateway.policy.model import Policy
from gateway.policy.pace import NO_PACE, Pace
from gateway.stream_deadline import SlowError

log = structlog.get_logger("gateway.dispatch")

BodyFor = Callable[[str], dict[str, Any]]  # target name -> the body to send it (redacted for cloud)
PaceFor = Callable[[str], Pace]  # target name -> its slowness limits under the request's rule


def _no_pace(target: str) -> Pace:
    return NO_PACE


@dataclass(frozen=True)
class Fallback:
    source: str
    to: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}->{self.to}: {self.reason}"


@dataclass
class Outcome:
    target: str
    fallbacks: list[Fallback] = field(default_factory=list)
    attempts: int = 0
    response: dict[str, Any] | None = None
    head: list[dict[str, Any]] = field(default_factory=list)  # stream chunks already pulled
    rest: AsyncIterator[dict[str, Any]] | None = None  # the remaining stream
    hedge: Hedge | None = None  # a second target was started because the first was slow


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
            hinted = getattr(exc, "retry_after", None)
            delay = hinted if hinted is not None else _BACKOFF(_Attempt(attempt))
            return max(0.0, min(delay, deadline - time.monotonic() - 0.05))

        def out_of_time(state: RetryCallState | None = None) -> bool:
            return time.monotonic() >= deadline - 0.05

        if cfg.retries < 1 or not should_retry(first) or out_of_time():
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

    async def _walk(self, chain: tuple[str, ...], opts: CallOptions, attempt_one: Any) -> Outcome:
        errors: list[tuple[str, BackendError]] = []
        fallbacks: list[Fallback] = []
        attempts = 0  # over the whole chain

        async def one_attempt(target: str) -> Outcome:
            nonlocal attempts
            attempts += 1
            try:
                return await attempt_one(target)
            except BackendError as e:
                self._record(target, e)
                raise
            except Exception as exc:
                # A backend bug or a library raising outside its documented errors (seen:
                # AttributeError from a socket torn down mid-call) must not lose the request:
                # treat it as a failed attempt and fall back.
                e = BackendError("protocol", f"{target}: unexpected {type(exc).__name__}")
                self._record(target, e)
                raise e from None

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

    def _usable(self, target: str) -> bool:
        return not self.monitor.disabled(target) and self.monitor.state(target) != "offline"

    def _first_token_limits(self, chain: tuple[str, ...], pace: PaceFor) -> dict[str, float | None]:
        """Each target's first-token deadline, where a later target could still answer: with
        nowhere left to go, waiting beats failing."""
        limits: dict[str, float | None] = {}
        for i, target in enumerate(chain):
            limit = pace(target).first_token_s
            later = chain[i + 1:]
            if limit is not None and not any(self._usable(t) or (t == chain[-1] and not self.monitor.disabled(t))
                                             for t in later):
                limit = None
            limits[target] = limit
        return limits

    async def _go(self, chain: tuple[str, ...], opts: CallOptions, attempt_one: Any,
                  hedge_after_s: float | None) -> Outcome:
        if hedge_after_s is None or len(chain) < 2 or not self._usable(chain[0]):
            return await self._walk(chain, opts, attempt_one)
        route, rest = chain[0], chain[1:]
        r = await race(lambda: self._walk((route,), opts, attempt_one),
                       lambda: self._walk(rest, opts, attempt_one),
                       hedge_after_s, lambda o: aclose_quietly(o.rest))
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

    async def complete(self, chain: tuple[str, ...], body_for: BodyFor, opts: CallOptions,
                       pace: PaceFor = _no_pace, hedge_after_s: float | None = None) -> Outcome:
        limits = self._first_token_limits(chain, pace)

        async def one(target: str) -> Outcome:
            call = self.backends[target].complete(body_for(target), opts)
            limit = limits.get(target)
            if limit is None:
                return Outcome(target=target, response=await call)
            timer = asyncio.timeout(limit)
            try:
                async with timer:
                    resp = await call
            except (TimeoutError, BackendError):
                if timer.expired():
                    raise SlowError("slow_first_token", f"{target}: no answer within {limit:g} s") from None
                raise
            return Outcome(target=target, response=resp)

        return await self._go(chain, opts, one, hedge_after_s)

    async def stream(self, chain: tuple[str, ...], body_for: BodyFor, opts: CallOptions,
                     pace: PaceFor = _no_pace, hedge_after_s: float | None = None) -> Outcome:
        limits = self._first_token_limits(chain, pace)

        async def one(target: str) -> Outcome:
            it = aiter(self.backends[target].stream(body_for(target), opts))
            head: list[dict[str, Any]] = []

            async def first_token() -> None:
                while True:
                    try:
                        chunk = await anext(it)
                    except StopAsyncIteration:
                        return
                    head.append(chunk)
                    if _meaningful(chunk):
                        return

            limit = limits.get(target)
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

        return await self._go(chain, opts, one, hedge_after_s)


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
    """Close an async iterator (a stream we stop reading), ignoring what closing it raises."""
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass
