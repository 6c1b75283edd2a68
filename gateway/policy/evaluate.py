"""The routing decision: a pure function of (request features, policy).

No I/O, no clock, no globals: `decide` is what `explain`, the response headers, the audit log and
the dispatcher all read, so a decision is explained exactly as it is executed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from gateway.features import BUDGET_SLACK_USD, DIFFICULTY_LEVELS, SENSITIVITY_LEVELS, Features, level_rank
from gateway.policy.model import AtLeast, Policy, Rule, When
from gateway.policy.pace import NO_PACE, Pace, resolve


@dataclass(frozen=True)
class Decision:
    rule: str
    action: str  # "route" | "block"
    chain: tuple[str, ...] = ()  # target names in the order they will be tried
    redact: bool = False
    block_status: int | None = None
    block_message: str | None = None
    block_code: str | None = None  # the error code a block answers with; None: blocked_by_policy
    matched: tuple[str, ...] = ()  # human-readable reasons the rule matched
    pinned: str | None = None  # the target the request named, if any
    notes: tuple[str, ...] = field(default_factory=tuple)
    paces: tuple[tuple[str, Pace], ...] = ()  # the slowness limits in force, per target of the chain
    hedge_after_s: float | None = None
    local_tools: str | None = None  # honour | refuse, for a request with tools / a response_format
    refuses_local: bool = False  # local targets were taken out of the chain by `local_tools: refuse`
    retry_after_s: float | None = None  # a block that lifts by itself (an exhausted budget): when

    @property
    def target(self) -> str | None:
        return self.chain[0] if self.chain else None

    def pace(self, target: str) -> Pace:
        return next((p for t, p in self.paces if t == target), NO_PACE)

    @property
    def fallbacks(self) -> tuple[str, ...]:
        return self.chain[1:]

    @property
    def pin_refused(self) -> str | None:
        """The target the request named when the decision does not go there (a guard rule, fail closed)."""
        if self.pinned is not None and self.action == "route" and self.pinned not in self.chain:
            return self.pinned
        return None

    def as_dict(self) -> dict[str, object]:
        return {
            "rule": self.rule,
            "action": self.action,
            "target": self.target,
            "fallbacks": list(self.fallbacks),
            "redact": self.redact,
            "block": {"status": self.block_status, "message": self.block_message}
            if self.action == "block"
            else None,
            "matched": list(self.matched),
            "pinned": self.pinned,
            "pin_refused": self.pin_refused,
            "notes": list(self.notes),
            "deadlines": {t: p.as_dict() for t, p in self.paces if t in self.chain},
            "hedge_after_s": self.hedge_after_s,
            "local_tools": self.local_tools,
            "retry_after_s": self.retry_after_s,
        }


def _blocked(rule: str, status: int, message: str, *, code: str | None = None, matched: tuple[str, ...] = (),
             pinned: str | None = None, notes: tuple[str, ...] = (), local_tools: str | None = None,
             retry_after_s: float | None = None) -> Decision:
    """A refusal, answered with `status` and `message`; `code` None: blocked_by_policy."""
    return Decision(rule=rule, action="block", block_status=status, block_message=message, block_code=code,
                    matched=matched, pinned=pinned, notes=notes, local_tools=local_tools, retry_after_s=retry_after_s)


def _level(levels: tuple[str, ...], cond: str | AtLeast, actual: str, what: str) -> str | None:
    if isinstance(cond, AtLeast):
        if level_rank(levels, actual) >= level_rank(levels, cond.at_least):
            return f"{what} {actual} >= {cond.at_least}"
        return None
    return f"{what} == {actual}" if actual == cond else None


def match(when: When, f: Features) -> tuple[str, ...] | None:
    """Reasons the condition holds, or None when it does not (keys are ANDed)."""
    reasons: list[str] = []

    def need(reason: str | None) -> bool:
        if reason is None:
            return False
        reasons.append(reason)
        return True

    if when.connectivity is not None:
        wanted = when.connectivity if isinstance(when.connectivity, list) else [when.connectivity]
        if not need(f"connectivity == {f.overall_connectivity}" if f.overall_connectivity in wanted else None):
            return None
    if when.sensitivity is not None and not need(
        _level(SENSITIVITY_LEVELS, when.sensitivity, f.sensitivity.level, "sensitivity")
    ):
        return None
    if when.difficulty is not None and not need(
        _level(DIFFICULTY_LEVELS, when.difficulty, f.difficulty.level, "difficulty")
    ):
        return None
    if when.model is not None and not need(
        f"model {f.model!r} ~ {when.model!r}" if fnmatchcase(f.model, when.model) else None
    ):
        return None
    if when.client is not None and not need(
        f"client {f.client!r} ~ {when.client!r}"
        if f.client is not None and fnmatchcase(f.client, when.client)
        else None
    ):
        return None
    if when.prompt_tokens is not None:
        b, n = when.prompt_tokens, f.prompt_tokens
        if (b.gt is not None and not n > b.gt) or (b.lt is not None and not n < b.lt):
            return None
        reasons.append(f"prompt_tokens {n} within (gt={b.gt}, lt={b.lt})")
    if when.has_tools is not None and not need(
        f"has_tools == {f.has_tools}" if f.has_tools == when.has_tools else None
    ):
        return None
    if when.has_images is not None and not need(
        f"has_images == {f.has_images}" if f.has_images == when.has_images else None
    ):
        return None
    if when.budget is not None and not need(
        f"budget {f.budget.status}" if f.budget.status == when.budget else None
    ):
        return None
    for name, pattern in (when.header or {}).items():
        value = f.headers.get(name.lower())
        if not need(f"header {name} ~ {pattern!r}" if value is not None and fnmatchcase(value, pattern) else None):
            return None
    return tuple(reasons) or ("matches every request",)


def resolve_model(policy: Policy, requested: str) -> str | None:
    """Target pinned by the requested model name; None means the policy decides (`auto`).

    Raises KeyError for a name the policy does not know.
    """
    if requested == "auto":
        return None
    if requested in policy.targets:
        return requested
    alias = policy.aliases.get(requested)
    if alias is None:
        raise KeyError(requested)
    return None if alias == "auto" else alias


def _apply_pin(policy: Policy, rule: Rule, chain: tuple[str, ...], pinned: str) -> tuple[tuple[str, ...], str]:
    """A pin may move the request to a target only where it exposes no more data than the rule allows."""
    if pinned in chain:
        rest = tuple(t for t in chain if t != pinned)
        return (pinned, *rest), f"pinned to {pinned}"
    if not policy.is_cloud(pinned):
        return (pinned, *chain), f"pinned to local target {pinned}"
    if rule.pin_allowed:
        return (pinned, *chain), f"pinned to {pinned}"
    return chain, f"pin to {pinned} refused: rule {rule.name!r} keeps this request on the device"


def _refused_locally(policy: Policy, rule: Rule, features: Features, chain: tuple[str, ...], pinned: str | None,
                     reasons: tuple[str, ...], notes: tuple[str, ...]) -> Decision | None:
    """`local_tools: refuse` with nothing but local targets left for the request: its refusal."""
    remote = [t for t in chain if policy.is_cloud(t)]
    online = [t for t in remote if features.connectivity.get(t) == "online"]
    if online and (pinned is None or policy.is_cloud(pinned)):
        return None
    if pinned is not None and not policy.is_cloud(pinned):
        why = f"the request names local target {pinned!r}"
    elif remote:
        states = ", ".join(f"{t} {features.connectivity.get(t, 'disabled')}" for t in remote)
        why = f"no cloud target of its chain is online ({states})"
    else:
        why = "its chain has no cloud target"
    # 403, a policy refusal like a rule's block: a 5xx would have the SDKs retry it at once, for nothing
    return _blocked(rule.name, 403, f"This request has {features.structured}, and rule {rule.name!r} does not "
                    f"answer those on local targets (policy: local_tools = refuse); {why}.",
                    code="local_tools_refused", matched=reasons, pinned=pinned, notes=notes, local_tools="refuse")


def _over_budget(policy: Policy, features: Features, decision: Decision) -> Decision:
    """An exhausted budget refuses a chain that could spend (a priced target anywhere in it: a
    fallback is spend too); free chains, e.g. a `budget: exceeded` rule's local route, go on."""
    if features.budget.status != "exceeded" or decision.action != "route":
        return decision
    priced = [t for t in decision.chain if policy.prices(t) is not None]
    if not priced:
        return decision
    b = features.budget
    limit = b.limit_usd or 0.0
    if b.spent_usd >= limit - BUDGET_SLACK_USD:
        message = (f"Client {features.client!r} has spent its budget of ${limit:g} for this {b.period} "
                   f"(${b.spent_usd:.4f}); rule {decision.rule!r} would use priced target(s) {', '.join(priced)}. "
                   f"The budget resets in {math.ceil(b.resets_in_s)} s.")
        retry = b.resets_in_s
    else:  # not spent yet, but this request's hold does not fit beside the spend and those in flight
        message = (f"Client {features.client!r} has ${max(0.0, limit - b.spent_usd):.4f} left of its budget of "
                   f"${limit:g} for this {b.period}, ${b.held_usd:.4f} of it held by requests in flight; this "
                   f"request may cost up to ${b.hold_usd:.4f} (its prompt and max_tokens at the priced targets' "
                   f"prices). Ask for fewer max_tokens, or retry when requests in flight have settled.")
        alone = b.spent_usd + b.hold_usd <= limit  # it fits once those in flight settle
        retry = min(b.resets_in_s, 1.0) if alone else b.resets_in_s
    return _blocked(decision.rule, 429, message, code="budget_exceeded", matched=decision.matched,
                    pinned=decision.pinned, retry_after_s=retry,
                    notes=(*decision.notes, f"budget exceeded: priced target(s) {', '.join(priced)} refused"))


