"""Gateway overhead and throughput against LiteLLM proxy, in one run, paths in alternation.

    .venv/bin/python benchmarks/gateway_overhead.py            # ~8 minutes
    .venv/bin/python benchmarks/gateway_overhead.py --quick    # ~1 minute, fewer samples
    .venv/bin/python benchmarks/gateway_overhead.py --endpoints  # ~1 minute: chat vs the other endpoints only
    .venv/bin/python benchmarks/gateway_overhead.py --state      # ~2 minutes: embedded vs Redis state (+ 2 replicas)
    .venv/bin/python benchmarks/gateway_overhead.py --difficulty # ~1 minute: difficulty scoring on vs off only

Every request carries a distinct ~1 KB prompt (a counter at its end), so classifier caches miss.

Paths, all to the same Nagle-free loopback fake upstream (tests/support/upstream.py, run in its
own process so it does not share a GIL with the load generator), fixed small answer:

  direct        client -> upstream (the baseline, measured in the same run)
  hg-off        client -> `hybrid-gateway serve` -> upstream, classification off
                (privacy.enabled: false, difficulty: heuristic)
  hg-on         the same with presidio PII detection + redaction + kNN difficulty (1 KB prompt)
  litellm       client -> `litellm --config` (LiteLLM proxy, no database) -> upstream

and, per endpoint, through the hg-off gateway (same process, same upstream, same run; c=1 only):

  hg-msg        POST /v1/messages (Anthropic Messages), JSON and streamed
  hg-resp       POST /v1/responses (OpenAI Responses), JSON and streamed
  hg-emb        POST /v1/embeddings, against `direct-emb` (client -> upstream /v1/embeddings)

and, with --endpoints, targets that speak another API (`api: messages` / `api: responses`, fake
Messages and Responses upstreams in the same upstream process), each against its own direct path
(`direct-msgup`: client -> the Messages upstream, `direct-respup`: client -> the Responses upstream):

  pt-msg        Messages client -> gateway -> Messages target: same-API pass-through
  pt-resp       Responses client -> gateway -> Responses target: same-API pass-through
  tr-msg        chat client -> gateway -> Messages target: translated
  tr-resp       chat client -> gateway -> Responses target: translated

With --difficulty, instead (c=1, paths in turn request by request, like --endpoints):

  hg-off        as above: privacy off, no rule reads difficulty, so nothing is scored
  hg-diff       privacy off, the shipped kNN difficulty (static MiniLM word pieces + cues) scored on
                every request because a rule reads it; the issue's target: <= +2 ms p50 over hg-off
  hg-heur       the same with the heuristic method (the fallback), for scale

Their added p50 is read against the same baseline as chat's (direct chat; direct-emb for
embeddings), and the summary gives each endpoint's added p50 minus chat's. Read those from
`--endpoints`: it sends one request per path in turn, so every path meets the same moment of the
machine's load; per-path slices (the default mode) moved the difference by up to 1 ms between two
runs on a loaded 2-core machine, the interleaved runs by a few hundredths.

LiteLLM proxy is installed only for this benchmark, in its own venv:

    python3.11 -m venv .venv-bench
    .venv-bench/bin/pip install -r benchmarks/requirements-litellm-proxy.txt

Skipped with a note if `.venv-bench/bin/litellm` is missing. Each measurement cycles through the
paths in rotating order, so load from other processes on the machine hits every path alike.
Each sequential slice first sends a few requests that are not counted: right after another path
ran (LiteLLM above all, whose footprint is the largest), the first requests of any path are slow
while caches refill; a slice of 150 counted requests read ~0.1-0.3 ms higher p50 than one of 800
for direct and gateway alike. Since session 5, 500 counted requests per slice.
`--state` measures what the state backend adds (issue #22), in one run: the same gateway and
policy twice, one on the embedded store and one on a real `redis-server` started for the run (a
client key with requests/min, tokens/min and a budget, a priced target: every request takes its
token buckets, reads its spend and adds its usage, three store calls), c=1 request by request in
turn with direct. Then, where HAProxy and wrk are installed (Debian: `apt-get install haproxy
wrk`), req/s of two Redis replicas behind HAProxy (round robin, keep-alive) against one replica
behind the same HAProxy, with wrk as the load generator, and the load average beside them.

Prints the table and appends it to benchmarks/results/gateway_overhead.txt (--endpoints:
gateway_overhead_endpoints.txt, --state: gateway_overhead_state.txt, --difficulty:
gateway_overhead_difficulty.txt).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gateway_overhead.txt"
LITELLM_BIN = ROOT / ".venv-bench" / "bin" / "litellm"
MASTER_KEY = "sk-bench-master-key"
ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "NO_PROXY": "*", "PYTHONUNBUFFERED": "1"}

# ~1 KB of prompt with a few entities, so the classification-on path does real work.
PROMPT = ("Hi, I am Maria Gonzalez (maria.gonzalez@example.com, +1 415 555 0134). " + (
    "Please summarise the quarterly report on supply chain delays in the northern warehouses and "
    "list the three most important follow-up actions for the operations team. ") * 6)[:1024]

UPSTREAM_CODE = """
import sys, time
sys.path.insert(0, {root!r})
from tests.support import upstream
from tests.support.embeddings_upstream import EmbeddingsUpstream
from tests.support.wire_upstreams import MessagesUpstream, ResponsesUpstream
upstream._Server.request_queue_size = 1024  # socketserver's default backlog of 5 drops SYNs at c=64
_report = upstream._Server.handle_error
def _quiet(self, request, client_address):  # wrk drops its connections when a cell ends: not an error
    if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
        _report(self, request, client_address)
