"""``ray job submit`` against a head started with ``ray start --head``: the documented entrypoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from services.engine.embedded import free_port
from services.engine.store import JobStore
from tests.conftest import ROOT
from tests.services.engine.conftest import engine_spec

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

BIN = Path(sys.executable).parent


def cluster_env() -> dict[str, str]:
    # The job's `python` must be this environment's; token auth on both sides (head and CLI).
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}


@pytest.fixture
def ray_head() -> Iterator[str]:
    """A separate Ray head on free ports; only this head's processes are stopped afterwards."""
    temp = tempfile.mkdtemp(prefix="dkdm-rh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    args = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", temp]
    args += ["--port", str(free_port()), "--dashboard-port", str(dashboard), "--dashboard-host", "127.0.0.1"]
    args += ["--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    head = subprocess.Popen(
        args, env=cluster_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(address, head)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def wait_for_dashboard(address: str, head: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without the token): the head is up
        except OSError:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(0.5)


def test_ray_job_submit_runs_a_job_against_a_given_redis(
    ray_head: str, redis_url: str, tiny_teacher: Path, tmp_path: Path
) -> None:
    spec = engine_spec(tiny_teacher, tmp_path / "out", steps=10, run__checkpoint_every=10)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump()))
    runtime_env = json.dumps({"env_vars": {"DKDM_REDIS_URL": redis_url}})
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(ROOT)]
    cmd += ["--runtime-env-json", runtime_env, "--", "python", "-m", "services.engine"]
    cmd += ["--spec", str(spec_file), "--job-id", "submitted", "--quiet"]
    proc = subprocess.run(cmd, env=cluster_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distillation finished: 10 steps" in proc.stdout
    store = JobStore(redis_url, "submitted")
    assert store.state() == "SUCCEEDED" and store.counters()["batches_consumed"] == 10
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 10
