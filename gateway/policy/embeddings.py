"""Which targets may answer an embeddings request: a pure function of (decision, policy, request).

An embeddings request is classified and decided like a chat request (its inputs are the messages),
then the rule's chain is narrowed to what can serve it without corrupting the caller's index:

1. targets that embed (`embeddings` on the target; the local engine embeds with MiniLM);
2. privacy: an embedding input is never redacted, because the vector of a redacted text is the
   vector of its placeholders, silently wrong. Where the rule says `redact` and the input holds
   something to redact, cloud targets are dropped: the input stays on the device or is refused;
3. vector space: only targets of the space the request asked for (its `model`, or with `auto` the
   space of the first embedding target of the rule's chain), unless the rule says
   `allow_space_change: true` (then other spaces come after, and the answer names its model);
4. `dimensions`: only targets that can make vectors of that size.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.policy.evaluate import Decision
from gateway.policy.model import Policy
from gateway.policy.targets import Embeddings
from gateway.schema import APIError


@dataclass(frozen=True)
class Requested:
    """What the request's `model` asks for: the name routing sees, and the space it names."""

    model: str  # a target, an alias or `auto`: what pipeline.prepare resolves
    space: str | None  # None: the policy's choice (the rule's first embedding target)


@dataclass(frozen=True)
class EmbeddingPlan:
    chain: tuple[str, ...]
    space: str  # the space asked for; a target of another space answers only where the rule allows
    notes: tuple[str, ...] = ()


def spaces(policy: Policy) -> dict[str, str]:
    """Every name a request may use for an embedding space -> the space: the space itself, its
    models with and without their provider prefix."""
    names: dict[str, str] = {}
    for target in policy.targets:
        emb = policy.embeddings_of(target)
        if emb is not None:
            for name in (emb.space_name, emb.model, emb.model.rsplit("/", 1)[-1].removeprefix("builtin:")):
                names.setdefault(name, emb.space_name)
    return names


def requested(policy: Policy, model: str) -> Requested:
    if model == "auto":
        return Requested(model, None)
    target = policy.aliases.get(model, model)
    if target == "auto":
        return Requested(model, None)
    if target in policy.targets:
        emb = policy.embeddings_of(target)
        if emb is None:
            raise APIError(400, f"The target `{target}` does not serve embeddings.", param="model",
                           code="model_not_supported")
        return Requested(model, emb.space_name)
    space = spaces(policy).get(model)
    if space is None:
        known = ", ".join(sorted(set(spaces(policy).values()))) or "none"
        raise APIError(404, f"The embedding model `{model[:100]}` is not served here. Use `auto` or one of: {known}.",
                       param="model", code="model_not_found")
    return Requested("auto", space)


def _makes(emb: Embeddings, dimensions: int | None) -> bool:
    if dimensions is None or dimensions == emb.dimensions:
        return True
    return emb.shortens and (emb.dimensions is None or dimensions <= emb.dimensions)


def plan(policy: Policy, decision: Decision, want: Requested, *, would_redact: bool,
         dimensions: int | None) -> EmbeddingPlan:
    """The chain an embeddings request is dispatched along. `would_redact`: the rule redacts and
    the input holds something it would replace. Raises APIError when nothing may answer."""
    embeds = {t: e for t in decision.chain if (e := policy.embeddings_of(t)) is not None}
    if not embeds:
        raise APIError(400, f"No target of rule `{decision.rule}` ({', '.join(decision.chain)}) serves embeddings "
                       "(a target's `embeddings` in the policy).", param="model", code="model_not_supported")
    space = want.space or next(iter(embeds.values())).space_name
    notes: list[str] = []
    chain = list(embeds)
    rule = next(r for r in policy.rules if r.name == decision.rule)
    if would_redact:
        chain = [t for t in chain if not policy.is_cloud(t)]
        notes.append("embedding input holds data the rule redacts: kept on the device (not redacted, "
                     "a redacted input would embed the placeholders)")
        if not chain or not (rule.allow_space_change or any(embeds[t].space_name == space for t in chain)):
            raise APIError(403, f"This input holds personal data that rule `{decision.rule}` redacts, and no "
                           f"device target of its chain embeds in the space `{space}`: an embedding input is "
                           "never redacted, so it is refused.", type_="permission_error",
                           code="sensitive_embedding_refused")
    same = [t for t in chain if embeds[t].space_name == space]
    if rule.allow_space_change:
        others = [t for t in chain if t not in same]
        if others:
            notes.append(f"rule allows another embedding space than {space}: " + ", ".join(others))
        chain = same + others
    else:
        chain = same
    if not chain:
        raise APIError(503, f"No target of rule `{decision.rule}` can embed in the space `{space}` now, and the "
                       "rule does not allow another space (allow_space_change): vectors of two spaces must "
                       "not meet in one index.", code="embedding_space_unavailable")
    sized = [t for t in chain if _makes(embeds[t], dimensions)]
    if not sized:
        first = embeds[chain[0]]
        native = f"{first.dimensions}-dimensional vectors only" if first.dimensions else "its native size only"
        raise APIError(400, f"`dimensions` is not supported here: {first.model} makes {native}.",
                       param="dimensions", code="dimensions_not_supported")
    return EmbeddingPlan(chain=tuple(sized), space=space, notes=tuple(notes))
