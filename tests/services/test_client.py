"""`dkdm jobs` and ``services.client`` against a real control plane over real HTTP, with a real
redis-server: errors in one line, records followed to their end, and (slow) real jobs on a Ray head."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests
import yaml

from services.client import ApiError, Client, JobView, Unreachable
from services.control_plane.service import JobView as ServerJobView
from services.control_plane.settings import Settings
from services.engine.embedded import RedisServer
from services.jobs.store import JobStore, ModelRegistry
from tests.conftest import run_dkdm
from tests.services.conftest import (
    BIN,
    ROOT,
    cluster_env,
    free_port,
    ray_head,
    redis_server,
    running,
    start_process,
    wait_for_http,
)
from tests.services.control_plane.conftest import TOKEN, serve_api

JOB_ID = "0123456789ab"


@pytest.fixture
def own_redis() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def api(own_redis: str, tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The control plane with Ray unreachable (nothing listens at its address): records are written to
    Redis by hand, or a submission fails with 503. The CLI finds it through DKDM_API_URL."""
    closed = f"http://127.0.0.1:{free_port()}"
    settings = Settings(
        api_token=TOKEN,
        redis_url=own_redis,
        ray_address=closed,
        model_roots=[tiny_teacher.parent],
        runs_dir=tmp_path / "jobs",
    )
    with serve_api(settings) as url:
        monkeypatch.setenv("DKDM_API_URL", url)
        monkeypatch.setenv("DKDM_API_TOKEN", TOKEN)
        yield url


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The command's error, checked to be one line of its own at the end of stderr."""
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("dkdm: error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return last.removeprefix("dkdm: error: ")


def write_config(path: Path, **spec: Any) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_client_reads_only_fields_the_server_sends() -> None:
    assert set(JobView.model_fields) <= set(ServerJobView.model_fields)  # the rest is kept as extra fields


def test_a_422_is_one_line_naming_the_field(
    api: str, tiny_teacher: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # out and engine, as every bundled config has them, are left out with a warning, not refused.
    config = write_config(tmp_path / "job.yaml", teacher=str(tiny_teacher), out="runs/x", engine="local", steps=5)
    proc = run_dkdm("jobs", "submit", "--config", str(config), "--set", "optim.batch_size=0", check=False)
    assert proc.returncode == 2
    assert error_line(proc) == "422 optim.batch_size: Input should be greater than or equal to 1"
    assert f"out and engine from {config} left out" in caplog.text
    proc = run_dkdm("jobs", "submit", "--config", str(config), "--set", "stpes=3", "--set", "pool.rho=99", check=False)
    assert error_line(proc).startswith("422 ") and "stpes: Extra inputs are not permitted" in error_line(proc)
    assert "pool.rho: " in error_line(proc)  # every field the API refused, in the one line
    assert requests.get(f"{api}/jobs").json() == []


def test_service_errors_are_one_line_with_status_one(
    api: str, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "job.yaml", teacher=str(tiny_teacher), steps=5, optim={"batch_size": 16})
    proc = run_dkdm("jobs", "submit", "--config", str(config), check=False)
    assert proc.returncode == 1 and error_line(proc).startswith("503 could not submit job ")  # Ray is unreachable
    assert run_dkdm("jobs", "status", JOB_ID, check=False).returncode == 2
    assert error_line(run_dkdm("jobs", "status", JOB_ID, check=False)) == f"404 no job {JOB_ID}"
    assert error_line(run_dkdm("jobs", "cancel", "NOT-AN-ID", check=False)).startswith("422 job_id: ")
    monkeypatch.setenv("DKDM_API_TOKEN", "wrong-token-0123456789")
    proc = run_dkdm("jobs", "cancel", JOB_ID, check=False)
    assert proc.returncode == 2
    assert error_line(proc) == "401 missing or invalid bearer token (the token is read from DKDM_API_TOKEN)"


def test_connection_refused_is_one_line_naming_the_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DKDM_API_URL", closed)
    monkeypatch.setenv("DKDM_SAMPLE_URL", closed)
    proc = run_dkdm("jobs", "list", check=False)
    assert proc.returncode == 1
    assert error_line(proc) == f"cannot reach the control plane at {closed}/jobs (connection refused)"
    proc = run_dkdm("jobs", "sample", "job-x", "--num", "4", "--out", str(tmp_path / "s.npz"), check=False)
    expected = f"cannot reach the sampling service at {closed}/v1/models/job-x/samples (connection refused)"
    assert proc.returncode == 1 and error_line(proc) == expected
    with pytest.raises(Unreachable, match="connection refused"):
        Client(url=closed).jobs()


def advance(store: JobStore, total: int, final: str, error: str = "") -> threading.Thread:
    """The engine's part, played on the record: a step every 20 ms, then the final state."""

    def run() -> None:
        for step in range(1, total + 1):
            time.sleep(0.02)
            store.update(step=step)
        store.set_state(final, error=error)  # type: ignore[arg-type]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_status_watch_follows_a_job_to_its_end(api: str, own_redis: str) -> None:
    store = JobStore(own_redis, JOB_ID)
    store.create({"steps": 20}, state="RUNNING", total_steps=20)
    store.set_metrics({"loss": 0.25})
    thread = advance(store, 20, "SUCCEEDED")
    proc = run_dkdm("jobs", "status", JOB_ID, "--watch", "--every", "0.05")
    thread.join()
    assert proc.stdout.splitlines()[0].split() == [JOB_ID, "SUCCEEDED", "20/20", "100%"]
    assert "loss: 0.25" in proc.stdout
    assert "20/20" in proc.stderr and "SUCCEEDED" in proc.stderr  # the bar ends full, with the state
    (line,) = run_dkdm("jobs", "list").stdout.splitlines()
    assert line.split()[:3] == [JOB_ID, "SUCCEEDED", "20/20"]
    shown = json.loads(run_dkdm("jobs", "status", JOB_ID, "--json").stdout)
    assert shown == requests.get(f"{api}/jobs/{JOB_ID}").json()
    assert [v["id"] for v in json.loads(run_dkdm("jobs", "list", "--json").stdout)] == [JOB_ID]


def test_status_watch_of_a_failed_job_ends_with_its_reason(api: str, own_redis: str) -> None:
    store = JobStore(own_redis, JOB_ID)
    store.create({"steps": 5}, state="RUNNING", total_steps=5)
    thread = advance(store, 2, "FAILED", error="the teacher went away")
    proc = run_dkdm("jobs", "status", JOB_ID, "--watch", "--every", "0.05", check=False)
    thread.join()
    assert proc.returncode == 1
    assert error_line(proc) == f"job {JOB_ID} ended FAILED: the teacher went away"


def test_cancel_and_scale_reach_the_job_record(api: str, own_redis: str) -> None:
    store = JobStore(own_redis, JOB_ID)
    store.create({"steps": 5}, state="RUNNING", total_steps=5)
    assert run_dkdm("jobs", "scale", JOB_ID, "3").stdout.split()[:2] == [JOB_ID, "RUNNING"]
    assert store.control()["teacher_replicas"] == "3"
    assert error_line(run_dkdm("jobs", "scale", JOB_ID, "0", check=False)).startswith("422 teacher_replicas: ")
    run_dkdm("jobs", "cancel", JOB_ID)
    assert store.cancel_requested()  # the engine stops at its next log step
    pending = JobStore(own_redis, "ba9876543210")
    pending.create({"steps": 5}, state="PENDING", total_steps=5)
    assert run_dkdm("jobs", "cancel", "ba9876543210").stdout.split()[:2] == ["ba9876543210", "CANCELLED"]
    with pytest.raises(ApiError) as info:
        Client(url=api, token=TOKEN).scale(JOB_ID, 0)
    assert info.value.status == 422 and str(info.value).startswith("422 teacher_replicas: ")


# A real job on a real Ray head ----------------------------------------------------------------------


@contextlib.contextmanager
def control_plane(env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    args = [str(BIN / "dkdm"), "serve", "api", "--port", str(port)]
    with running(start_process("dkdm serve api", args, env)) as service:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", service)
        yield url


def tiny_job(teacher: Path, path: Path) -> Path:
    return write_config(
        path,
        teacher=str(teacher),
        engine="local",  # as in the bundled configs: left out, the service runs it on Ray
        pool={"chain_steps": 10},
        optim={"batch_size": 16, "warmup_steps": 5},
        run={"log_every": 1, "checkpoint_every": 10, "eval_samples": 16, "sample_steps": 5},
        ray={"teacher_cpus": 1, "student_cpus": 1},
    )


def wait_until(what: str, fn: Any, timeout: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


@pytest.mark.slow
@pytest.mark.e2e
def test_jobs_on_a_ray_head_submit_watch_list_cancel_and_sample(
    tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with redis_server() as server, ray_head(num_cpus=4) as head:
        env = cluster_env(
            DKDM_API_TOKEN=TOKEN,
            DKDM_REDIS_URL=server.url,
            DKDM_RAY_ADDRESS=head.dashboard,
            DKDM_MODEL_ROOTS=json.dumps([str(tiny_teacher.parent)]),
            DKDM_RUNS_DIR=str(tmp_path / "jobs"),
            RAY_ADDRESS=head.gcs,
        )
        with control_plane(env) as api:
            monkeypatch.setenv("DKDM_API_URL", api)
            monkeypatch.setenv("DKDM_API_TOKEN", TOKEN)
            config = tiny_job(tiny_teacher, tmp_path / "job.yaml")
            job_id = run_dkdm("jobs", "submit", "--config", str(config), "--set", "steps=20").stdout.strip()
            watched = run_dkdm("jobs", "status", job_id, "--watch")
            assert watched.stdout.split()[:3] == [job_id, "SUCCEEDED", "20/20"], watched.stderr
            assert run_dkdm("jobs", "list").stdout.split()[:2] == [job_id, "SUCCEEDED"]

            long_id = run_dkdm("jobs", "submit", "--config", str(config), "--set", "steps=100000").stdout.strip()
            client = Client.from_env()
            wait_until("the long job's first step", lambda: client.job(long_id).step >= 1)
            run_dkdm("jobs", "cancel", long_id)
            stopped = run_dkdm("jobs", "status", long_id, "--watch", check=False)
            assert error_line(stopped).startswith(f"job {long_id} ended CANCELLED"), stopped.stderr
            assert ModelRegistry(redis.Redis.from_url(server.url, decode_responses=True)).get(f"job-{job_id}")
        sample(env, f"job-{job_id}", tmp_path, monkeypatch)


def sample(env: dict[str, str], model: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    cmd = [str(BIN / "dkdm"), "serve", "sampling", "--port", str(port)]
    deployed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    monkeypatch.setenv("DKDM_SAMPLE_URL", f"http://127.0.0.1:{port}")
    out, grid = tmp / "samples" / "s.npz", tmp / "samples" / "s.png"

    def answered() -> subprocess.CompletedProcess | None:
        proc = run_dkdm("jobs", "sample", model, "--num", "6", "--steps", "5", "--out", str(out), "--grid", str(grid))
        return proc if proc.returncode == 0 else None  # the HTTP proxy starts a moment after the deployment

    wait_until("the sampling service", lambda: answered() if _proxy_up(port) else None, 120)
    with np.load(out, allow_pickle=False) as data:
        assert data["arr_0"].shape == (6, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = run_dkdm("jobs", "sample", model, "--num", "100000", "--out", str(out), check=False)
    assert proc.returncode == 2 and error_line(proc).startswith("422 num: ")


def _proxy_up(port: int) -> bool:
    with contextlib.suppress(requests.ConnectionError):
        return requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 200
    return False
