"""The whole service on loopback with real processes: redis-server, a Ray head (`ray start`), the control
plane (`dkdm serve api`), Ray Serve sampling (`dkdm serve sampling`) and a Prometheus scraping it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests

from services.jobs import keys
from services.jobs.store import JobStore, ModelRegistry
from tests.conftest import run_dkdm
from tests.services.conftest import (
    BIN,
    ROOT,
    RayHead,
    Service,
    cluster_env,
    free_port,
    http_service,
    ray_head,
    redis_server,
    running,
    start_process,
    wait_for_http,
)
from tests.services.control_plane.conftest import TOKEN

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def control_plane(env: dict[str, str], port: int) -> Iterator[Service]:
    args = [str(BIN / "dkdm"), "serve", "api", "--port", str(port)]
    # The port is fixed (the restarted control plane must answer where the first one did): no retry.
    with running(start_process("dkdm serve api", args, env)) as service:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", service)
        yield service


@contextlib.contextmanager
def prometheus(target: str, tmp: Path) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is installed by `make install` (Debian package)"
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        f"scrape_configs: [{{job_name: dkdm-control-plane, static_configs: [{{targets: ['{target}']}}]}}]\n"
    )
    url = ""

    def make_args() -> tuple[list[str], str]:
        nonlocal url
        url = f"http://127.0.0.1:{free_port()}"
        args = [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}"]
        return [*args, f"--web.listen-address={url.removeprefix('http://')}"], f"{url}/-/ready"

    with http_service("prometheus", make_args, dict(os.environ)):
        yield url


def poll(what: str, fn: Any, timeout: float = 300.0, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def test_post_a_job_restart_the_api_sample_the_student_and_scrape_metrics(tiny_teacher: Path, tmp_path: Path) -> None:
    with redis_server() as server, ray_head(num_cpus=4) as head:
        run(head, server.url, tiny_teacher, tmp_path)


def run(head: RayHead, redis_url: str, teacher: Path, tmp: Path) -> None:
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    env = cluster_env(
        DKDM_API_TOKEN=TOKEN,
        DKDM_REDIS_URL=redis_url,
        DKDM_RAY_ADDRESS=head.dashboard,
        DKDM_MODEL_ROOTS=json.dumps([str(teacher.parent)]),
        DKDM_RUNS_DIR=str(tmp / "jobs"),
        RAY_ADDRESS=head.gcs,
        DKDM_MAX_RUNNING_JOBS="2",
    )
    job = {
        "teacher": str(teacher),
        "steps": 20,
        "pool": {"chain_steps": 10},
        "optim": {"batch_size": 16, "warmup_steps": 5},
        "run": {"log_every": 1, "checkpoint_every": 10, "eval_samples": 16, "sample_steps": 5},
        "ray": {"teacher_cpus": 1, "student_cpus": 1},
    }
    with prometheus(f"127.0.0.1:{port}", tmp) as prom:
        with control_plane(env, port):
            response = requests.post(f"{api}/jobs", json=job, headers=AUTH)
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            poll("the first step", lambda: requests.get(f"{api}/jobs/{job_id}").json()["step"] >= 1)
        # The control plane is gone mid-job; the job is not. A new control plane sees the same record.
        with control_plane(env, port):
            view = requests.get(f"{api}/jobs/{job_id}").json()
            assert view["state"] in ("RUNNING", "SUCCEEDED") and view["spec"]["steps"] == 20
            done = poll(
                "the job to end",
                lambda: (v := requests.get(f"{api}/jobs/{job_id}").json())["state"] not in ("PENDING", "RUNNING") and v,
            )
            assert done["state"] == "SUCCEEDED", done
            assert done["step"] == 20 and done["progress"] == 1.0 and done["checkpoints"]
            assert done["counters"]["batches_consumed"] == 20
            assert done["metrics"]["teacher_fd_floor"] < done["metrics"]["teacher_fd_ceiling"]  # the quality figure
            assert f"job-{job_id}" in requests.get(f"{api}/models").json()
            # Prometheus scraped the job's progress from the control plane.
            query = f'dkdm_job_progress_ratio{{job_id="{job_id}"}}'

            figure = f'dkdm_job_teacher_fd{{figure="fd",job_id="{job_id}"}}'
            exported = requests.get(f"{api}/metrics").text
            assert figure in exported, "|".join(line for line in exported.splitlines() if "teacher_fd" in line)

            def scraped() -> list[dict[str, Any]]:
                result = requests.get(f"{prom}/api/v1/query", params={"query": query}).json()["data"]["result"]
                return result if result and float(result[0]["value"][1]) == 1.0 else []

            assert poll("Prometheus to scrape the finished job", scraped, 60)
            beating = live_jobs_ray_never_heard_of(api, redis_url)
            admission_takes_the_last_place_once(api, job, beating)
        # An O2MKD router and a one-step BOOT student, registered by hand, are served the same way.
        registry = ModelRegistry(redis.Redis.from_url(redis_url, decode_responses=True))
        for method, extra in (("o2mkd", ["--set", "o2mkd.students=2"]), ("boot", [])):
            out = tmp / method
            run_dkdm(
                "distill",
                "--steps",
                "4",
                "--out",
                str(out),
                "--quiet",
                "--set",
                f"teacher={teacher}",
                "--set",
                f"method={method}",
                "--set",
                "pool.chain_steps=10",
                "--set",
                "optim.batch_size=16",
                "--set",
                "run.eval_samples=16",
                "--set",
                "run.sample_steps=4",
                *extra,
            )
            registry.register(method, str(out))
        sample(env, f"job-{job_id}", extra_models=["o2mkd", "boot"])


def live_jobs_ray_never_heard_of(api: str, redis_url: str) -> JobStore:
    """A RUNNING record whose submission this Ray cluster does not know (a restarted head forgets its
    jobs): FAILED in one line once its driver has been silent for HEARTBEAT_TTL_S, RUNNING while it beats."""
    quiet = time.time() - keys.HEARTBEAT_TTL_S - 5
    gone, beating = JobStore(redis_url, "0123456789ab"), JobStore(redis_url, "ba9876543210")
    for store in (gone, beating):
        store.create({"steps": 20}, state="RUNNING", total_steps=20, submission=f"dkdm-{store.job_id}")
        store.r.hset(keys.job(store.job_id), "updated", quiet)
    beating.heartbeat("driver", replicas=1)  # e.g. a driver started by hand outside Ray's job API
    view = requests.get(f"{api}/jobs/{gone.job_id}").json()
    assert view["state"] == "FAILED", view
    assert view["error"].startswith(f"the driver (dkdm-{gone.job_id}) is gone: the Ray cluster at ")
    assert f"POST /jobs/{gone.job_id}/resume" in view["error"] and "\n" not in view["error"]
    assert requests.get(f"{api}/jobs/{beating.job_id}").json()["state"] == "RUNNING"
    return beating


def admission_takes_the_last_place_once(api: str, job: dict[str, Any], beating: JobStore) -> None:
    """With one of the two places (DKDM_MAX_RUNNING_JOBS) taken, four POSTs at once: exactly one gets it."""
    beating.heartbeat("driver", replicas=1)  # still live
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: requests.post(f"{api}/jobs", json=job, headers=AUTH), range(4)))
    assert sorted(a.status_code for a in answers) == [202, 429, 429, 429], [a.text for a in answers]
    admitted = next(a for a in answers if a.status_code == 202).json()["id"]
    assert requests.post(f"{api}/jobs/{admitted}/cancel", headers=AUTH).status_code == 200
    ended = poll(
        "the admitted job to be cancelled",
        lambda: (
            requests.get(f"{api}/jobs/{admitted}").json()["state"] in ("CANCELLED", "SUCCEEDED", "FAILED")
            and requests.get(f"{api}/jobs/{admitted}").json()
        ),
    )
    assert ended["state"] == "CANCELLED", ended


def sample(env: dict[str, str], model: str, extra_models: list[str]) -> None:
    port = free_port()
    deployed = subprocess.run(
        [str(BIN / "dkdm"), "serve", "sampling", "--port", str(port)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    url = f"http://127.0.0.1:{port}/v1/models/{model}/samples"

    def answer() -> requests.Response | None:
        try:
            r = requests.post(url, json={"num": 16, "steps": 5, "format": "npz"}, headers=AUTH)
        except requests.ConnectionError:
            return None  # the HTTP proxy is still starting
        return r if r.status_code not in (502, 503) else None

    response = poll("the sampling service", answer, 120)
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as data:
        assert data["arr_0"].shape == (16, 8, 8, 1) and data["arr_0"].dtype == np.uint8
    assert requests.post(url, json={"num": 16, "steps": 5}).status_code == 401  # sampling needs the token too
    png = requests.post(url, json={"num": 16, "steps": 5}, headers=AUTH)
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert requests.post(url.replace(model, "no-such-model"), json={}, headers=AUTH).status_code == 404
    assert requests.post(url, json={"num": 100000}, headers=AUTH).status_code == 422
    assert requests.post(url, json={"steps": 5000}, headers=AUTH).status_code == 422
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics").text
    assert f'dkdm_sampling_request_duration_seconds_count{{format="npz",model="{model}"}}' in metrics
    for name in extra_models:
        r = requests.post(url.replace(model, name), json={"num": 4, "steps": 5, "format": "npz"}, headers=AUTH)
        assert r.status_code == 200, r.text
        with np.load(io.BytesIO(r.content), allow_pickle=False) as data:
            assert data["arr_0"].shape == (4, 8, 8, 1)
