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

    def locate(self, loc: Path_) -> tuple[int, int]:
        """Position of the deepest existing node along `loc` (pydantic locs may add union tags)."""
        best = self.at.get((), (1, 1))
        path: Path_ = ()
        for part in loc:
            for candidate in (part, str(part)):
                if (*path, candidate) in self.at:
                    path = (*path, candidate)
                    best = self.at[path]
                    break
        return best


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


def _build(
    node: yaml.Node,
    path: Path_,
    pos: _Positions,
    loader: yaml.SafeLoader,
    env: Mapping[str, str],
    problems: list[tuple[Path_, str]],
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
            key = str(key)
            if key in out:
                pos.at[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                problems.append(((*path, key), f"duplicate key {key!r}"))
                continue
            out[key] = _build(value_node, (*path, key), pos, loader, env, problems)
            # Point errors about a key at the key itself, not at its value.
            pos.at[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(n, (*path, i), pos, loader, env, problems) for i, n in enumerate(node.value)]
    value = loader.construct_object(node, deep=True)
    if isinstance(value, str):
        value = _interpolate(value, env, path, problems)
    return value


def _dotted(loc: str) -> Path_:
    return tuple(int(p) if p.isdigit() else p for p in loc.split("."))


def parse_policy(text: str, file: str = "<policy>", env: Mapping[str, str] | None = None) -> Policy:
    """Parse and validate policy text. Raises PolicyError with every located problem."""
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
    data = _build(root, (), pos, yaml.SafeLoader(""), env, found)
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
            problems.append(Problem(file, *pos.locate(loc), f"{field}: {msg}" if field else msg))
        raise PolicyError(_dedupe(problems)) from None

    for loc, msg in cross_check(policy):
        problems.append(Problem(file, *pos.locate(_dotted(loc)), msg))
    if problems:
        raise PolicyError(problems)
    return policy


def load_policy(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Policy:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError([Problem(str(p), 1, 1, "policy file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([Problem(str(p), 1, 1, f"cannot read policy: {exc}")]) from None
    return parse_policy(text, str(p), env)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for p in problems:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return out
