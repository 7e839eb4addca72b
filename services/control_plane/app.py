"""The control plane's FastAPI app factory and its server entry point (``dkdm serve api``)."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from services.control_plane.launcher import RayLauncher
from services.control_plane.metrics import EngineCollector
from services.control_plane.routers import jobs, models, ops
from services.control_plane.service import JobService
from services.control_plane.settings import Settings, get_settings
from services.jobs.client import redis_client

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="dkdm control plane",
        version="0.1.0",
        description="Start data-free distillation jobs on Ray, follow them, list the distilled students.",
    )
    client = redis_client(settings.redis_url)
    launcher = RayLauncher(settings.ray_address, {"DKDM_REDIS_URL": settings.redis_url, **settings.job_env})
    app.state.settings = settings
    app.state.service = JobService(settings, client, launcher)
    try:  # records a wiped Redis lost come back from their durable copies
        rebuilt = app.state.service.recover_all()
        if rebuilt:
            log.warning("rebuilt %d job records from their durable copies: %s", len(rebuilt), ", ".join(rebuilt))
    except redis.RedisError as exc:
        log.warning("job records not checked against their durable copies: %s", exc)
    app.state.metrics_registry = CollectorRegistry()
    app.state.metrics_registry.register(EngineCollector(client, settings.redis_url))
    for router in (jobs.router, models.router, ops.router):
        app.include_router(router)

    @app.exception_handler(redis.RedisError)
    def redis_unavailable(request: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse({"detail": f"job store unavailable: {exc}"}, status_code=503)

    return app


def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(), host=host, port=port, log_level="info")
