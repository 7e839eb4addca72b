"""Sampling-service settings, read from ``DKDM_*`` variables by ``dkdm serve sampling`` and handed to the
deployments (Serve replicas run on other nodes, whose environment need not hold them)."""

from __future__ import annotations

import math

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dkdm_core.runtime import check_device
from services.auth import strong_enough


class SamplingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DKDM_", env_file=".env", extra="ignore")

    # The control plane's token: sampling needs it too; unset, every sampling request is refused (401).
    api_token: SecretStr | None = None
    # The model registry; no default, so a service never reads some other Redis by accident.
    redis_url: str | None = None
    # Where a sampler replica runs its models: auto, cpu, cuda or cuda:N, the rule of every command. Resolved
    # inside the replica (the process that deploys the app may have no GPU); there, auto is a GPU only when
    # Ray gave the replica one, and cuda:N counts the GPUs Ray gave it, from 0.
    sampling_device: str = "auto"
    # GPUs Ray reserves for each sampler replica (a fraction shares one). Default: 1 for cuda or cuda:N,
    # else 0, so a sampler never holds a GPU that training jobs on the cluster may need unless asked to.
    sampling_gpus_per_replica: float | None = Field(None, ge=0)
    # Requests one sampler replica runs at once (Serve's max_ongoing_requests): each is compute-bound.
    sampling_max_ongoing_requests: int = Field(2, ge=1, le=64)
    # Requests waiting for a busy replica; beyond it the answer is 503 + Retry-After, not an unbounded queue.
    sampling_max_queued_requests: int = Field(4, ge=1, le=1024)
    # Retry-After (seconds) on those 503s: about one typical request's time.
    sampling_retry_after_s: int = Field(5, ge=1, le=3600)
    # Budget of one request in samples x network calls x parameters. 2e10 is ~25 s of one CPU core for
    # the 0.28M-parameter student (256 samples x 280 steps); bigger models get proportionally fewer.
    sampling_max_cost: float = Field(2e10, gt=0)

    _strong_enough = field_validator("api_token")(strong_enough)
    _check_device = field_validator("sampling_device")(check_device)

    @field_validator("sampling_gpus_per_replica", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        # docker-compose and helm pass the variable through even when left unset, as "".
        return None if value == "" else value

    @property
    def gpus_per_replica(self) -> float:
        """What each sampler replica asks Ray for: the setting, or 1 when the device names CUDA."""
        if self.sampling_gpus_per_replica is not None:
            return self.sampling_gpus_per_replica
        return 1.0 if self.sampling_device.startswith("cuda") else 0.0

    @model_validator(mode="after")
    def _gpus_fit_the_device(self) -> SamplingSettings:
        gpus, device = self.gpus_per_replica, self.sampling_device
        if device == "cpu" and gpus > 0:
            raise ValueError(f"sampling_gpus_per_replica = {gpus:g} with device cpu reserves GPUs no one uses")
        if device.startswith("cuda"):
            # A replica sees only the GPUs Ray gives it (CUDA_VISIBLE_DEVICES), numbered from 0; one given
            # none must not use a GPU Ray may have handed to a training job.
            index = int(device.partition(":")[2] or 0)
            if gpus == 0 or index >= math.ceil(gpus):
                least = f"at least {index + 1}" if index else "above 0"
                raise ValueError(
                    f"device {device!r} needs sampling_gpus_per_replica {least}: a sampler replica uses only the "
                    f"GPUs Ray gives it, numbered from 0 (set: {gpus:g})"
                )
        return self
