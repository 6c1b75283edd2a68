"""Read a policy file: YAML with positions, `${VAR}` interpolation, validation, located errors.

Every problem is reported as `file:line:col: message`, like a compiler, so an editor or CI log
points at the offending line. Validation is pydantic's (gateway/policy/model.py); this module only
maps its error locations back to YAML positions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.policy.model import Policy, cross_check

Path_ = tuple[str | int, ...]
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class PolicyError(Exception):
    """A policy that cannot be used. `problems` holds every located error found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class _Positions:
    def __init__(self) -> None:
        self.at: dict[Path_, tuple[int, int]] = {}

    def node(self, loc: Path_) -> Path_:
        """The deepest existing node along `loc` (pydantic locs may add union tags)."""
        path: Path_ = ()
        for part in loc:
            for candidate in (part, str(part)):
                if (*path, candidate) in self.at:
                    path = (*path, candidate)
                    break
        return path

    def locate(self, loc: Path_) -> tuple[int, int]:
        """Position of the deepest existing node along `loc`."""
        return self.at.get(self.node(loc), (1, 1))


@dataclass(frozen=True)
class Retyped:
    """A plain (unquoted) YAML scalar that YAML 1.1 read as something other than the text written:
    `no` -> False, `012` -> 10, `1.10` -> 1.1, `~` -> None."""

    path: Path_
    text: str
    value: Any
    is_key: bool

    @property
    def changed(self) -> bool:
        """Whether turning the value back into a string loses what was written (`on` -> 'True')."""
        return str(self.value) != self.text

    def hint(self) -> str:
        if isinstance(self.value, bool):
            read = "a boolean"
        elif self.value is None:
            read = "null"
        elif isinstance(self.value, int):
            read = "an integer" if str(self.value) == self.text else f"an integer ({self.value})"
        else:
            read = "a number" if str(self.value) == self.text else f"a number ({self.value})"
        return f'YAML read `{self.text}` as {read}; quote it: "{self.text}"'


@dataclass(frozen=True)
class PolicySource:
    """Where the parts of a loaded policy sit in its file, for messages about them (the lint's)."""

    file: str
    positions: _Positions
    retyped: tuple[Retyped, ...]

    def locate(self, loc: str | Path_) -> tuple[int, int]:
        """(line, col) of a dotted location (`rules.2.route`) or a path tuple."""
        return self.positions.locate(_dotted(loc) if isinstance(loc, str) else loc)


def _interpolate(value: str, env: Mapping[str, str], where: Path_, missing: list[tuple[Path_, str]]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        if name in env:
            return ""
        missing.append((where, f"environment variable {name} is not set (write ${{{name}:-default}})"))
        return ""

    return _ENV.sub(sub, value)


def _retyped(node: yaml.Node, value: Any, path: Path_, is_key: bool, retyped: list[Retyped]) -> None:
    # Only plain scalars: a quoted `"no"` or an explicit `!!bool` tag says what the author meant.
    if isinstance(node, yaml.ScalarNode) and node.style is None and not isinstance(value, str):
        retyped.append(Retyped(path, node.value, value, is_key))


def _build(
    node: yaml.Node,
    path: Path_,
    pos: _Positions,
    loader: yaml.SafeLoader,
    env: Mapping[str, str],
    problems: list[tuple[Path_, str]],
    retyped: list[Retyped],
) -> Any:
    pos.at[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) or key is None:
                pos.at[(*path, "?")] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                problems.append(((*path, "?"), "mapping keys must be plain scalars"))
                continue
            _retyped(key_node, key, (*path, str(key)), True, retyped)
            key = str(key)
            if key in out:
                pos.at[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                problems.append(((*path, key), f"duplicate key {key!r}"))
                continue
            out[key] = _build(value_node, (*path, key), pos, loader, env, problems, retyped)
            # Point errors about a key at the key itself, not at its value.
            pos.at[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(n, (*path, i), pos, loader, env, problems, retyped) for i, n in enumerate(node.value)]
    value = loader.construct_object(node, deep=True)
    _retyped(node, value, path, False, retyped)
    if isinstance(value, str):
        value = _interpolate(value, env, path, problems)
    return value


def _wanted_string(err: Any) -> bool:
    """Whether a validation error says a string was expected (so quoting the scalar fixes it)."""
    kind = err["type"]
    if kind == "literal_error":
        return "'" in str(err.get("ctx", {}).get("expected", ""))
    # value_error: the level checks (`sensitivity: no`), which expect a level name.
    return kind in ("string_type", "enum", "value_error")


def _dotted(loc: str) -> Path_:
    return tuple(int(p) if p.isdigit() else p for p in loc.split("."))


def parse_policy(text: str, file: str = "<policy>", env: Mapping[str, str] | None = None) -> Policy:
    """Parse and validate policy text. Raises PolicyError with every located problem."""
    return parse_policy_source(text, file, env)[0]


def parse_policy_source(
    text: str, file: str = "<policy>", env: Mapping[str, str] | None = None
) -> tuple[Policy, PolicySource]:
    """`parse_policy`, also returning where each part sits in the text (for the lint)."""
    env = os.environ if env is None else env
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise PolicyError([Problem(file, line, col, f"invalid YAML: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([Problem(file, 1, 1, f"invalid YAML: {exc}")]) from None
    if root is None:
        raise PolicyError([Problem(file, 1, 1, "the policy is empty")])

    pos = _Positions()
    found: list[tuple[Path_, str]] = []
    retyped: list[Retyped] = []
    data = _build(root, (), pos, yaml.SafeLoader(""), env, found, retyped)
    scalar_at = {r.path: r for r in retyped if not r.is_key}
    problems = [Problem(file, *pos.locate(p), msg) for p, msg in found]
    if problems:
        raise PolicyError(problems)
    if not isinstance(data, dict):
        raise PolicyError([Problem(file, *pos.locate(()), "the policy must be a mapping")])

    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key {loc[-1]!r}"
            elif err["type"] == "missing":
                msg = f"missing required key {loc[-1]!r}"
            # Drop pydantic's union tags (targets.local.local.x -> targets.local.x).
            parts = [str(p) for i, p in enumerate(loc) if not (i >= 2 and loc[i - 2] == "targets" and p in ("cloud", "local"))]
            field = ".".join(parts)
            scalar = scalar_at.get(pos.node(loc))
            if scalar is not None and not isinstance(err["input"], str) and _wanted_string(err):
                msg = f"{msg} ({scalar.hint()})"
            problems.append(Problem(file, *pos.locate(loc), f"{field}: {msg}" if field else msg))
        raise PolicyError(_dedupe(problems)) from None

    for where, msg in cross_check(policy):
        problems.append(Problem(file, *pos.locate(_dotted(where)), msg))
    if problems:
        raise PolicyError(problems)
    return policy, PolicySource(file, pos, tuple(retyped))


def load_policy(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Policy:
    return load_policy_source(path, env)[0]


def load_policy_source(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> tuple[Policy, PolicySource]:
    """`load_policy`, also returning where each part sits in the file (for the lint)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError([Problem(str(p), 1, 1, "policy file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([Problem(str(p), 1, 1, f"cannot read policy: {exc}")]) from None
    return parse_policy_source(text, str(p), env)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return out
