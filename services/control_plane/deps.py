"""Dependencies of the routers, as ``Annotated`` aliases."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.control_plane.service import JobService
from services.control_plane.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> JobService:
    return request.app.state.service


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ServiceDep = Annotated[JobService, Depends(get_service)]

_bearer = HTTPBearer(auto_error=False)


def require_token(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Mutating calls need ``Authorization: Bearer <DKDM_API_TOKEN>``; with no token configured, none pass."""
    token = settings.api_token
    if (
        token is None
        or credentials is None
        or not hmac.compare_digest(credentials.credentials.encode(), token.get_secret_value().encode())
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


Authorized = Depends(require_token)
