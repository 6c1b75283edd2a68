"""The YAML text of a test policy: the targets every gateway test runs against, plus its own sections.

Most tests point the gateway at two fake upstreams, a `cloud` and a `local` one, whose name, kind,
model and key never change from test to test; only their timeouts, retries and the like do. Those
fixed lines are written here once, so a test states only what is particular to it: the settings of
each target and the rest of its policy (connectivity, limits, rules...) as plain YAML.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

# One target's settings as YAML scalars (numbers, strings, booleans), in the order they are written.
Settings = Mapping[str, str | int | float | bool]


class Served(Protocol):
    """A fake upstream (tests/support/upstream.py and its kin): where it listens."""

    @property
    def base_url(self) -> str: ...


# The head of most test policies' rules: everything falls back to `local`, and offline stays there.
OFFLINE_LOCAL = """defaults:
  fallback: [local]
rules:
  - name: offline
    when: { connectivity: offline }
    route: local
"""


def policy_yaml(
    cloud_url: str,
    local_url: str,
    *,
    cloud: Settings,
    local: Settings,
    rest: str,
    more_targets: Mapping[str, Settings] | None = None,
) -> str:
    """`version: 1`, the targets `cloud` and `local` (with `cloud` and `local` added to their fixed
    keys), any `more_targets` written out in full, then `rest`: the test's other sections, as YAML
    text at the top level (dedented here, so it may be an indented string)."""
    targets = {
        "cloud": {"kind": "cloud", "model": "openai/cloud-model", "api_base": cloud_url,
                  "api_key": "sk-test-cloud", **cloud},
        "local": {"kind": "local", "model": "openai/local-model", "api_base": local_url, **local},
    }
    # After the two fixed ones, so a reader of the file finds them where every test puts them.
    targets.update(more_targets or {})
    lines = ["version: 1", "targets:"]
    for name, settings in targets.items():
        lines.append(f"  {name}:")
        lines += [f"    {key}: {_scalar(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n" + textwrap.dedent(rest).lstrip("\n")


def _scalar(value: str | int | float | bool) -> str:
    # Python would write True; YAML wants true. Everything else used here reads back as written.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def write_policy(
    path: Path,
    cloud: Served,
    local: Served,
    rest: str,
    *,
    cloud_settings: Settings | None = None,
    local_settings: Settings | None = None,
    more_targets: Mapping[str, Settings] | None = None,
) -> Path:
    """Write the policy of `policy_yaml` for the upstreams `cloud` and `local` to `path` and return
    it. Each target's settings default to a 5 s timeout; a test passes its own to change them
    (`cloud_settings={"api_key": ...}` replaces the fixed key too)."""
    path.write_text(policy_yaml(
        cloud.base_url, local.base_url,
        cloud={"timeout_s": 5} if cloud_settings is None else cloud_settings,
        local={"timeout_s": 5} if local_settings is None else local_settings,
        more_targets=more_targets, rest=rest,
    ))
    return path
