"""``GET /healthz``: 200 once the service is up, with each endpoint's circuit, the drift alarm
per rung (a rung whose alarm is up escalates every answer until it clears), the shared store's
state (reachable, and spend waiting for it), and the config in use with the last reload's
outcome (a refused reload still answers 200: the old config serves).

It needs no key (probes have none), so a password or key written into a rung's ``base_url``
(a proxy's ``user:password@``, an ``?api-key=`` query) is masked in what it shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cascade.secrets import mask_credentials
from cascade.serve.service import Service

__all__ = ["router"]

router = APIRouter()

def _masked_endpoints(endpoints: Mapping[str, Any]) -> dict[str, Any]:
    return {mask_credentials(k): v for k, v in endpoints.items()}


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    h = await service.health()
    drift = dict(h.get("drift", {}))
    alarms = sorted(rung for rung, d in drift.items() if d.get("alarm"))
    return JSONResponse({
        "status": "ok",
        "ladder": service.name,
        "drift_alarms": alarms,
        "drift": drift,
        "endpoints": _masked_endpoints(h.get("endpoints", {})),
        "store": h.get("store", {}),
        "audit_dropped": service.audit.dropped if service.audit is not None else 0,
        "config": _masked_config(h.get("config", {})),
    })


def _masked_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A reload error may quote a URL from the refused file."""
    out = dict(config)
    if isinstance(out.get("last_reload_error"), str):
        out["last_reload_error"] = mask_credentials(out["last_reload_error"])
    return out
