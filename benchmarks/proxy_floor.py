"""What any Python proxy on this stack pays: Hybrid Gateway against a bare uvicorn + aiohttp proxy.

    flock /tmp/bench.lock .venv/bin/python benchmarks/proxy_floor.py     # ~2 minutes

The bare proxy (this file, `--serve`) reads the request, forwards it to the same loopback fake
upstream with aiohttp and relays the answer (one write per SSE event, as uvicorn does by default;
the gateway joins the writes of one loop turn, see gateway/http_protocol.py), with no policy,
classification, retries, metrics or audit. Paths alternate, c=1. Printed per path and
mode: added p50 latency versus direct, and CPU per request of the proxy process (/proc): the
latter is what our own pipeline costs above the floor, and is steadier than latency on a shared
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_overhead as go


def serve(upstream_port: int, port: int) -> None:
    import aiohttp
    import orjson
    import uvicorn

    url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    session: dict[str, aiohttp.ClientSession] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] != "POST":  # readiness probe
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        req = orjson.loads(body)
        req["model"] = "fake-model"
        client = session.setdefault("s", aiohttp.ClientSession())
        async with client.post(url, data=orjson.dumps(req), headers={"content-type": "application/json"}) as r:
            if not req.get("stream"):
                data = await r.read()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": data})
                return
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            async for line in r.content:
                if line.strip():
                    await send({"type": "http.response.body", "body": line + b"\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="error",
                access_log=False)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", nargs=2, type=int, metavar=("UPSTREAM_PORT", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    tmp = Path(tempfile.mkdtemp())
    up_port = go.free_port()
    procs: list[subprocess.Popen] = [go.start_upstream(up_port)]
    try:
        gw = go.start_gateway("hg-off", up_port, go.CLASSIFY_OFF, tmp)
        procs.append(gw.proc)
        port = go.free_port()
        bare = subprocess.Popen([sys.executable, __file__, "--serve", str(up_port), str(port)], env=go.ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(bare)
        go.wait_http(f"http://127.0.0.1:{port}/", bare, timeout=60)
        floor = go.Server("bare proxy", bare, f"http://127.0.0.1:{port}", model="fake-model")
        added: dict[tuple[str, bool], list[float]] = {}
        cpu: dict[tuple[str, bool], list[float]] = {}
        for rnd in range(args.rounds):
            for stream in (False, True):
                direct = asyncio.run(go.measure(f"http://127.0.0.1:{up_port}", "fake-model", {}, 1, stream=stream,
                                                requests=600, seconds=5))
                for srv in (gw, floor) if rnd % 2 == 0 else (floor, gw):
                    c0 = cpu_seconds(srv.proc.pid)
                    s = asyncio.run(go.measure(srv.url, srv.model, srv.headers, 1, stream=stream, requests=800,
                                               seconds=6))
                    c1 = cpu_seconds(srv.proc.pid)
                    added.setdefault((srv.name, stream), []).append(s.pct(0.5) - direct.pct(0.5))
                    cpu.setdefault((srv.name, stream), []).append((c1 - c0) * 1000 / max(1, len(s.latencies)))
        print(f"proxy floor, c=1, {args.rounds} alternating rounds; load average {os.getloadavg()[0]:.1f} at the end")
        print(f"{'path':<12} {'mode':<7} {'added p50 ms (median of rounds)':>32} {'CPU ms / request':>18}")
        for (name, stream), xs in sorted(added.items()):
            print(f"{name:<12} {'stream' if stream else 'plain':<7} {statistics.median(xs):>32.2f} "
                  f"{statistics.median(cpu[(name, stream)]):>18.2f}")
    finally:
        for p in procs:
            p.terminate()
        time.sleep(0.2)


if __name__ == "__main__":
    main()
