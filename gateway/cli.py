"""`hybrid-gateway`: serve | explain | policy check | policy test | difficulty …"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any, cast

import click
import orjson

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gateway.policy.load import PolicyError, load_policy

DEFAULT_POLICY = "policies/default.yaml"


def _fail(message: str, code: int = 2) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def _load(path: str) -> Any:
    try:
        return load_policy(path)
    except PolicyError as exc:
        _fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Hybrid Gateway: an OpenAI-compatible gateway that routes LLM traffic by policy."""
    from gateway.logs import logs_to_stderr

    logs_to_stderr()  # not in front of the JSON `explain` and `policy test` print on stdout


@main.command()
@click.option("--policy", "policy_path", default=DEFAULT_POLICY, show_default=True, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--offline", is_flag=True, help="Treat every cloud target as offline (test offline mode).")
@click.option("--audit-log", default=None, help="Write the audit log here ('-' for stdout).")
@click.option("--audit-prompts", type=click.Choice(["off", "redacted", "raw"]), default="off", show_default=True,
              envvar="GATEWAY_AUDIT_PROMPTS",
              help="Prompt text in the audit log: off; redacted (every detected value replaced); raw (as received).")
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--no-watch", is_flag=True, help="Do not reload the policy when the file changes.")
@click.option("--otlp-endpoint", default=None, help="Export OpenTelemetry traces over OTLP/HTTP to this URL "
              "(e.g. http://127.0.0.1:4318/v1/traces). Default: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT; unset: off.")
def serve(policy_path: str, host: str, port: int, offline: bool, audit_log: str | None, audit_prompts: str,
          log_level: str, no_watch: bool, otlp_endpoint: str | None) -> None:
    """Serve the OpenAI-compatible API."""
    import uvicorn

    from gateway.app import create_app
    from gateway.logs import configure_logging
    from gateway.state import AuditPrompts, GatewayState, Settings
    from gateway.tracing import endpoint_from_env

    configure_logging(log_level)
    policy = _load(policy_path)
    settings = Settings(policy_path=policy_path, force="offline" if offline else "auto",
                        audit_path=audit_log, audit_prompts=cast(AuditPrompts, audit_prompts),  # click.Choice checked it
                        watch=not no_watch, otlp_endpoint=otlp_endpoint or endpoint_from_env())
    try:
        state = GatewayState(settings, policy)
    except Exception as exc:  # e.g. a missing NLP model: one clear line, no traceback
        _fail(f"{policy_path}: cannot start: {type(exc).__name__}: {exc}")
    app = create_app(settings, state)
    from gateway.http_protocol import uvicorn_config

    config = uvicorn_config(app, host=host, port=port, loop="auto", timeout_graceful_shutdown=10)
    uvicorn.Server(config).run()


def _json_option(name: str, text: str, kind: type) -> Any:
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        _fail(f"{name} is not valid JSON: {exc}")
    if not isinstance(data, kind):
        _fail(f"{name} must be a JSON {'list' if kind is list else 'object'}")
    return data


def _messages(prompt: str | None, messages_json: str | None) -> list[dict[str, Any]]:
    if messages_json:
        try:
            data = orjson.loads(messages_json)
        except orjson.JSONDecodeError as exc:
            _fail(f"--messages is not valid JSON: {exc}")
        if not isinstance(data, list):
            _fail("--messages must be a JSON list of messages")
        return data
    if prompt is None:
        _fail("give a PROMPT or --messages")
    return [{"role": "user", "content": prompt}]


@main.command()
@click.argument("prompt", required=False)
@click.option("--policy", "policy_path", default=DEFAULT_POLICY, show_default=True, type=click.Path())
@click.option("--offline", is_flag=True, help="Every cloud target offline, as `serve --offline`.")
@click.option("--model", default="auto", show_default=True)
@click.option("--messages", "messages_json", default=None, help="A JSON list of messages instead of PROMPT.")
@click.option("--header", "headers", multiple=True, help="NAME=VALUE, repeatable.")
@click.option("--tools", "tools_json", default=None, help="A JSON list of tools, as chat completions takes them.")
@click.option("--response-format", "format_json", default=None, help="A JSON response_format, e.g. "
              '\'{"type": "json_object"}\'.')
@click.option("--client", default=None, help="Client name to assume.")
@click.option("--score-all", is_flag=True, help="Run every classifier, even those the decision does not need.")
@click.option("--server", default=None, metavar="URL",
              help="Ask a running gateway (POST URL/v1/route/explain): its live connectivity, its policy.")
@click.option("--api-key", default=None, envvar="HYBRID_API_KEY", help="Client key for --server.")
@click.option("--embeddings", is_flag=True,
              help="Explain POST /v1/embeddings with PROMPT as its input: the decision, then which targets may "
                   "embed it in which space (`embeddings` in the output).")
def explain(prompt: str | None, policy_path: str, offline: bool, model: str, messages_json: str | None,
            headers: tuple[str, ...], tools_json: str | None, format_json: str | None, client: str | None,
            score_all: bool, server: str | None, api_key: str | None, embeddings: bool) -> None:
    """Print the routing decision for a prompt as JSON. Calls no model.

    Without --server, connectivity is what `serve` would see at start-up with this policy and
    environment: a cloud target without an API key is disabled, one with a key online."""
    if embeddings and (messages_json or tools_json or format_json or prompt is None):
        _fail("--embeddings takes a PROMPT (the input to embed), not --messages, --tools or --response-format")
    body: dict[str, Any] = {"model": model, "input": prompt} if embeddings else {
        "model": model, "messages": _messages(prompt, messages_json)}
    if tools_json is not None:  # what local_tools decides on, with --response-format
        body["tools"] = _json_option("--tools", tools_json, list)
    if format_json is not None:
        body["response_format"] = _json_option("--response-format", format_json, dict)
    hdrs = dict(h.split("=", 1) for h in headers if "=" in h)
    if server:
        if offline or client:
            _fail("--offline and --client describe a local simulation; with --server the server decides")
        result = _explain_remote(server, body, hdrs, api_key)
    else:
        from gateway.explain import LocalView, explain_embeddings_local, explain_local
        from gateway.schema import APIError

        policy = _load(policy_path)
        run = explain_embeddings_local if embeddings else explain_local
        view = LocalView(offline=offline, headers=hdrs, client=client, score_all=score_all)
        try:
            result = asyncio.run(run(policy, policy_path, body, view))
        except APIError as exc:  # what the endpoint would answer before deciding (an unknown model...)
            _fail(f"HTTP {exc.status}: {exc.message}")
    click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


def _explain_remote(server: str, body: dict[str, Any], headers: dict[str, str], api_key: str | None) -> Any:
    import httpx

    url = server.rstrip("/") + "/v1/route/explain"
    if api_key:
        headers = {**headers, "authorization": f"Bearer {api_key}"}
    try:
        resp = httpx.post(url, json=body, headers=headers, timeout=30, trust_env=False)
    except httpx.HTTPError as exc:
        _fail(f"{url}: {type(exc).__name__}: {exc}")
    try:
        data = resp.json()
    except ValueError:
        _fail(f"{url}: HTTP {resp.status_code}, not a JSON answer")
    if resp.status_code != 200:
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        _fail(f"{url}: HTTP {resp.status_code}: {message or data}")
    return data


@main.group()
def policy() -> None:
    """Check and test policies."""


@policy.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--strict", is_flag=True, help="Exit non-zero on warnings too.")
def policy_check(paths: tuple[str, ...], strict: bool) -> None:
    """Validate policy files; errors as file:line:col: message, then warnings (policy lint) as
    file:line: warning: message."""
    from gateway.policy.lint import lint
    from gateway.policy.load import load_policy_source
    from gateway.policy.pace import deadlines_in_force

    bad = warned = 0
    for path in paths:
        try:
            p, source = load_policy_source(path)
        except PolicyError as exc:
            bad += 1
            click.echo(str(exc), err=True)
            continue
        warnings = lint(p, source)
        for w in warnings:
            click.echo(str(w), err=True)
        warned += bool(warnings)
        note = f", {len(warnings)} warning{'s' * (len(warnings) != 1)}" if warnings else ""
        click.echo(f"{path}: ok ({len(p.targets)} targets, {len(p.rules)} rules{note})")
        for line in deadlines_in_force(p):
            click.echo(f"  {line}")
    sys.exit(1 if bad or (strict and warned) else 0)


def policy_json_schema() -> dict[str, Any]:
    from gateway.policy.model import Policy

    schema = Policy.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Hybrid Gateway policy"
    return schema


@policy.command("schema")
def policy_schema() -> None:
    """Print the policy JSON Schema (policies/schema.json is this output)."""
    click.echo(orjson.dumps(policy_json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())


@policy.command("test")
@click.argument("policy_path", type=click.Path())
@click.argument("cases_path", type=click.Path())
def policy_test(policy_path: str, cases_path: str) -> None:
    """Run table-driven routing cases against a policy (like `opa test`)."""
    from gateway.policy_cases import CaseError, format_table, run_cases

    policy = _load(policy_path)
    try:
        results = asyncio.run(run_cases(policy, policy_path, cases_path))
    except CaseError as exc:
        _fail(str(exc))
    click.echo(format_table(results))
    sys.exit(0 if all(r.passed for r in results) else 1)


def _register_optional() -> None:
    try:
        from gateway.classify.difficulty_cli import difficulty
    except ImportError:
        return
    main.add_command(difficulty)


_register_optional()


if __name__ == "__main__":
    main()
