"""Soak: mixed streaming load through a real `hybrid-gateway serve` process, with periodic cloud outages.

    .venv/bin/python benchmarks/soak.py                      # 10 minutes (the default)
    .venv/bin/python benchmarks/soak.py --minutes 30 --threads 8

The cloud and local targets are fake loopback upstreams (tests/support/upstream.py) in this
process; the gateway runs as its own process so its RSS and open file descriptors are measured
alone. Every `--outage-every` seconds the cloud refuses connections for `--outage` seconds, then
answers 502 for half a second. Reports: requests by outcome (failed must be 0), RSS growth from
the end of warm-up to the end (target <= 10 %), open fds (flat), the slowest request. Exits 1
when a target is missed. The short CI variant is tests/chaos/test_soak_short.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gateway_process import free_port, wait_ready  # noqa: E402
from tests.chaos.harness import DEADLINE_S, soak, write_chaos_policy  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "soak.txt"


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS growth is counted")
    ap.add_argument("--outage-every", type=float, default=30.0)
    ap.add_argument("--outage", type=float, default=3.0)
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--max-growth", type=float, default=0.10)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--gateway-log", help="write the gateway's JSON log (level ERROR) here; default: discard")
    args = ap.parse_args()

    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1", "NO_PROXY": "*"}
    with FakeUpstream(model="cloud-model", name="cloud") as cloud, \
            FakeUpstream(model="local-model", name="local", reply=lambda b: "local answer " * 3) as local:
        # The fakes record every body by default; a soak must not grow the load generator.
        for up in (cloud, local):
            up.received = type("Sink", (list,), {"append": lambda self, x: None})()
            up.received_headers = type("Sink", (list,), {"append": lambda self, x: None})()
        tmp = Path(tempfile.mkdtemp(prefix="soak-"))
        policy = write_chaos_policy(tmp / "soak.yaml", cloud, local)
        port = free_port()
        proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "hybrid-gateway"), "serve", "--policy", str(policy),
                                 "--port", str(port), "--log-level", "ERROR", "--no-watch"],
                                env=env, stdout=subprocess.DEVNULL,
                                stderr=open(args.gateway_log, "w") if args.gateway_log else subprocess.DEVNULL)  # noqa: SIM115
        try:
            wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
            load_start = os.getloadavg()
            print(f"soak: gateway pid {proc.pid} on :{port}, {args.minutes} min, outage {args.outage} s "
                  f"every {args.outage_every} s, {args.threads} client threads", flush=True)
            report = soak(f"http://127.0.0.1:{port}", proc.pid, cloud, seconds=args.minutes * 60,
                          warmup_s=args.warmup, outage_every_s=args.outage_every, outage_s=args.outage,
                          sample_every_s=args.sample_every, threads=args.threads,
                          log=lambda s: print(s, flush=True))
        finally:
            proc.terminate()
            proc.wait(15)
    lines = report.lines()
    # The box is shared: the load says how much CPU the gateway and the clients really had.
    load_end = os.getloadavg()
    lines.append(f"soak: load average (1/5/15 min) at start {fmt_load(load_start)}, at end {fmt_load(load_end)}"
                 f" on {os.cpu_count()} CPUs")
    problems = []
    if report.tally["failed"]:
        problems.append(f"{report.tally['failed']} failed requests")
    if report.rss_growth > args.max_growth:
        problems.append(f"RSS grew {100 * report.rss_growth:.1f}% > {100 * args.max_growth:.0f}%")
    if report.fds_max > report.fds_start + 20:
        problems.append(f"open fds grew from {report.fds_start} to {report.fds_max}")
    if report.slowest_s > DEADLINE_S + 0.5:
        problems.append(f"a request took {report.slowest_s:.1f} s (deadline {DEADLINE_S} s)")
    lines.append("soak: " + ("OK" if not problems else "FAILED: " + "; ".join(problems)))
    print("\n".join(lines))
    if not args.no_save:
        RESULTS.write_text("\n".join(lines) + "\n")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
