"""Warnings about policies that load but are dangerous or broken: `hybrid-gateway policy check`.

`lint(policy, source)` is a pure function of the validated policy and where its parts sit in the
file (`gateway.policy.load.PolicySource`); the one check that needs the disk, whether a local
engine's model file opens, goes through the `probe` callable (default: `probe_model_path`).

Reasoning about which requests a rule can see is done over *cells*: every combination of the
values of the `when` keys that have finitely many values (connectivity, sensitivity, difficulty,
booleans such as has_tools), read from the policy model at run time so a new key or value is
covered without a change here. Keys with unbounded values (model and client globs, headers,
prompt_tokens) are compared by implication only: an earlier rule shadows a later one on them
when the later rule's condition implies the earlier one's (the same glob, a narrower bound).
"""

from __future__ import annotations

import itertools
import json
import struct
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from gateway.features import DIFFICULTY_LEVELS, SENSITIVITY_LEVELS
from gateway.policy.load import PolicySource, Problem
from gateway.policy.model import AtLeast, Bound, Policy, When
from gateway.policy.pace import resolve
from gateway.policy.targets import LocalTarget

# The one connectivity state in which a cloud target can answer; every other value the model
# allows (offline, disabled, ...) means no cloud call can succeed.
ONLINE = "online"
HIGH = "high"

_LEVELS: dict[str, tuple[str, ...]] = {"sensitivity": SENSITIVITY_LEVELS, "difficulty": DIFFICULTY_LEVELS}
Cell = Mapping[str, Any]


@dataclass(frozen=True)
class LintWarning(Problem):
    """A policy that loads but likely does not do what was meant: where, and why."""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: warning: {self.message}"


Probe = Callable[[str], str | None]


# ------------------------------------------------------------------------------ when-key domains


def _literal_values(annotation: Any) -> tuple[Any, ...] | None:
    """Every value a key can take when its type is built from Literals and bools (through unions
    and lists); None when some part is open-ended (str, int, a model)."""
    if annotation is bool:
        return (True, False)
    if annotation is type(None):
        return ()
    origin = get_origin(annotation)
    if origin is Literal:
        return get_args(annotation)
    if origin in (Union, types.UnionType, list):
        out: list[Any] = []
        for arg in get_args(annotation):
            vals = _literal_values(arg)
            if vals is None:
                return None
            out.extend(v for v in vals if v not in out)
        return tuple(out)
    return None


def _domains() -> dict[str, tuple[Any, ...]]:
    """The `when` keys with finitely many values, and those values."""
    out: dict[str, tuple[Any, ...]] = {}
    for name, info in When.model_fields.items():
        values = _LEVELS.get(name) or _literal_values(info.annotation)
        if values:
            out[name] = tuple(values)
    return out


def _admits(key: str, cond: Any, value: Any) -> bool:
    """Whether a finite-domain condition holds for `value`."""
    if cond is None:
        return True
    if key in _LEVELS:
        levels = _LEVELS[key]
        if isinstance(cond, AtLeast):
            return levels.index(value) >= levels.index(cond.at_least)
        return value == cond
    if isinstance(cond, list):
        return value in cond
    return value == cond


def _implies(key: str, narrow: Any, wide: Any) -> bool:
    """Whether every request meeting `narrow` on an open-ended key meets `wide` (None = no condition)."""
    if wide is None:
        return True
    if key == "model" and wide == "*":  # every request names a model; a client may be anonymous
        return True
    if narrow is None:
        return False
    if isinstance(wide, Bound) and isinstance(narrow, Bound):
        return (wide.gt is None or (narrow.gt is not None and narrow.gt >= wide.gt)) and (
            wide.lt is None or (narrow.lt is not None and narrow.lt <= wide.lt)
        )
    if isinstance(wide, dict) and isinstance(narrow, dict):
        have = {k.lower(): v for k, v in narrow.items()}
        return all(have.get(k.lower()) == v for k, v in wide.items())
    return narrow == wide


def _open_keys(when: When, domains: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in when if k not in domains}


def _cells(domains: Mapping[str, tuple[Any, ...]], when: When | None, fixed: Mapping[str, Any]) -> Iterator[Cell]:
    """Every cell `when` admits (all cells when None), with the keys in `fixed` pinned to one value."""
    keys = list(domains)
    conds = dict(when) if when is not None else None
    choices = []
    for k in keys:
        if k in fixed:
            values: Iterable[Any] = [fixed[k]] if fixed[k] in domains[k] else []
        else:
            values = domains[k]
        choices.append([v for v in values if conds is None or _admits(k, conds[k], v)])
    for combo in itertools.product(*choices):
        yield dict(zip(keys, combo, strict=True))


def _cell_matches(when: When, cell: Cell) -> bool:
    conds = dict(when)
    return all(_admits(k, conds[k], v) for k, v in cell.items())


