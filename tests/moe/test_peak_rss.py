"""The engine's peak RSS is the process's own, not one inherited from the process that started it."""

from __future__ import annotations

import subprocess
import sys

from local_engine.expert_store import peak_rss_bytes

MiB = 2**20


def test_a_child_does_not_report_its_parents_peak() -> None:
    held = bytearray(768 * MiB)
    held[::4096] = b"\1" * len(range(0, len(held), 4096))  # touch every page: resident in this process
    assert peak_rss_bytes() >= 768 * MiB
    code = ("import resource; from local_engine.expert_store import peak_rss_bytes; "
            "print(peak_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    del held
    own, maxrss = int(out[0]), int(out[1])
    print(f"child: own peak {own / MiB:.0f} MiB, ru_maxrss {maxrss / MiB:.0f} MiB (parent held 768 MiB)")
    assert 0 < own < 500 * MiB  # python + torch import, without the parent's 768 MiB
