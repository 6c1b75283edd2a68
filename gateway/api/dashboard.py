"""A live dashboard: `/dashboard` (plain HTML + JS from gateway/static, no CDN) and its data feed.

`/dashboard/data` is a small JSON summary read from the same Prometheus registry as `/metrics`
(so the two never disagree) plus the connectivity monitor and engine stats. It holds counters
and names chosen by the policy author, never request content, so it is as public as `/metrics`.
The page polls it and computes rates over time in the browser: the server keeps no history.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from gateway.api.deps import get_state
from gateway.api.responses import JSON
from gateway.schema import APIError
from gateway.state import GatewayState

router = APIRouter()

STATIC = Path(__file__).resolve().parents[1] / "static"
_STARTED = time.time()
# Files the page may load; anything else under /dashboard/ is a 404, never a path on disk.
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/assets/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> FileResponse:
    if name not in _ASSETS:
        raise APIError(404, f"No dashboard asset {name!r}.", code="not_found")
    return FileResponse(STATIC / name, media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})


def _samples(state: GatewayState) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus samples by sample name (e.g. `hybrid_requests_total`)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in state.metrics.registry.collect():
        for s in family.samples:
            out[s.name].append((dict(s.labels), float(s.value)))
    return out


def _sum_by(samples: list[tuple[dict[str, str], float]], *keys: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for labels, value in samples:
        totals["/".join(labels.get(k, "") for k in keys)] += value
    return dict(totals)


def summary(state: GatewayState) -> dict[str, Any]:
    s = _samples(state)
    rt = state.runtime
    kinds = {name: ("cloud" if rt.policy.is_cloud(name) else "local") for name in rt.policy.targets}
    by_route = _sum_by(s["hybrid_requests_total"], "route")
    by_kind: dict[str, float] = defaultdict(float)
    for route, n in by_route.items():
        by_kind[kinds.get(route, "none")] += n  # "none": blocked or failed before any target
    lat_sum = _sum_by(s["hybrid_request_duration_seconds_sum"], "route")
    lat_count = _sum_by(s["hybrid_request_duration_seconds_count"], "route")
    monitor = rt.monitor
    return {
        "time": time.time(),
        "uptime_s": time.time() - _STARTED,
        "policy": rt.source,
        "policy_error": state.policy_error,
        "targets": kinds,
        "requests": {
            "total": sum(by_route.values()),
            "by_route": by_route,
            "by_kind": dict(by_kind),
            "by_rule": _sum_by(s["hybrid_requests_total"], "rule"),
            "by_status": _sum_by(s["hybrid_requests_total"], "status"),
        },
        "mean_latency_ms": {r: 1000 * lat_sum[r] / n for r, n in lat_count.items() if n},
        "fallbacks": {
            "total": sum(v for _, v in s["hybrid_fallbacks_total"]),
            "by_path": _sum_by(s["hybrid_fallbacks_total"], "source", "to"),
            "by_reason": _sum_by(s["hybrid_fallbacks_total"], "reason"),
        },
        "redactions": {
            "total": sum(v for _, v in s["hybrid_redactions_total"]),
            "by_entity": _sum_by(s["hybrid_redactions_total"], "entity_type"),
        },
        "tokens": _sum_by(s["hybrid_tokens_total"], "route", "kind"),
        "connectivity": {
            name: {"state": h.effective, "forced": h.force != "auto", "disabled": h.disabled,
                   "since": h.last_change, "last_error": h.last_error, "probes": h.probes}
            for name, h in monitor.health.items()
        },
        "engines": {
            target: {stat: value for labels, value in s["hybrid_engine_stat"] if labels.get("target") == target
                     for stat in [labels.get("stat", "")]}
            for target in {labels.get("target", "") for labels, _ in s["hybrid_engine_stat"]}
        },
    }


@router.get("/dashboard/data")
async def dashboard_data(state: GatewayState = Depends(get_state)) -> JSON:
    return JSON(summary(state), headers={"Cache-Control": "no-store"})