def _reachable_cells(policy: Policy, index: int, domains: Mapping[str, tuple[Any, ...]],
                     fixed: Mapping[str, Any]) -> list[Cell]:
    """Cells of rule `index` that no earlier rule takes first (for every request of the cell)."""
    rule = policy.rules[index]
    mine = _open_keys(rule.when, domains)
    shadows = [
        r.when for r in policy.rules[:index]
        if all(_implies(k, mine[k], v) for k, v in _open_keys(r.when, domains).items())
    ]
    return [c for c in _cells(domains, rule.when, fixed) if not any(_cell_matches(w, c) for w in shadows)]


def _describe(cell: Cell) -> str:
    return ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in cell.items())


def _widest(cell: Cell, domains: Mapping[str, tuple[Any, ...]], holds: Callable[[Cell], bool]) -> Cell:
    """The fewest keys of `cell` that still describe only cells where `holds` is true (for messages:
    "connectivity: disabled" rather than one value for every key)."""
    kept = dict(cell)
    for key in list(cell):
        rest = {k: v for k, v in kept.items() if k != key}
        if all(holds(c) for c in _cells(domains, None, rest)):
            kept = rest
    return kept


# ------------------------------------------------------------------------------ the checks


def _high_to_cloud(policy: Policy, source: PolicySource, domains: Mapping[str, tuple[Any, ...]]
                   ) -> Iterator[LintWarning]:
    if not policy.privacy.enabled:  # no scanning: every request is level none
        return
    clouds = policy.cloud_targets
    if not clouds:
        return
    fixed = {"sensitivity": HIGH, **({"connectivity": ONLINE} if "connectivity" in domains else {})}
    for i, rule in enumerate(policy.rules):
        if rule.block is not None or rule.redact:
            continue
        chain = policy.chain(rule)
        via = [(t, "its route" if t == rule.route else "its fallback chain") for t in chain if t in clouds]
        if rule.pin_allowed:
            via += [(t, f"a request naming it (model: {t}; allow_pin)") for t in clouds if t not in chain]
        if not via:
            continue
        if not _reachable_cells(policy, i, domains, fixed):
            continue
        where = "route" if via[0][1] == "its route" else "fallback" if rule.fallback else "name"
        targets = "; ".join(f"{t!r} through {how}" for t, how in via)
        yield _warn(source, f"rules.{i}.{where}",
                    f"rule {rule.name!r} can send sensitivity: high requests to cloud "
                    f"target {targets}, without redaction: add `redact: true`, or route high sensitivity to a "
                    f"local target in an earlier rule")


def _offline_to_cloud(policy: Policy, source: PolicySource, domains: Mapping[str, tuple[Any, ...]]
                      ) -> Iterator[LintWarning]:
    states = domains.get("connectivity", ())
    for i, rule in enumerate(policy.rules):
        if rule.route is None or not policy.is_cloud(rule.route) or rule.when.connectivity is None:
            continue
        admitted = [s for s in states if _admits("connectivity", rule.when.connectivity, s)]
        if admitted and ONLINE not in admitted:
            yield _warn(source, f"rules.{i}.route",
                        f"rule {rule.name!r} only matches when connectivity is {' or '.join(admitted)} but routes "
                        f"to cloud target {rule.route!r}, which cannot answer then: route it to a local target")


def _no_catch_all(policy: Policy, source: PolicySource, domains: Mapping[str, tuple[Any, ...]]
                  ) -> Iterator[LintWarning]:
    # Rules with a condition on an open-ended key (model, client, header...) leave some requests out.
    total = [r.when for r in policy.rules if all(v is None for v in _open_keys(r.when, domains).values())]
    def unmatched(cell: Cell) -> bool:
        return not any(_cell_matches(w, cell) for w in total)

    for cell in _cells(domains, None, {}):
        if unmatched(cell):
            example = _describe(_widest(cell, domains, unmatched))
            yield _warn(source, "rules",
                        f"no catch-all rule: a request no rule matches{f' ({example})' if example else ''} gets 403; "
                        f"end the rules with one without `when`")
            return


def _hedge_never_fires(policy: Policy, source: PolicySource) -> Iterator[LintWarning]:
    """A hedge due no sooner than the route's first-token deadline never starts: by then the route
    has already been abandoned, and the next target is called as a plain fallback."""
    for i, rule in enumerate(policy.rules):
        chain = policy.chain(rule) if rule.route is not None else ()
        if rule.hedge_after_s is None or len(chain) < 2:
            continue
        route, pace = resolve(policy, rule, chain)[0]
        if pace.first_token_s is not None and rule.hedge_after_s >= pace.first_token_s:
            where = "the rule's" if rule.first_token_timeout_s is not None else "the target's"
            yield _warn(source, f"rules.{i}.hedge_after_s",
                        f"rule {rule.name!r}: hedge_after_s {rule.hedge_after_s:g}s is not below the first-token "
                        f"deadline of its route {route!r} ({pace.first_token_s:g}s, {where} "
                        f"first_token_timeout_s): the route is given up before the hedge is due, so the hedge "
                        f"never fires; lower hedge_after_s")


