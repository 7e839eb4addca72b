"""Where sampler replicas run: the device and GPU settings, the Ray options they give the deployment and
the device a replica resolves. Cheap checks without a cluster; the real app samples on the CPU in
test_sampling.py."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from services.serving.app import cluster_gpu_error, replica_device, sampler_deployment
from services.serving.settings import SamplingSettings


@pytest.fixture(autouse=True)
def no_sampling_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read DKDM_* variables: the machine's own must not decide these tests."""
    for name in ("DKDM_SAMPLING_DEVICE", "DKDM_SAMPLING_GPUS_PER_REPLICA"):
        monkeypatch.delenv(name, raising=False)


def test_by_default_a_replica_asks_for_no_gpu() -> None:
    settings = SamplingSettings()
    assert settings.sampling_device == "auto" and settings.gpus_per_replica == 0
    assert sampler_deployment(settings).ray_actor_options == {"num_cpus": 1}


@pytest.mark.parametrize(
    ("device", "gpus", "asked"), [("cuda", None, 1.0), ("cuda:0", 0.5, 0.5), ("cuda:1", 2, 2.0), ("auto", 0.25, 0.25)]
)
def test_a_replica_asks_ray_for_the_gpus_its_device_needs(device: str, gpus: float | None, asked: float) -> None:
    settings = SamplingSettings(sampling_device=device, sampling_gpus_per_replica=gpus)
    assert sampler_deployment(settings).ray_actor_options == {"num_cpus": 1, "num_gpus": asked}


def test_the_settings_are_read_from_dkdm_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DKDM_SAMPLING_DEVICE", "cuda")
    monkeypatch.setenv("DKDM_SAMPLING_GPUS_PER_REPLICA", "0.5")
    assert sampler_deployment(SamplingSettings()).ray_actor_options["num_gpus"] == 0.5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sampling_device": "gpu"}, "auto, cpu, cuda, cuda:N"),
        ({"sampling_device": "cuda:7"}, "cuda:7' needs sampling_gpus_per_replica at least 8"),
        ({"sampling_device": "cuda", "sampling_gpus_per_replica": 0}, "above 0"),
        ({"sampling_device": "cpu", "sampling_gpus_per_replica": 1}, "reserves GPUs no one uses"),
        ({"sampling_gpus_per_replica": -1}, "greater than or equal to 0"),
    ],
)
def test_settings_that_cannot_work_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        SamplingSettings(**fields)


def test_a_replica_uses_a_gpu_only_when_ray_gave_it_one() -> None:
    assert replica_device("auto", []) == torch.device("cpu")
    assert replica_device("cpu", [0]) == torch.device("cpu")
    if torch.cuda.is_available():
        assert replica_device("auto", [0]).type == "cuda"
    else:  # a GPU Ray reports that torch cannot see: a clear error, not a silent CPU fallback
        with pytest.raises(ValueError, match="no CUDA device"):
            replica_device("auto", [0])


def test_a_cluster_without_the_gpus_asked_for_is_named() -> None:
    assert cluster_gpu_error(SamplingSettings(), 0.0) is None
    assert cluster_gpu_error(SamplingSettings(sampling_device="cuda"), 1.0) is None
    error = cluster_gpu_error(SamplingSettings(sampling_device="cuda"), 0.0)
    assert error is not None and "asks Ray for 1 GPU(s)" in error and "the cluster has 0" in error


def test_an_empty_gpus_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-compose and helm pass DKDM_SAMPLING_GPUS_PER_REPLICA through as "" when it is left unset."""
    monkeypatch.setenv("DKDM_SAMPLING_GPUS_PER_REPLICA", "")
    monkeypatch.setenv("DKDM_SAMPLING_DEVICE", "cuda")
    assert SamplingSettings().gpus_per_replica == 1
