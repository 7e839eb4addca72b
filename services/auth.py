"""Bearer-token checks shared by the control plane and the sampling service (one ``DKDM_API_TOKEN``)."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

MIN_TOKEN_LENGTH = 16

# auto_error off: a missing header must give our 401 with WWW-Authenticate, not FastAPI's 403.
bearer = HTTPBearer(auto_error=False)


def strong_enough(token: SecretStr | None) -> SecretStr | None:
    """The settings validator of ``DKDM_API_TOKEN``: unset is allowed (everything guarded is refused)."""
    if token is not None and len(token.get_secret_value()) < MIN_TOKEN_LENGTH:
        raise ValueError(f"DKDM_API_TOKEN must be at least {MIN_TOKEN_LENGTH} characters")
    return token


def check_bearer(expected: SecretStr | None, credentials: HTTPAuthorizationCredentials | None) -> None:
    """401 unless ``Authorization: Bearer <expected>``; with no token configured, nothing passes."""
    if (
        expected is None
        or credentials is None
        or not hmac.compare_digest(credentials.credentials.encode(), expected.get_secret_value().encode())
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