upstream._Server.handle_error = _quiet
up = EmbeddingsUpstream(model="fake-model", reply=lambda body: "A fixed small answer of a few words.", port={port})
up.received = type("Sink", (), {{"append": lambda self, x: None, "clear": lambda self: None}})()  # no growth
up.received_headers = up.received
up.start()
wire = []
for cls, wire_port in (({wire_ports})):
    w = cls(model="fake-model", reply=lambda body: "A fixed small answer of a few words.", port=wire_port)
    w.received = up.received
    w.received_headers = up.received
    w.start()
    wire.append(w)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""

HG_POLICY = """
version: 1
targets:
  cloud:
    kind: cloud
    model: openai/fake-model
    api_base: http://127.0.0.1:{port}/v1
    api_key: sk-bench
    timeout_s: 30
    retries: 0
    embeddings: {{model: openai/fake-embed, dimensions: 8}}
{wire_targets}connectivity:
  probe_interval_s: 30
limits:
  request_timeout_s: 60
  classify_budget_ms: 5000
{classification}
rules:
{rules}  - name: all
    route: cloud
    redact: {redact}
"""
# Off: no PII analysis, and no rule reads difficulty, so it is not scored either.
CLASSIFY_OFF = "privacy:\n  enabled: false\ndifficulty:\n  method: heuristic\n"
# On: the shipped defaults (presidio + secrets, placeholder redaction, kNN difficulty), a rule
# that reads difficulty so it is scored on every request, and redaction + restoration of the PII.
CLASSIFY_ON = ""
RULES_ON = """  - name: hard
    when: { difficulty: hard }
    route: cloud
    redact: true
"""
# --difficulty: only the difficulty classifier on (privacy off), scored because a rule reads it.
CLASSIFY_DIFF = "privacy:\n  enabled: false\ndifficulty:\n  method: knn\n"
CLASSIFY_DIFF_HEUR = "privacy:\n  enabled: false\ndifficulty:\n  method: heuristic\n"
RULES_DIFF = """  - name: hard
    when: { difficulty: hard }
    route: cloud
    redact: false
"""

LITELLM_CONFIG = """
model_list:
  - model_name: fake-model
    litellm_params:
      model: openai/fake-model
      api_base: http://127.0.0.1:{port}/v1
      api_key: sk-bench
litellm_settings:
  drop_params: true
  telemetry: false
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its children (LiteLLM may fork workers)."""
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    model: str = "fake-model"
    api: str = "chat"  # the endpoint this path is measured on (see API_PATHS)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_http(url: str, proc: subprocess.Popen, timeout: float, headers: dict[str, str] | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        try:
            with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not come up in {timeout} s")


def start_upstream(port: int, wire_ports: tuple[int, int] | None = None) -> subprocess.Popen:
    """The fake upstream (chat + embeddings on `port`), and a Messages and a Responses upstream on
    `wire_ports` when given."""
    wire = f"(MessagesUpstream, {wire_ports[0]}), (ResponsesUpstream, {wire_ports[1]})," if wire_ports else ""
    proc = subprocess.Popen([sys.executable, "-c", UPSTREAM_CODE.format(root=str(ROOT), port=port, wire_ports=wire)],
                            stdout=subprocess.PIPE, env=ENV)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise RuntimeError("fake upstream did not start")
    return proc


WIRE_TARGETS = """  msg-target:
    kind: cloud
    model: anthropic/fake-model
    api: messages
    api_base: http://127.0.0.1:{msg}/v1
    api_key: sk-bench
    timeout_s: 30
    retries: 0
  resp-target:
    kind: cloud
    model: openai/fake-model
    api: responses
    api_base: http://127.0.0.1:{resp}/v1
    api_key: sk-bench
    timeout_s: 30
    retries: 0
"""
WIRE_RULES = """  - name: to-messages
    when: {{ header: {{ x-target: messages }} }}
    route: msg-target
  - name: to-responses
    when: {{ header: {{ x-target: responses }} }}
    route: resp-target
"""