def decide(features: Features, policy: Policy, pinned: str | None = None) -> Decision:
    """First matching rule wins, then the client's budget has its say. Pure: same inputs, same Decision."""
    return _over_budget(policy, features, _decide_rule(features, policy, pinned))


def _decide_rule(features: Features, policy: Policy, pinned: str | None) -> Decision:
    """First matching rule wins. Pure: same inputs, same Decision."""
    for rule in policy.rules:
        reasons = match(rule.when, features)
        if reasons is None:
            continue
        if rule.block is not None:
            return _blocked(rule.name, rule.block.status, rule.block.message, matched=reasons, pinned=pinned)
        chain = policy.chain(rule)
        notes: tuple[str, ...] = ()
        if pinned is not None:
            chain, note = _apply_pin(policy, rule, chain, pinned)
            notes = (note,)
        if features.has_images and not any(policy.takes_images(t) for t in chain):
            if policy.defaults.images == "reject":
                return _blocked(rule.name, 400, f"This request has images, and no target rule {rule.name!r} may "
                                f"use ({', '.join(chain)}) takes images (policy: defaults.images = reject).",
                                code="images_not_supported", matched=reasons, pinned=pinned, notes=notes)
            notes = (*notes, "images dropped: no target of the chain takes images")
        local_tools = policy.local_tools(rule) if features.structured else None
        local = [t for t in chain if not policy.is_cloud(t)]
        refuses_local = local_tools == "refuse" and bool(local)
        if refuses_local:
            refused = _refused_locally(policy, rule, features, chain, pinned, reasons, notes)
            if refused is not None:
                return refused
            chain = tuple(t for t in chain if policy.is_cloud(t))
            notes = (*notes, f"{features.structured}: local targets {', '.join(local)} left out (local_tools: refuse)")
        elif local_tools == "honour" and local:
            notes = (*notes, f"{features.structured}: honoured on local targets {', '.join(local)} "
                     "(local_tools: honour)")
        return Decision(
            rule=rule.name,
            action="route",
            chain=chain,
            redact=rule.redact,
            matched=reasons,
            pinned=pinned,
            notes=notes,
            paces=resolve(policy, rule, chain),
            hedge_after_s=rule.hedge_after_s if len(chain) > 1 else None,
            local_tools=local_tools,
            refuses_local=refuses_local,
        )
    return _blocked("(none)", 403, "No policy rule matches this request.", pinned=pinned)
