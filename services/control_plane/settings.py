"""Control-plane settings, read from ``DKDM_*`` environment variables (or a ``.env`` file) once."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.auth import strong_enough
from services.evaluation import bundled_assets


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DKDM_", env_file=".env", extra="ignore")

    # Bearer token for mutating calls; unset, every mutating call is refused (401): no open writes.
    api_token: SecretStr | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Ray's job-submission address (the head's dashboard port).
    ray_address: str = "http://127.0.0.1:8265"
    # Teachers may only be read from below these folders (no path traversal through the API): the
    # bundled assets, wherever the package is installed, and ./runs of the folder the service starts in.
    model_roots: list[Path] = Field(default_factory=lambda: [bundled_assets(), Path("runs")])
    # Where jobs write: runs_dir/<job id>, below the starting folder unless set. Storage the Ray workers share.
    runs_dir: Path = Path("runs") / "jobs"
    # Environment variables handed to every submitted job (besides DKDM_REDIS_URL).
    job_env: dict[str, str] = {}

    _strong_enough = field_validator("api_token")(strong_enough)

    @field_validator("model_roots", "runs_dir")
    @classmethod
    def _absolute(cls, value: list[Path] | Path) -> list[Path] | Path:
        if isinstance(value, list):
            return [p.resolve() for p in value]
        return value.resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