def start_gateway(name: str, upstream_port: int, classification: str, tmp: Path, rules: str | None = None,
                  wire_ports: tuple[int, int] | None = None) -> Server:
    policy = tmp / f"{name}.yaml"
    if rules is None:
        rules = RULES_ON if classification == CLASSIFY_ON else ""
    redact = classification == CLASSIFY_ON
    wire_targets = ""
    if wire_ports is not None:  # targets that speak Messages / Responses, chosen by x-target
        wire_targets = WIRE_TARGETS.format(msg=wire_ports[0], resp=wire_ports[1])
        rules = WIRE_RULES.format() + rules
    policy.write_text(textwrap.dedent(HG_POLICY).format(port=upstream_port, classification=classification,
                                                        rules=rules, redact=str(redact).lower(),
                                                        wire_targets=wire_targets))
    port = free_port()
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "hybrid-gateway"), "serve", "--policy", str(policy),
                             "--port", str(port), "--log-level", "ERROR", "--no-watch"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout=300)
    return Server(name, proc, f"http://127.0.0.1:{port}", model="auto")


STATE_POLICY = """
version: 1
targets:
  cloud:
    kind: cloud
    model: openai/fake-model
    api_base: http://127.0.0.1:{port}/v1
    api_key: sk-bench
    timeout_s: 30
    retries: 0
    prices: {{input: 0.15, output: 0.6}}
connectivity:
  probe_interval_s: 30
limits:
  request_timeout_s: 60
{state}
clients:
  - {{name: bench, api_key: {key}, requests_per_min: 100000000, tokens_per_min: 1000000000,
     budget: {{usd: 1000000, period: day}}}}
privacy:
  enabled: false
difficulty:
  method: heuristic
rules:
  - name: all
    route: cloud
"""
CLIENT_KEY = "sk-bench-client"
VAULT_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="  # 32 bytes, base64: any will do here


def start_state_gateway(name: str, upstream_port: int, redis_url: str | None, tmp: Path) -> Server:
    policy = tmp / f"{name}.yaml"
    state = f"state:\n  backend: redis\n  url: {redis_url}" if redis_url else "state:\n  backend: embedded"
    policy.write_text(textwrap.dedent(STATE_POLICY).format(port=upstream_port, state=state, key=CLIENT_KEY))
    port = free_port()
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "hybrid-gateway"), "serve", "--policy", str(policy),
                             "--port", str(port), "--log-level", "ERROR", "--no-watch"],
                            env={**ENV, "GATEWAY_VAULT_KEY": VAULT_KEY},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout=300)
    return Server(name, proc, f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                  model="auto")


def start_redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


HAPROXY_CFG = """
global
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend gw
  bind 127.0.0.1:{port}
  default_backend replicas
backend replicas
  balance roundrobin
{servers}
"""

WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
counter = 0
request = function()
  counter = counter + 1
  local body = '{{"model":"auto","max_tokens":16,"messages":[{{"role":"user","content":"{prompt} ref ' .. counter .. '"}}]}}'
  return wrk.format(nil, "/v1/chat/completions", nil, body)
