"""/jobs: start, list, inspect and cancel distillation jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status

from services.control_plane.deps import Authorized, ServiceDep
from services.control_plane.service import (
    Conflict,
    InvalidField,
    JobCreated,
    JobRequest,
    JobView,
    ScaleRequest,
    SubmitError,
    TooManyJobs,
)

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", description="the id POST /jobs returned")]


# A full cluster frees up when a job ends: minutes, not seconds.
RETRY_AFTER_S = 60


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")


def _too_many(exc: TooManyJobs) -> HTTPException:
    # 429, not 422: the spec is valid and the same request succeeds once a running job ends.
    return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)})


@router.post("", status_code=status.HTTP_202_ACCEPTED, dependencies=[Authorized])
def create_job(request: JobRequest, service: ServiceDep) -> JobCreated:
    try:
        return service.create(request)
    except InvalidField as exc:
        detail = [{"loc": ["body", *f.split(".")], "msg": str(exc), "type": "value_error"} for f in exc.fields]
        raise HTTPException(422, detail) from exc
    except TooManyJobs as exc:
        raise _too_many(exc) from exc
    except SubmitError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc


@router.get("")
def list_jobs(service: ServiceDep) -> list[JobView]:
    return service.list()


@router.get("/{job_id}")
def get_job(job_id: JobId, service: ServiceDep) -> JobView:
    view = service.view(job_id)
    if view is None:
        raise _not_found(job_id)
    return view


@router.post("/{job_id}/scale", dependencies=[Authorized])
def scale_job(job_id: JobId, request: ScaleRequest, service: ServiceDep) -> JobView:
    """Add or remove teacher replicas of a running job; the engine applies it within a second."""
    view = service.scale(job_id, request.teacher_replicas)
    if view is None:
        raise _not_found(job_id)
    return view


@router.post("/{job_id}/cancel", dependencies=[Authorized])
def cancel_job(job_id: JobId, service: ServiceDep) -> JobView:
    view = service.cancel(job_id)
    if view is None:
        raise _not_found(job_id)
    return view


@router.post("/{job_id}/resume", status_code=status.HTTP_202_ACCEPTED, dependencies=[Authorized])
def resume_job(job_id: JobId, service: ServiceDep) -> JobView:
    """Run a FAILED or CANCELLED job again under a new submission, from its newest checkpoint:
    409 while it is pending or running, or once it succeeded."""
    try:
        view = service.resume(job_id)
    except Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except TooManyJobs as exc:
        raise _too_many(exc) from exc
    except SubmitError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    if view is None:
        raise _not_found(job_id)
    return view
