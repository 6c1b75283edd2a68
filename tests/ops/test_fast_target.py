"""`make test-fast` lints, type-checks and runs the tests not marked slow; `make test` (what CI runs)
runs all."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dry_run(target: str) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    # -n prints the recipe without running it; the stamp-file rule of `setup` is left out of it by -o.
    out = subprocess.run([make, "-n", "-o", "setup", "-o", "system-tools", target], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_fast_skips_slow_tests_and_full_runs_everything() -> None:
    fast, full = dry_run("test-fast"), dry_run("test")
    assert "ruff check" in fast and '-m "not slow"' in fast
    assert "bin/mypy" in fast and "bin/mypy" in full  # the type check gates both
    pytest_line = next(line for line in full.splitlines() if "-m pytest" in line)
    assert " -m " not in pytest_line.split("-m pytest", 1)[1]  # no marker expression: everything


def test_the_slow_marker_is_registered() -> None:
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)


def test_typecheck_runs_mypy_on_both_packages_whole() -> None:
    assert "bin/mypy" in dry_run("typecheck")
    files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    assert sorted(files) == ["gateway", "local_engine"]