end
"""


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def haproxy_wrk(name: str, backends: list[Server], tmp: Path, seconds: float, conns: int,
                cpu: dict[str, float] | None = None) -> tuple[float, str]:
    """req/s of wrk through HAProxy to `backends` (round robin), and wrk's error line if any;
    `cpu` gains the CPU seconds wrk and HAProxy used (the load generator's side)."""
    port = free_port()
    cfg = tmp / f"{name}.haproxy.cfg"
    servers = "\n".join(f"  server r{i} {b.url.removeprefix('http://')}" for i, b in enumerate(backends))
    cfg.write_text(HAPROXY_CFG.format(port=port, servers=servers))
    proxy = subprocess.Popen([shutil.which("haproxy") or "haproxy", "-f", str(cfg), "-db"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proxy, timeout=10)
        script = tmp / "post.lua"
        script.write_text(WRK_LUA.format(key=CLIENT_KEY, prompt=PROMPT[:200]))
        before = os.times()
        out = subprocess.run([shutil.which("wrk") or "wrk", "-t", "1", "-c", str(conns), "-d", f"{seconds:g}s",
                              "-s", str(script), f"http://127.0.0.1:{port}"],
                             capture_output=True, text=True, timeout=seconds + 60).stdout
        after = os.times()
        if cpu is not None:
            cpu["wrk"] = cpu.get("wrk", 0.0) + (after.children_user + after.children_system
                                                - before.children_user - before.children_system)
            cpu["haproxy"] = cpu.get("haproxy", 0.0) + cpu_s(proxy.pid)
    finally:
        proxy.terminate()
        proxy.wait(10)
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    errors = "; ".join(line.strip() for line in out.splitlines() if "Non-2xx" in line or "Socket errors" in line)
    return (float(rps.group(1)) if rps else 0.0), errors


# What the gateway's Redis client sends (INFO commandstats counts a script's own commands apart,
# under their names: those are left out).
_CLIENT_COMMANDS = ("evalsha", "eval", "hgetall", "get", "publish")


def redis_calls(url: str) -> int:
    """Commands the gateways' Redis clients have sent so far: store round trips."""
    import redis

    stats = redis.Redis.from_url(url).info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in _CLIENT_COMMANDS)


def run_state(args: argparse.Namespace) -> str:
    """Embedded vs Redis state, c=1 in turn; then 2 Redis replicas behind HAProxy vs 1 (wrk)."""
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-state-"))
    up_port = free_port()
    upstream = start_upstream(up_port)
    redis_proc, redis_url = start_redis(tmp)
    procs: list[Server] = []
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    try:
        direct = Server("direct", upstream, f"http://127.0.0.1:{up_port}")
        print("starting hybrid-gateway on embedded state and on redis state ...", flush=True)
        procs.append(start_state_gateway("embedded", up_port, None, tmp))
        procs.append(start_state_gateway("redis", up_port, redis_url, tmp))
        paths = [direct, *procs]
        for p in paths:
            asyncio.run(measure(p.url, p.model, p.headers, 4, stream=False, requests=args.warmup, seconds=None))
        results: dict[tuple[str, str], Sample] = {}
        calls: dict[str, float] = {}
        for label, stream in (("c=1", False), ("c=1 stream", True)):
            before = redis_calls(redis_url)
            for name, sample in asyncio.run(measure_interleaved(paths, stream=stream,
                                                                requests=args.seq * args.rounds)).items():
                results[(label, name)] = sample
            time.sleep(0.5)  # the last settle, sent after its answer
            calls[label] = (redis_calls(redis_url) - before) / (args.seq * args.rounds)
        load = os.getloadavg()
        out(f"State backend overhead: embedded vs Redis (redis-server on loopback), {len(PROMPT)} B prompt, "
            "classification off")
        out(f"machine: {os.cpu_count()} cores, load average at end {load[0]:.1f}; c=1, paths in turn request by "
            f"request, {args.seq * args.rounds} requests each per case")
        out("every gateway request: a client key with requests/min + tokens/min buckets and a budget; Redis "
            "commands sent per request (INFO commandstats): "
            + ", ".join(f"{label} {n:.2f}" for label, n in calls.items()))
        out()
        out(f"{'case':<12}{'path':<14}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}{'errors':>8}")
        for label in ("c=1", "c=1 stream"):
            base = results[(label, "direct")]
            for p in paths:
                s = results[(label, p.name)]
                plus = f"{'-':>9}{'-':>9}" if p.name == "direct" else \
                    f"{s.pct(0.5) - base.pct(0.5):9.2f}{s.pct(0.99) - base.pct(0.99):9.2f}"
                kinds = f"  {s.error_kinds}" if s.errors else ""
                out(f"{label:<12}{p.name:<14}{s.pct(0.5):9.2f}{s.pct(0.99):9.2f}{plus}{s.errors:8d}{kinds}")
        out()
        for label in ("c=1", "c=1 stream"):
            redis_add = results[(label, "redis")].pct(0.5) - results[(label, "embedded")].pct(0.5)
            out(f"  {label:<11} Redis state adds {redis_add:+.2f} ms p50 over embedded (target: <= 0.5 ms)")
        if args.no_lb:
            return "\n".join(lines) + "\n"
        if not (shutil.which("haproxy") and shutil.which("wrk")):
            out()
            out("2 replicas behind a load balancer: not measured (haproxy and wrk not installed: "
                "apt-get install haproxy wrk)")
            return "\n".join(lines) + "\n"
        procs.append(start_state_gateway("redis-2", up_port, redis_url, tmp))
        one_lb: list[float] = []
        two_lb: list[float] = []
        notes: list[str] = []
        cells = [("one", [procs[1]], one_lb), ("two", [procs[1], procs[2]], two_lb)]
        # Where the 2 cores went in each cell: CPU seconds per process over its runs.
        others = {"replicas": [procs[1].proc.pid, procs[2].proc.pid], "upstream": [upstream.pid],
                  "redis-server": [redis_proc.pid]}
        cpu: dict[str, dict[str, float]] = {"one": {}, "two": {}}
        wall: dict[str, float] = {"one": 0.0, "two": 0.0}
        for r in range(args.rounds):  # alternate who goes first, so load from other work hits both alike
            for name, backends, sink in cells[r % 2:] + cells[:r % 2]:
                start = {k: sum(map(cpu_s, pids)) for k, pids in others.items()}
                t0 = time.monotonic()
                rps, errors = haproxy_wrk(name, backends, tmp, args.slice_s * 2, 32, cpu[name])
                wall[name] += time.monotonic() - t0
                for k, pids in others.items():
                    cpu[name][k] = cpu[name].get(k, 0.0) + sum(map(cpu_s, pids)) - start[k]
                sink.append(rps)
                if errors:
                    notes.append(f"{name}: {errors}")
        load = os.getloadavg()
        out()
        out(f"HAProxy round robin in front, wrk -t1 -c32, {args.slice_s * 2:g} s x {args.rounds} alternating; "
            f"load average at end {load[0]:.1f}")
        out(f"  1 replica : {', '.join(f'{x:.0f}' for x in one_lb)} req/s (best {max(one_lb):.0f})")
        out(f"  2 replicas: {', '.join(f'{x:.0f}' for x in two_lb)} req/s (best {max(two_lb):.0f})")
        out(f"  ratio 2/1 (best of each): {max(two_lb) / max(max(one_lb), 1e-9):.2f}x (issue #22 asks >= 1.7x)")
        for note in notes:
            out(f"  errors {note}")
        out(f"  CPU used, in cores (CPU seconds / wall seconds of the cell's runs; {os.cpu_count()} cores in all):")
        for name in ("one", "two"):
            used = cpu[name]
            out(f"    {name + ' replica' + ('s' if name == 'two' else ''):<13}"
                + ", ".join(f"{k} {v / wall[name]:.2f}" for k, v in used.items())
                + f"; total {sum(used.values()) / wall[name]:.2f}")
        two_total = sum(cpu["two"].values()) / wall["two"]
        out(f"  on {os.cpu_count()} cores the gateway replicas, HAProxy, wrk, the Python fake upstream and "
            "redis-server all share the CPUs: a second replica can only use what the others leave; "
            + (f"this run's processes used {two_total:.2f} of them with 2 replicas, other work on the box the "
               f"rest (load average {load[0]:.1f}): the limit was the shared machine, not wrk (its CPU above)"
               if two_total < 0.8 * (os.cpu_count() or 1) else
               "they were busy: the limit was these processes' CPU (wrk's share above)"))
        # The most a second replica can add when the CPUs are the limit: what the cores leave after the
        # 2-replica cell's other processes (LB, wrk, upstream, Redis), over one replica's own CPU.
        one_replica = cpu["one"]["replicas"] / wall["one"]
        rest = (sum(cpu["two"].values()) - cpu["two"]["replicas"]) / wall["two"]
        bound = ((os.cpu_count() or 1) - rest) / max(one_replica, 1e-9)
        out(f"  CPU bound on the ratio: ({os.cpu_count()} cores - {rest:.2f} for the others) / {one_replica:.2f} "
            f"for one replica = {bound:.2f}x, if a replica's CPU per request stayed as it is alone")
    finally:
        for p in procs:
            p.stop()
        upstream.terminate()
        upstream.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)
    return "\n".join(lines) + "\n"


