"""Fixtures of the engine tests: a real local Ray started once per session (redis-server: ../conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dkdm_core.spec import DistillSpec
from tests.services.conftest import ray_head


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A Ray head for the whole session with 4 logical CPUs (2 physical cores here: tests oversubscribe
    on purpose so 2 replicas and a student fit), this process connected to it as the driver. Started
    with `ray start` on ports chosen by ray_head, so it cannot collide with another session's Ray."""
    import ray

    with ray_head(num_cpus=4, auth=False) as head:  # this process connects without a token
        ray.init(address=head.gcs, namespace="dkdm", logging_level="WARNING")
        try:
            yield
        finally:
            ray.shutdown()


def engine_spec(teacher: Path, out: Path, **overrides: Any) -> DistillSpec:
    """A small Ray-engine job on the tiny teacher: 10-step chain, b = 16, pool of 64 samples."""
    data: dict[str, Any] = {
        "teacher": str(teacher),
        "student": {"arch": "unet-tiny"},
        "pool": {"strategy": "dynamic", "rho": 0.4, "chain_steps": 10},
        "optim": {"batch_size": 16, "lr": 1e-3, "warmup_steps": 5},
        "teacher_batch_size": 64,
        "steps": 30,
        "seed": 3,
        "engine": "ray",
        "out": str(out),
        "run": {"log_every": 1, "checkpoint_every": 10, "eval_samples": 16, "sample_steps": 5, "threads": 1},
        "ray": {"teacher_cpus": 1, "queue_size": 2, "lease_timeout_s": 30},
    }
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return DistillSpec.model_validate(data)
