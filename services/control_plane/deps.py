"""Dependencies of the routers, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials

from services.auth import bearer, check_bearer
from services.control_plane.service import JobService
from services.control_plane.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> JobService:
    return request.app.state.service


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ServiceDep = Annotated[JobService, Depends(get_service)]


def require_token(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """Mutating calls need ``Authorization: Bearer <DKDM_API_TOKEN>``; with no token configured, none pass."""
    check_bearer(settings.api_token, credentials)


Authorized = Depends(require_token)