def _local_tools_always_refused(policy: Policy, source: PolicySource, domains: Mapping[str, tuple[Any, ...]]
                                ) -> Iterator[LintWarning]:
    """`local_tools: refuse` on a rule no cloud target can answer for: every request with tools or a
    response_format it matches is refused (probably meant for a rule with a cloud route)."""
    states = domains.get("connectivity", ())
    for i, rule in enumerate(policy.rules):
        if rule.route is None or policy.local_tools(rule) != "refuse":
            continue
        chain = policy.chain(rule)
        clouds = [t for t in chain if policy.is_cloud(t)]
        admitted = [s for s in states if rule.when.connectivity is None or _admits("connectivity", rule.when.connectivity, s)]
        if clouds and ONLINE in admitted:
            continue
        why = (f"it only matches when connectivity is {' or '.join(admitted)}" if clouds
               else f"its chain ({', '.join(chain)}) has no cloud target")
        where = f"rules.{i}.local_tools" if rule.local_tools is not None else "defaults.local_tools"
        yield _warn(source, where,
                    f"rule {rule.name!r} refuses requests with tools or a response_format on local targets "
                    f"(local_tools: refuse), but {why}: every such request it matches is refused; set "
                    f"`local_tools: honour` on it to answer them on the device")


def _budgets(policy: Policy, source: PolicySource) -> Iterator[LintWarning]:
    """Budgets that can never run out (nothing is priced) and budget rules nobody can reach."""
    budgeted = [i for i, c in enumerate(policy.clients or ()) if c.budget is not None]
    priced = [t for t in policy.targets if policy.prices(t) is not None]
    if budgeted and not priced:
        yield _warn(source, f"clients.{budgeted[0]}.budget",
                    "clients have a budget but no target has `prices`: nothing is ever charged, so no budget is "
                    "ever exceeded; give the cloud targets their prices (USD per 1M input/output tokens)")
    for i, rule in enumerate(policy.rules):
        if rule.when.budget == "exceeded" and not budgeted:
            yield _warn(source, f"rules.{i}.when.budget",
                        f"rule {rule.name!r} matches clients over budget, but no client has a `budget`: it never "
                        f"matches")


def _models(policy: Policy, source: PolicySource, probe: Probe) -> Iterator[LintWarning]:
    for name, target in policy.targets.items():
        if isinstance(target, LocalTarget) and target.engine and target.model_path:
            problem = probe(target.model_path)
            if problem:
                yield _warn(source, f"targets.{name}.model_path",
                            f"target {name!r}: model_path {target.model_path!r} will not load: {problem}")


def _retyped_keys(source: PolicySource) -> Iterator[LintWarning]:
    for r in source.retyped:
        if r.is_key and r.changed:
            line, col = source.locate(r.path)
            yield LintWarning(source.file, line, col, f"key became {str(r.value)!r}: {r.hint()}")


def _warn(source: PolicySource, loc: str, message: str) -> LintWarning:
    line, col = source.locate(loc)
    return LintWarning(source.file, line, col, message)


def lint(policy: Policy, source: PolicySource, probe: Probe | None = None) -> list[LintWarning]:
    """Every warning for a valid policy, in file order."""
    domains = _domains()
    found = [
        *_retyped_keys(source),
        *_high_to_cloud(policy, source, domains),
        *_offline_to_cloud(policy, source, domains),
        *_no_catch_all(policy, source, domains),
        *_hedge_never_fires(policy, source),
        *_local_tools_always_refused(policy, source, domains),
        *_budgets(policy, source),
        *_models(policy, source, probe or probe_model_path),
    ]
    return sorted(found, key=lambda w: (w.line, w.col))


# ------------------------------------------------------------------------------ model files


def probe_model_path(model_path: str) -> str | None:
    """Why the engine could not open `model_path`, or None. Cheap: headers only, never the weights."""
    from local_engine.engine import resolve
    from local_engine.errors import EngineError

    try:
        path = resolve(model_path)
        if not path.exists():
            return f"{path} does not exist"
        if path.is_file():
            return _probe_gguf(path)
        if (path / "manifest.json").is_file():
            from local_engine.formats.pack import read_manifest

            read_manifest(path)
            return _needs_tokenizer(path)
        if (path / "config.json").is_file():
            return _probe_hf_dir(path)
        return f"{path} is neither a GGUF file nor a model directory (config.json or a packed manifest.json)"
    except EngineError as e:
        return str(e)
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"


def _probe_gguf(path: Path) -> str | None:
    from local_engine.formats.gguf import GGUFFile

    GGUFFile(path)  # metadata and tensor directory; the weights stay unread in the map
    return None


def _needs_tokenizer(path: Path) -> str | None:
    return None if (path / "tokenizer.json").is_file() else f"{path}: no tokenizer.json (the engine needs one to chat)"


def _probe_hf_dir(path: Path) -> str | None:
    json.loads((path / "config.json").read_text())
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        return f"{path}: no *.safetensors files"
    for shard in shards:
        with open(shard, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{shard}: truncated safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2**20:
                return f"{shard}: implausible safetensors header length {n}"
            json.loads(f.read(n))
    return _needs_tokenizer(path)
