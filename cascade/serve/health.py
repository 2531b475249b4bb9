"""``GET /healthz``: 200 once the service is up, with each endpoint's circuit, the drift alarm
per rung (a rung whose alarm is up escalates every answer until it clears), the shared store's
state (reachable, and spend waiting for it), and the config in use with the last reload's
outcome (a refused reload still answers 200: the old config serves).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cascade.serve.service import Service

__all__ = ["router"]

router = APIRouter()


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
        "endpoints": h.get("endpoints", {}),
        "store": h.get("store", {}),
        "audit_dropped": service.audit.dropped if service.audit is not None else 0,
        "config": h.get("config", {}),
    })
