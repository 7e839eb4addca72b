"""``ray job submit`` against a head started with ``ray start --head``: the documented entrypoint."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from services.jobs.store import JobStore
from tests.services.conftest import BIN, ROOT, RayHead, cluster_env, ray_head
from tests.services.engine.conftest import engine_spec

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture
def head() -> Iterator[RayHead]:
    with ray_head(num_cpus=2) as h:
        yield h


def test_ray_job_submit_runs_a_job_against_a_given_redis(
    head: RayHead, redis_url: str, tiny_teacher: Path, tmp_path: Path
) -> None:
    spec = engine_spec(tiny_teacher, tmp_path / "out", steps=10, run__checkpoint_every=10)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump()))
    runtime_env = json.dumps({"env_vars": {"DKDM_REDIS_URL": redis_url}})
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", str(ROOT)]
    cmd += ["--runtime-env-json", runtime_env, "--", "python", "-m", "services.engine"]
    cmd += ["--spec", str(spec_file), "--job-id", "submitted", "--quiet"]
    proc = subprocess.run(cmd, env=cluster_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distillation finished: 10 steps" in proc.stdout
    store = JobStore(redis_url, "submitted")
    assert store.state() == "SUCCEEDED" and store.counters()["batches_consumed"] == 10
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 10
