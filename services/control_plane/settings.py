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
    # Bounds on what one POST /jobs may ask for (a refusal is a 422 naming the field).
    job_max_steps: int = Field(1_000_000, ge=1)
    job_max_chain_steps: int = Field(10_000, ge=2)
    job_max_eval_samples: int = Field(50_000, ge=16)  # the paper's FID uses 50K samples
    # Memory one job may need (bytes); unset: the Ray cluster's memory and object store in all when
    # Ray answers, else this machine's memory.
    job_memory_limit_bytes: int | None = Field(None, ge=1)
    # Jobs PENDING or RUNNING at once; beyond, POST /jobs and resume answer 429 with Retry-After.
    max_running_jobs: int = Field(4, ge=1)

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
