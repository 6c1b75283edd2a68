"""The slowness limits in force for each target of a rule's chain: a pure function of the policy.

A rule's value overrides the target's. The last target of a chain gets no first-token deadline:
slowness is a reason to move, and from the last resort there is nowhere to move to, so it is
waited on (up to its `timeout_s`) rather than failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.policy.model import Policy, Rule


@dataclass(frozen=True)
class Pace:
    first_token_s: float | None = None  # no first token (or, not streamed, no answer) within it: move on
    stall_s: float | None = None  # silence after the first token: resume elsewhere
    min_tokens_per_s: float | None = None  # a slower drip over `rate_window_s`: resume elsewhere
    rate_window_s: float = 2.0

    @property
    def watches_stream(self) -> bool:
        return self.stall_s is not None or self.min_tokens_per_s is not None

    def as_dict(self) -> dict[str, float | None]:
        return {
            "first_token_timeout_s": self.first_token_s,
            "stall_timeout_s": self.stall_s,
            "min_tokens_per_s": self.min_tokens_per_s,
            "min_rate_window_s": self.rate_window_s if self.min_tokens_per_s is not None else None,
        }


NO_PACE = Pace()


def resolve(policy: Policy, rule: Rule, chain: tuple[str, ...]) -> tuple[tuple[str, Pace], ...]:
    """(target, its Pace) for each target of `chain`, in order."""
    out = []
    for i, name in enumerate(chain):
        t = policy.targets[name]
        first = rule.first_token_timeout_s if rule.first_token_timeout_s is not None else t.first_token_timeout_s
        out.append((name, Pace(
            first_token_s=first if i + 1 < len(chain) else None,
            stall_s=rule.stall_timeout_s if rule.stall_timeout_s is not None else t.stall_timeout_s,
            min_tokens_per_s=rule.min_tokens_per_s if rule.min_tokens_per_s is not None else t.min_tokens_per_s,
            rate_window_s=rule.min_rate_window_s if rule.min_rate_window_s is not None else t.min_rate_window_s,
        )))
    return tuple(out)


def _describe(name: str, pace: Pace) -> str:
    parts = []
    if pace.first_token_s is not None:
        parts.append(f"first token {pace.first_token_s:g}s")
    if pace.stall_s is not None:
        parts.append(f"stall {pace.stall_s:g}s")
    if pace.min_tokens_per_s is not None:
        parts.append(f"min {pace.min_tokens_per_s:g} tok/s over {pace.rate_window_s:g}s")
    return f"{name} " + (", ".join(parts) if parts else "waits (timeout_s)")


def deadlines_in_force(policy: Policy) -> list[str]:
    """One line per routing rule with a slowness limit, for `policy check`."""
    lines = []
    for rule in policy.rules:
        if rule.route is None:
            continue
        paces = resolve(policy, rule, policy.chain(rule))
        if rule.hedge_after_s is None and all(p == NO_PACE or p == Pace(rate_window_s=p.rate_window_s)
                                              for _, p in paces):
            continue
        hedge = f"; hedge after {rule.hedge_after_s:g}s" if rule.hedge_after_s is not None and len(paces) > 1 else ""
        lines.append(f"{rule.name}: " + "; ".join(_describe(n, p) for n, p in paces) + hedge)
    return lines
