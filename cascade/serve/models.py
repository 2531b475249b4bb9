"""``GET /v1/models``: the ladders this service answers for (one per process today)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cascade.serve.errors import APIError, counting_refusals
from cascade.serve.protocol import ModelCard, ModelList
from cascade.serve.service import Service

__all__ = ["router"]

router = APIRouter()


def _card(service: Service) -> ModelCard:
    return ModelCard(id=service.name, display_name=service.name,
                     rungs=[r.label for r in service.config.rungs])


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    with counting_refusals(service.metrics.refusal):
        service.auth.client_for(request.headers, bucket=None)
    card = _card(service)
    return JSONResponse(ModelList(data=[card], first_id=card.id, last_id=card.id)
                        .model_dump(mode="json"))


@router.get("/v1/models/{model}")
async def get_model(model: str, request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    with counting_refusals(service.metrics.refusal):
        service.auth.client_for(request.headers, bucket=None)
        if model != service.name:
            raise APIError(404, f"the model {model!r} does not exist", param="model",
                           code="model_not_found")
    return JSONResponse(_card(service).model_dump(mode="json"))
