"""/models: the distilled students the sampling service serves."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from services.control_plane.deps import ServiceDep

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(service: ServiceDep) -> dict[str, dict[str, Any]]:
    return service.models()
