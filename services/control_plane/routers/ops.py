"""/healthz and /metrics: open to probes and scrapers (no token)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.control_plane.deps import ServiceDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz(service: ServiceDep, response: Response) -> dict[str, str]:
    try:
        service.r.ping()
    except Exception as exc:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"status": "unavailable", "redis": str(exc)}
    return {"status": "ok", "redis": "ok"}


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
