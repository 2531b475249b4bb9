"""``POST /v1/feedback``: a user's judgement of an answer, into the audit log by request id
(``cascade suite from-log`` turns it into a label)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cascade.errors import CascadeError
from cascade.serve.errors import counting_refusals, from_exception, parse_body, read_body
from cascade.serve.protocol import FeedbackRequest, FeedbackResponse
from cascade.serve.service import Service

__all__ = ["router"]

router = APIRouter()


@router.post("/v1/feedback")
async def create_feedback(request: Request) -> JSONResponse:
    service: Service = request.app.state.service
    with counting_refusals(service.metrics.refusal):
        client = service.auth.client_for(request.headers, bucket="feedback")
        body = parse_body(await read_body(request, service.server.max_request_bytes),
                          FeedbackRequest)
    try:
        await service.feedback(body.request_id, body.correct, body.expected, client)
    except CascadeError as e:  # no audit log to write it to: said, not a server traceback
        raise from_exception(e) from None
    return JSONResponse(FeedbackResponse(request_id=body.request_id).model_dump(mode="json"))
