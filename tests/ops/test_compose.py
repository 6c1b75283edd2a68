"""Deployment files: docker-compose.yml, deploy/prometheus.yml and the Dockerfile agree with the code.

`docker compose config` (the real validator: the v2 plugin, else Debian's `docker-compose` v1.29,
which `make system-tools` installs on CI) runs where one is installed; the structural checks run
everywhere, so a renamed CLI flag, port or file breaks the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gateway.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_cmd() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file() -> None:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("no docker compose: neither the `docker compose` plugin nor `docker-compose` is installed")
    env = {**os.environ, "CLOUD_API_KEY": "sk-test"}
    for profile in ([], ["--profile", "local-server"]):
        r = subprocess.run([*cmd, "-f", str(COMPOSE), *profile, "config", "--quiet"], capture_output=True,
                           text=True, cwd=ROOT, env=env, timeout=60)
        assert r.returncode == 0, r.stderr


def _serve_args(argv: list[str]) -> list[str]:
    assert argv[0].endswith("hybrid-gateway") and argv[1] == "serve", argv
    return argv[1:]


def _parses(args: list[str]) -> None:
    # Parse with click (what the container would run) without starting a server.
    ctx = cli.make_context("hybrid-gateway", list(args), resilient_parsing=False)
    sub = cli.get_command(ctx, args[0])
    assert sub is not None
    sub.make_context(args[0], list(args[1:]), parent=ctx)


def test_gateway_service_command_is_a_valid_serve_invocation() -> None:
    gw = compose()["services"]["gateway"]
    args = _serve_args(gw["command"])
    _parses(args)
    assert args[args.index("--host") + 1] == "0.0.0.0"
    port = args[args.index("--port") + 1]
    assert any(p.endswith(f":{port}") for p in gw["ports"])
    policy = args[args.index("--policy") + 1]
    mount = next(v for v in gw["volumes"] if v.startswith("./policies:"))
    host_dir, container_dir = mount.split(":")[:2]
    assert policy.startswith(container_dir + "/")
    assert (ROOT / host_dir / policy.removeprefix(container_dir + "/")).is_file()
    # Every ${VAR} the default policy reads is passed through to the container.
    wanted = set(re.findall(r"\$\{([A-Z_]+)", (ROOT / host_dir / Path(policy).name).read_text()))
    assert wanted <= set(gw["environment"]), wanted - set(gw["environment"])


def test_prometheus_scrapes_the_gateway_metrics() -> None:
    services = compose()["services"]
    mount = next(v for v in services["prometheus"]["volumes"] if "prometheus.yml" in v)
    prom = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "hybrid-gateway")
    assert job["metrics_path"] == "/metrics"
    port = _serve_args(services["gateway"]["command"])
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["gateway"] and str(sd["port"]) == port[port.index("--port") + 1]


def test_local_model_server_is_an_optional_profile() -> None:
    services = compose()["services"]
    assert services["local-llm"]["profiles"] == ["local-server"]
    assert all("profiles" not in services[s] for s in ("gateway", "prometheus"))


def test_dockerfile_runs_make_setup_and_serves_on_all_interfaces() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"^RUN make setup\b", text, re.M)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    args = _serve_args(cmd)
    _parses(args)
    assert args[args.index("--host") + 1] == "0.0.0.0"
    # Everything `make setup` reads is copied into the image.
    setup_inputs = re.search(r"^\$\(STAMP\): (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    copied = " ".join(re.findall(r"^COPY (.+)$", text, re.M))
    assert all(f in copied for f in setup_inputs), setup_inputs
