"""`make system-tools` (run by `make test`) says what it is about to install system-wide and how to opt out.

Runs the real target with a PATH holding only fakes: `id` says root, `apt-get` records its
arguments, and there is no Chromium or docker, so the install branch is taken without touching
the system.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_system_tools(makefile: Path, tmp_path: Path, **env: str) -> tuple[str, str]:
    """(stdout, apt-get calls) of `make -s system-tools` as a fake root with only apt-get around."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "apt-calls"
    (fake / "id").write_text("#!/bin/sh\necho 0\n")
    (fake / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    for tool in ("id", "apt-get"):
        (fake / tool).chmod(0o755)
    os.symlink(shutil.which("ls") or "/bin/ls", fake / "ls")
    out = subprocess.run([make, "-s", "-f", str(makefile), "system-tools"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=30, env={"PATH": str(fake), **env})
    assert out.returncode == 0, out.stderr
    return out.stdout, calls.read_text() if calls.exists() else ""


def test_announces_the_install_and_the_opt_out(tmp_path: Path) -> None:
    stdout, calls = run_system_tools(ROOT / "Makefile", tmp_path)
    # docker is never on the fake PATH; Chromium may be installed under /usr/lib on this machine.
    installed = calls.split()[calls.split().index("--no-install-recommends") + 1:]
    assert calls.startswith("install ") and "docker-compose" in installed
    first = stdout.splitlines()[0]
    assert "apt-get" in first and "system-wide" in first
    assert all(tool in first for tool in installed), (installed, first)
    assert "SYSTEM_TOOLS=skip make test" in first


def test_opt_out_installs_nothing(tmp_path: Path) -> None:
    stdout, calls = run_system_tools(ROOT / "Makefile", tmp_path, SYSTEM_TOOLS="skip")
    assert calls == ""
    assert "SYSTEM_TOOLS=skip" in stdout
