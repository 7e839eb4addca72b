"""Sampling-service settings, read from ``DKDM_*`` variables by ``dkdm serve sampling`` and handed to the
deployments (Serve replicas run on other nodes, whose environment need not hold them)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.auth import strong_enough


class SamplingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DKDM_", env_file=".env", extra="ignore")

    # The control plane's token: sampling needs it too; unset, every sampling request is refused (401).
    api_token: SecretStr | None = None
    # The model registry; no default, so a service never reads some other Redis by accident.
    redis_url: str | None = None
    # Requests one sampler replica runs at once (Serve's max_ongoing_requests): each is CPU-bound.
    sampling_max_ongoing_requests: int = Field(2, ge=1, le=64)
    # Requests waiting for a busy replica; beyond it the answer is 503 + Retry-After, not an unbounded queue.
    sampling_max_queued_requests: int = Field(4, ge=1, le=1024)
    # Retry-After (seconds) on those 503s: about one typical request's time.
    sampling_retry_after_s: int = Field(5, ge=1, le=3600)
    # Budget of one request in samples x network calls x parameters. 2e10 is ~25 s of one CPU core for
    # the 0.28M-parameter student (256 samples x 280 steps); bigger models get proportionally fewer.
    sampling_max_cost: float = Field(2e10, gt=0)

    _strong_enough = field_validator("api_token")(strong_enough)