def start_litellm(upstream_port: int, tmp: Path) -> Server | None:
    if not LITELLM_BIN.exists():
        return None
    cfg = tmp / "litellm.yaml"
    cfg.write_text(textwrap.dedent(LITELLM_CONFIG).format(port=upstream_port))
    port = free_port()
    env = {**ENV, "LITELLM_MASTER_KEY": MASTER_KEY, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    proc = subprocess.Popen([str(LITELLM_BIN), "--config", str(cfg), "--port", str(port), "--host", "127.0.0.1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    auth = {"Authorization": f"Bearer {MASTER_KEY}"}
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, timeout=300, headers=auth)
    return Server("litellm", proc, f"http://127.0.0.1:{port}", headers=auth)


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    error_kinds: dict[str, int] = field(default_factory=dict)

    def add(self, other: Sample) -> None:
        self.latencies += other.latencies
        self.errors += other.errors
        for k, n in other.error_kinds.items():
            self.error_kinds[k] = self.error_kinds.get(k, 0) + n
        self.seconds += other.seconds

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


API_PATHS = {"chat": "/chat/completions", "messages": "/messages", "responses": "/responses",
             "embeddings": "/embeddings"}
# What a complete answer holds, per endpoint: (JSON, stream)
_COMPLETE = {"chat": (b'"choices"', b"data: [DONE]"), "messages": (b'"content"', b"message_stop"),
             "responses": (b'"output"', b"response.completed"), "embeddings": (b'"embedding"', b"")}


def request_body(api: str, model: str, text: str, stream: bool) -> dict:
    if api == "messages":
        return {"model": model, "stream": stream, "max_tokens": 16, "messages": [{"role": "user", "content": text}]}
    if api == "responses":
        return {"model": model, "stream": stream, "max_output_tokens": 16, "input": text}
    if api == "embeddings":
        return {"model": model, "input": text, "encoding_format": "float"}
    return {"model": model, "stream": stream, "max_tokens": 16, "messages": [{"role": "user", "content": text}]}


async def one(session: aiohttp.ClientSession, url: str, payload: dict, headers: dict[str, str],
              api: str = "chat") -> str | None:
    """None when the answer is complete and correct, else what was wrong."""
    async with session.post(url, json=payload, headers=headers) as resp:
        data = await resp.read()
        if resp.status != 200:
            return f"HTTP {resp.status}"
        whole, streamed = _COMPLETE[api]
        if payload.get("stream"):
            return None if streamed in data and b'"content"' in data else "incomplete stream"
        return None if whole in data else "not a complete answer"


_PROMPT_IDS = itertools.count(1)
ENDPOINT_PATHS = ("hg-msg", "hg-resp", "hg-emb", "pt-msg", "pt-resp", "tr-msg", "tr-resp")
DIRECT_PATHS = ("direct", "direct-emb", "direct-msgup", "direct-respup")
# The direct path each gateway path's added latency is read against (default: direct chat).
BASELINE = {"hg-emb": "direct-emb", "pt-msg": "direct-msgup", "tr-msg": "direct-msgup",
            "pt-resp": "direct-respup", "tr-resp": "direct-respup"}


async def measure(server_url: str, model: str, headers: dict[str, str], concurrency: int, *, stream: bool,
                  requests: int | None, seconds: float | None, api: str = "chat") -> Sample:
    url = (server_url if server_url.endswith("/v1") else server_url + "/v1") + API_PATHS[api]
    sample = Sample()

    def payload() -> dict:
        # A different prompt every time (same length), across every cell and round of the run, so
        # no classifier result cache can hit: real traffic does not repeat itself byte for byte.
        text = f"{PROMPT[:-12]} ref {next(_PROMPT_IDS):08d}"
        return request_body(api, model, text, stream)

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        left = [requests] if requests is not None else None
        end = time.perf_counter() + (seconds or 0)

        async def worker() -> None:
            while True:
                if left is not None:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                elif time.perf_counter() >= end:
                    return
                t0 = time.perf_counter()
                try:
                    problem = await one(session, url, payload(), headers, api)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problem = type(exc).__name__
                if problem is None:
                    sample.latencies.append(time.perf_counter() - t0)
                else:
                    sample.errors += 1
                    sample.error_kinds[problem] = sample.error_kinds.get(problem, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        sample.seconds = time.perf_counter() - t0
    return sample


async def measure_interleaved(paths: list[Server], *, stream: bool, requests: int) -> dict[str, Sample]:
    """c=1, one request per path in turn (the order rotating), `requests` times: on a shared machine
    the load of other work changes from second to second, and a slice per path (measure) lets a
    burst land on one path only; here every path meets it alike. Embeddings are not streamed."""
    paths = [p for p in paths if not (stream and p.api == "embeddings")]
    samples = {p.name: Sample() for p in paths}
    timeout = aiohttp.ClientTimeout(total=60)
    sessions = {p.name: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=timeout,
                                              trust_env=False) for p in paths}
    try:
        for i in range(requests):
            for p in paths[i % len(paths):] + paths[: i % len(paths)]:
                url = (p.url if p.url.endswith("/v1") else p.url + "/v1") + API_PATHS[p.api]
                body = request_body(p.api, p.model, f"{PROMPT[:-12]} ref {next(_PROMPT_IDS):08d}", stream)
                start = time.perf_counter()
                try:
                    problem = await one(sessions[p.name], url, body, p.headers, p.api)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problem = type(exc).__name__
                if problem is None:
                    samples[p.name].latencies.append(time.perf_counter() - start)
                else:
                    samples[p.name].errors += 1
                    samples[p.name].error_kinds[problem] = samples[p.name].error_kinds.get(problem, 0) + 1
        for sample in samples.values():  # req/s: what the path serves one request after another
            sample.seconds = sum(sample.latencies)
    finally:
        for session in sessions.values():
            await session.close()
    return samples


def run(args: argparse.Namespace) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    up_port = free_port()
    procs: list[Server] = []
    wire_ports = (free_port(), free_port()) if args.endpoints else None
    upstream = start_upstream(up_port, wire_ports)
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    try:
        direct = Server("direct", upstream, f"http://127.0.0.1:{up_port}")
        paths = [direct]
        print("starting hybrid-gateway (classification off, on) and litellm proxy ...", flush=True)
        procs.append(start_gateway("hg-off", up_port, CLASSIFY_OFF, tmp, wire_ports=wire_ports))
        if args.difficulty:
            procs.append(start_gateway("hg-diff", up_port, CLASSIFY_DIFF, tmp, rules=RULES_DIFF))
            procs.append(start_gateway("hg-heur", up_port, CLASSIFY_DIFF_HEUR, tmp, rules=RULES_DIFF))
        elif not args.endpoints:
            procs.append(start_gateway("hg-on", up_port, CLASSIFY_ON, tmp))
        interleaved = args.endpoints or args.difficulty
        litellm = None if interleaved else start_litellm(up_port, tmp)
        if litellm:
            procs.append(litellm)
        paths += procs
        hg_off = procs[0]
        if not args.difficulty:
            # The other endpoints of the hg-off gateway: same process, same upstream (c=1 cells only).
            paths += [Server("hg-msg", hg_off.proc, hg_off.url, model="auto", api="messages"),
                      Server("hg-resp", hg_off.proc, hg_off.url, model="auto", api="responses"),
                      Server("direct-emb", upstream, direct.url, model="fake-embed", api="embeddings"),
                      Server("hg-emb", hg_off.proc, hg_off.url, model="auto", api="embeddings")]
        if wire_ports is not None:  # targets of another API: pass-through and translated
            to_msg, to_resp = {"x-target": "messages"}, {"x-target": "responses"}
            paths += [Server("direct-msgup", upstream, f"http://127.0.0.1:{wire_ports[0]}", api="messages"),
                      Server("direct-respup", upstream, f"http://127.0.0.1:{wire_ports[1]}", api="responses"),
                      Server("pt-msg", hg_off.proc, hg_off.url, headers=to_msg, model="auto", api="messages"),
                      Server("pt-resp", hg_off.proc, hg_off.url, headers=to_resp, model="auto", api="responses"),
                      Server("tr-msg", hg_off.proc, hg_off.url, headers=to_msg, model="auto"),
                      Server("tr-resp", hg_off.proc, hg_off.url, headers=to_resp, model="auto")]
        for p in paths:  # warm-up: imports, model loads, connection pools, JIT-ish caches
            asyncio.run(measure(p.url, p.model, p.headers, 4, stream=False, requests=args.warmup, seconds=None,
                                api=p.api))
            if p.api != "embeddings":
                asyncio.run(measure(p.url, p.model, p.headers, 2, stream=True, requests=args.warmup // 2,
                                    seconds=None, api=p.api))

        # (label, concurrency, stream, requests per slice, seconds per slice)
        plan = [("c=1", 1, False, args.seq, None), ("c=1 stream", 1, True, args.seq, None),
                ("c=16", 16, False, None, args.slice_s), ("c=64", 64, False, None, args.slice_s)]
        if interleaved:
            plan = plan[:2]
        results: dict[tuple[str, str], Sample] = {}
        if interleaved:  # request by request in turn: every path sees the same moment of load
            for label, _, stream, reqs, _ in plan:
                for name, sample in asyncio.run(measure_interleaved(paths, stream=stream,
                                                                    requests=reqs * args.rounds)).items():
                    results[(label, name)] = sample
        for label, conc, stream, reqs, secs in [] if interleaved else plan:
            for r in range(args.rounds):
                order = paths[r % len(paths):] + paths[: r % len(paths)]  # rotate who goes first
                for p in order:
                    # Classification on at high concurrency only measures presidio's CPU: keep it to c<=16.
                    if p.name == "hg-on" and conc > 16:
                        continue
                    if p.name in (*ENDPOINT_PATHS, *DIRECT_PATHS[1:]) and (conc > 1 or (stream and p.api == "embeddings")):
                        continue
                    if reqs is not None:  # a sequential slice: settle first, not counted
                        asyncio.run(measure(p.url, p.model, p.headers, conc, stream=stream,
                                            requests=args.settle, seconds=None, api=p.api))
                    s = asyncio.run(measure(p.url, p.model, p.headers, conc, stream=stream, requests=reqs, seconds=secs,
                                            api=p.api))
                    results.setdefault((label, p.name), Sample()).add(s)

        load = os.getloadavg()
        out(f"Gateway overhead vs direct, loopback fake upstream ({len(PROMPT)} B prompt, fixed small answer)")
        method = ("" if interleaved else f"{args.rounds} alternating rounds per cell; c=1 slices of {args.seq} "
                  f"requests after {args.settle} uncounted")
        out(f"machine: {os.cpu_count()} cores, load average at end {load[0]:.1f} (other work shares the cores); {method}")
        out()
        if interleaved:
            mode = "--difficulty" if args.difficulty else "--endpoints"
            out(f"{mode}: c=1, paths in turn request by request, {args.seq * args.rounds} requests each per case")
        out(f"{'case':<12}{'path':<14}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}{'+p99 ms':>9}{'req/s':>9}{'errors':>8}")
        for label, *_ in plan:
            for p in paths:
                s = results.get((label, p.name))
                base = results.get((label, BASELINE.get(p.name, "direct")))
                if s is None or base is None:
                    continue
                add50 = s.pct(0.5) - base.pct(0.5)
                add99 = s.pct(0.99) - base.pct(0.99)
                plus = f"{'-':>9}{'-':>9}" if p.name.startswith("direct") else f"{add50:9.2f}{add99:9.2f}"
                kinds = f"  {s.error_kinds}" if s.errors else ""
                out(f"{label:<12}{p.name:<14}{s.pct(0.5):9.2f}{s.pct(0.99):9.2f}{plus}{s.rps:9.0f}{s.errors:8d}{kinds}")
        if args.difficulty:
            out()
            out("difficulty scoring on minus off (same gateway config otherwise; target: <= +2 ms p50):")
            for label in ("c=1", "c=1 stream"):
                off = results[(label, "hg-off")]
                for name in ("hg-diff", "hg-heur"):
                    on = results[(label, name)]
                    out(f"  {label:<11} {name:<8} p50 {on.pct(0.5):6.2f} vs {off.pct(0.5):6.2f} ms: "
                        f"{on.pct(0.5) - off.pct(0.5):+6.2f} ms   p99 {on.pct(0.99) - off.pct(0.99):+6.2f} ms")
        for label in ("c=1", "c=1 stream") if not args.difficulty else ():
            if label == "c=1":
                out()
                out("added p50 per endpoint minus chat's (hg-off gateway, same run; target: within 0.3 ms)"
                    + (":" if args.endpoints else ", per-path slices: noisy on a loaded machine, read --endpoints:"))
            chat = results[(label, "hg-off")].pct(0.5) - results[(label, "direct")].pct(0.5)
            for name in ENDPOINT_PATHS:
                if (label, name) not in results:
                    continue
                base = results[(label, BASELINE.get(name, "direct"))].pct(0.5)
                mine = results[(label, name)].pct(0.5) - base
                out(f"  {label:<11} {name:<8} added p50 {mine:6.2f} ms vs chat {chat:6.2f} ms: {mine - chat:+6.2f} ms")
        out()
        out(f"{'path':<10}{'peak RSS MB':>12}{'max req/s (0 errors)':>22}")
        best: dict[str, float] = {}
        for p in paths:
            if p.name in ENDPOINT_PATHS or p.name in DIRECT_PATHS[1:]:
                continue
            rps = [results[(lbl, p.name)].rps for lbl, *_ in plan
                   if (lbl, p.name) in results and results[(lbl, p.name)].errors == 0]
            best[p.name] = max(rps, default=0.0)
            out(f"{p.name:<10}{peak_rss_mb(p.proc.pid):12.0f}{best[p.name]:22.0f}")
        if litellm:
            out()
            out("ratios ours / LiteLLM proxy (lower is better for latency, higher for req/s):")
            for label in ("c=1", "c=1 stream"):
                base = results[(label, "direct")].pct(0.5)
                lit = results[(label, "litellm")].pct(0.5) - base
                for ours in ("hg-off", "hg-on"):
                    mine = results[(label, ours)].pct(0.5) - base
                    out(f"  {label:<11} added p50 {ours}: {mine:6.2f} ms vs {lit:6.2f} ms = {mine / lit:5.2f}x")
            out(f"  max req/s hg-off: {best['hg-off']:.0f} vs {best['litellm']:.0f} = "
                f"{best['hg-off'] / max(best['litellm'], 1e-9):.2f}x")
            out(f"  peak RSS hg-off: {peak_rss_mb(procs[0].proc.pid):.0f} MB vs "
                f"{peak_rss_mb(litellm.proc.pid):.0f} MB")
        elif interleaved:
            out()
            out(f"{mode}: PII classification, LiteLLM proxy and c>1 not measured in this run.")
        else:
            out()
            out(f"LiteLLM proxy not measured: {LITELLM_BIN} is missing (see the module docstring).")
        out("direct req/s is bounded by the Python fake upstream and the Python client on the same cores.")
    finally:
        for p in procs:
            p.stop()
        upstream.terminate()
        upstream.wait(10)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples (about a minute)")
    ap.add_argument("--endpoints", action="store_true",
                    help="only chat vs Messages, Responses and embeddings through the hg-off gateway (c=1, full samples)")
    ap.add_argument("--state", action="store_true",
                    help="embedded vs Redis state added p50 (c=1), and 2 replicas behind HAProxy vs 1")
    ap.add_argument("--no-lb", action="store_true", help="with --state: the c=1 rows only (no HAProxy, no wrk)")
    ap.add_argument("--difficulty", action="store_true",
                    help="only difficulty scoring on (kNN, heuristic) vs off through the gateway (c=1, full samples)")
    ap.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args()
    args.rounds = 2 if args.quick else 4
    args.seq = 50 if args.quick else 500  # sequential requests per path per round
    args.settle = 5 if args.quick else 20  # sent before each sequential slice, not counted
    args.slice_s = 1.5 if args.quick else 3.0
    args.warmup = 20 if args.quick else 60
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    text = run_state(args) if args.state else run(args)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        results = (RESULTS.with_name("gateway_overhead_difficulty.txt") if args.difficulty
                   else RESULTS.with_name("gateway_overhead_endpoints.txt") if args.endpoints
                   else RESULTS.with_name("gateway_overhead_state.txt") if args.state else RESULTS)
        with results.open("a") as f:  # runs accumulate: this machine's speed drifts between them
            f.write(f"\n$ {' '.join(['benchmarks/gateway_overhead.py', *sys.argv[1:]])}   # {stamp}\n{text}")
        print(f"appended to {results.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
