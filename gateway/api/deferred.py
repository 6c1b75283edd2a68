"""Deferred requests: the 202 a deferred request is answered with (chat completions, Messages or
Responses, each in its API's shape), GET /v1/deferred/{id} to fetch its state and answer, and
GET /v1/responses/{id} for one that came in on Responses (docs/operations.md, Deferred requests)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from gateway import pipeline
from gateway.api.deps import authenticate, get_state, request_id_of
from gateway.api.responses import JSON
from gateway.deferred.job import Job
from gateway.deferred.service import PATH
from gateway.deferred.wire import RESPONSES
from gateway.schema import APIError, ErrorResponse
from gateway.state import GatewayState

router = APIRouter()


def accepted(state: GatewayState, prepared: pipeline.Prepared, job: Job) -> JSON:
    """202 with the job (its current state: a repeated Idempotency-Key gets the first job back)."""
    f = prepared.features
    headers = {
        "location": PATH + job.id,
        "x-request-id": prepared.call.request_id,
        "x-hybrid-rule": prepared.decision.rule,
        "x-hybrid-route": "deferred",
        "x-hybrid-connectivity": f.overall_connectivity,
        "x-hybrid-sensitivity": f.sensitivity.level,
        "x-hybrid-redactions": str(len(prepared.vault) if prepared.vault is not None else 0),
    }
    return JSON(state.deferred.view(job), status_code=202, headers=headers)


@router.get(PATH + "{job_id}", responses={404: {"model": ErrorResponse}})
async def get_deferred(job_id: str, request: Request, state: GatewayState = Depends(get_state),
                       client: str | None = Depends(authenticate)) -> JSON:
    job = await state.deferred.lookup(job_id, client)
    if job is None:
        # Unknown, expired, malformed or another client's: one answer, so ids cannot be probed.
        raise APIError(404, "No deferred request with this id (unknown, expired, or not yours).",
                       param="id", code="deferred_not_found")
    return JSON(state.deferred.view(job), headers={"x-request-id": request_id_of(request)})


@router.get(RESPONSES + "/{job_id}", responses={404: {"model": ErrorResponse}})
async def get_response(job_id: str, request: Request, state: GatewayState = Depends(get_state),
                       client: str | None = Depends(authenticate)) -> JSON:
    """A deferred Responses request as a Response object (what `client.responses.retrieve` reads):
    this gateway stores no other response."""
    job = await state.deferred.lookup(job_id, client)
    if job is None or job.wire != RESPONSES:
        raise APIError(404, f"No response with id '{job_id[:100]}': this gateway keeps only deferred ones "
                       "(unknown, expired, or not yours).", param="response_id", code="response_not_found")
    return JSON(state.deferred.view(job), headers={"x-request-id": request_id_of(request)})
