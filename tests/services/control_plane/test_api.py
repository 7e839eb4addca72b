"""The control plane's HTTP contract over real HTTP, with a real redis-server: auth, validation,
unknown ids, an unreachable Ray, health, metrics, and a schema fuzz that must find no 5xx."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from services.control_plane.settings import Settings
from services.engine.embedded import RedisServer, free_port
from tests.services.conftest import BIN
from tests.services.control_plane.conftest import TOKEN, serve_api

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def settings(redis_url: str, tmp_path: Path, roots: list[Path], **extra: Any) -> Settings:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there: Ray is unreachable
    fields: dict[str, Any] = {"api_token": TOKEN, "redis_url": redis_url, "ray_address": closed}
    fields.update(model_roots=roots, runs_dir=tmp_path / "jobs", **extra)
    return Settings(**fields)


@pytest.fixture
def own_redis() -> Iterator[str]:
    """A redis-server of this test's own: the assertions below count every job in it."""
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def api(own_redis: str, tmp_path: Path, tiny_teacher: Path) -> Iterator[str]:
    with serve_api(settings(own_redis, tmp_path, [tiny_teacher.parent])) as url:
        yield url


def small_job(teacher: Path) -> dict[str, Any]:
    return {"teacher": str(teacher), "steps": 5, "pool": {"chain_steps": 10}, "optim": {"batch_size": 16}}


def test_mutating_calls_need_the_bearer_token(api: str, tiny_teacher: Path, own_redis: str, tmp_path: Path) -> None:
    job = small_job(tiny_teacher)
    assert requests.post(f"{api}/jobs", json=job).status_code == 401
    assert requests.post(f"{api}/jobs", json=job, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.post(f"{api}/jobs/0123456789ab/cancel").status_code == 401
    assert requests.get(f"{api}/jobs").status_code == 200  # reads stay open
    with serve_api(settings(own_redis, tmp_path, [tiny_teacher.parent], api_token=None)) as open_api:
        # No token configured: nothing mutates, whatever the caller sends.
        assert requests.post(f"{open_api}/jobs", json=job, headers=AUTH).status_code == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"student": {"arch": "resnet-9000"}}, ["body", "student", "arch"]),
        ({"out": "/tmp/elsewhere"}, ["body", "out"]),
        ({"engine": "local"}, ["body", "engine"]),
        ({"optim": {"batch_size": 0}}, ["body", "optim", "batch_size"]),
        ({"pool": {"strategy": "sideways"}}, ["body", "pool", "strategy"]),
        ({"ray": {"ship_dtype": "fp16"}}, ["body", "ray", "ship_dtype"]),
        ({"stpes": 10}, ["body", "stpes"]),
        ({"teacher": "../../../../etc"}, ["body", "teacher"]),
        ({"teacher": "/"}, ["body", "teacher"]),
        ({"teacher": "assets/teachers/digits\x00"}, ["body", "teacher"]),  # the OS would raise: no 500
        ({"teacher": ""}, ["body", "teacher"]),
        ({"baseline": {"synthetic_path": "a\x00b"}}, ["body", "baseline", "synthetic_path"]),
    ],
)
def test_invalid_specs_get_422_naming_the_field(api: str, body: dict[str, Any], field: list[str]) -> None:
    response = requests.post(f"{api}/jobs", json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    assert field in [e["loc"] for e in response.json()["detail"]]
    assert requests.get(f"{api}/jobs").json() == []  # nothing recorded


def test_a_teacher_folder_inside_the_roots_must_hold_a_model(api: str, tiny_teacher: Path) -> None:
    body = small_job(tiny_teacher.parent)  # inside the roots, but not a model folder
    response = requests.post(f"{api}/jobs", json=body, headers=AUTH)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "teacher"]


def test_method_fields_the_teacher_or_the_engine_cannot_take_get_422(api: str, tiny_teacher: Path) -> None:
    body = {**small_job(tiny_teacher), "method": "o2mkd", "o2mkd": {"students": 2, "boundaries": [150]}}
    response = requests.post(f"{api}/jobs", json=body, headers=AUTH)  # the tiny teacher has T = 100
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "o2mkd", "boundaries"]
    response = requests.post(f"{api}/jobs", json={**small_job(tiny_teacher), "method": "boot"}, headers=AUTH)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "method"]
    assert "knowledge pool" in response.text
    assert requests.get(f"{api}/jobs").json() == []


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ({"steps": 10**9}, [["body", "steps"]]),  # beyond job_max_steps
        ({"pool": {"chain_steps": 10**6}}, [["body", "pool", "chain_steps"]]),  # beyond job_max_chain_steps
        ({"pool": {"chain_steps": 1000}}, [["body", "pool", "chain_steps"]]),  # beyond the teacher's T = 100
        ({"run": {"eval_samples": 10**8}}, [["body", "run", "eval_samples"]]),  # beyond job_max_eval_samples
        # A pool of ρ·K·b = 10 x 100 x 4096 samples (4.1M, 2.2 GB with its snapshot) over the 1 GB limit.
        (
            {"pool": {"rho": 10.0, "chain_steps": 100}, "optim": {"batch_size": 4096}},
            [["body", "pool", "rho"], ["body", "optim", "batch_size"], ["body", "pool", "chain_steps"]],
        ),
        ({"teacher_batch_size": 10**7}, [["body", "teacher_batch_size"]]),  # shuffle denoise's chunks
        ({"ray": {"queue_size": 4096}, "optim": {"batch_size": 65536}}, [["body", "ray", "queue_size"]]),
    ],
)
def test_jobs_beyond_the_limits_or_the_memory_get_422_before_anything_is_recorded(
    own_redis: str, tmp_path: Path, tiny_teacher: Path, change: dict[str, Any], fields: list[list[str]]
) -> None:
    body = small_job(tiny_teacher)
    for key, value in change.items():
        body[key] = {**body[key], **value} if isinstance(value, dict) and key in body else value
    limits = settings(own_redis, tmp_path, [tiny_teacher.parent], job_memory_limit_bytes=10**9)
    with serve_api(limits) as url:
        response = requests.post(f"{url}/jobs", json=body, headers=AUTH)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert [e["loc"] for e in detail][: len(fields)] == fields
        assert "\n" not in detail[0]["msg"]
        assert requests.get(f"{url}/jobs").json() == []  # nothing recorded, nothing submitted
        if "pool" in change and change["pool"].get("rho"):
            assert "the limit is 1 GB (the setting job_memory_limit_bytes)" in detail[0]["msg"]


def test_beyond_max_running_jobs_post_and_resume_get_429(own_redis: str, tmp_path: Path, tiny_teacher: Path) -> None:
    from services.jobs.store import JobStore

    JobStore(own_redis, "0123456789ab").create({"steps": 5}, state="RUNNING", total_steps=5)
    JobStore(own_redis, "ba9876543210").create({"steps": 5}, state="FAILED", total_steps=5, error="boom")
    with serve_api(settings(own_redis, tmp_path, [tiny_teacher.parent], max_running_jobs=1)) as url:
        for call in (f"{url}/jobs", f"{url}/jobs/ba9876543210/resume"):
            response = requests.post(call, json=small_job(tiny_teacher), headers=AUTH)
            assert response.status_code == 429, response.text
            assert int(response.headers["Retry-After"]) > 0 and "max_running_jobs" in response.text
        assert JobStore(own_redis, "ba9876543210").state() == "FAILED"  # the refused resume changed nothing


def test_resume_answers_404_409_and_records_each_submission(api: str, own_redis: str) -> None:
    from services.jobs.store import JobStore

    assert requests.post(f"{api}/jobs/0123456789ab/resume").status_code == 401
    assert requests.post(f"{api}/jobs/0123456789ab/resume", headers=AUTH).status_code == 404
    for job_id, state in (("aaaaaaaaaaaa", "RUNNING"), ("bbbbbbbbbbbb", "PENDING"), ("cccccccccccc", "SUCCEEDED")):
        JobStore(own_redis, job_id).create({"steps": 5}, state=state, total_steps=5)
        response = requests.post(f"{api}/jobs/{job_id}/resume", headers=AUTH)
        assert response.status_code == 409 and state in response.json()["detail"]
    first = "dkdm-dddddddddddd"
    store = JobStore(own_redis, "dddddddddddd")
    subs = [{"id": first, "submitted": 1.0}]
    store.create(
        {"steps": 5}, state="FAILED", total_steps=5, error="the driver died", submission=first, submissions=subs
    )
    store.request(cancel=1, abort="every teacher replica died")
    # Ray is unreachable here: the resume is recorded, then fails to submit (503), in one line.
    assert requests.post(f"{api}/jobs/dddddddddddd/resume", headers=AUTH).status_code == 503
    view = requests.get(f"{api}/jobs/dddddddddddd").json()
    assert view["state"] == "FAILED" and view["error"].startswith("could not submit to Ray")
    assert view["submission"] == "dkdm-dddddddddddd-r1"
    old, new = view["submissions"]
    assert old["id"] == first and old["outcome"] == "FAILED" and old["error"] == "the driver died"
    assert new["id"] == "dkdm-dddddddddddd-r1" and new["outcome"] == "FAILED"
    assert store.control() == {}  # the last run's cancel and abort requests are gone


def test_a_dead_driver_is_reported_in_one_line() -> None:
    from services.control_plane.service import driver_died

    ray_message = (
        "Job entrypoint command failed with exit code -9, last available logs (truncated to 20,000 chars):\n"
        + "some log line\n" * 50
    )
    line = driver_died("0123456789ab", "dkdm-0123456789ab", ray_message, "x\n" * 50)
    assert line.startswith("the driver (Ray job dkdm-0123456789ab) died: killed by SIGKILL; POST /jobs/")
    assert "\n" not in line
    assert "died: killed by SIGKILL;" in driver_died("0123456789ab", "x", "failed with exit code 137, last", "")
    line = driver_died(
        "0123456789ab", "dkdm-0123456789ab-r1", "exit code 1, last logs:", "a\nservices.engine: error: x\n"
    )
    assert "died: exited with status 1: services.engine: error: x;" in line


def test_a_newer_finished_durable_copy_wins_over_a_live_record(api: str, own_redis: str, tmp_path: Path) -> None:
    """Redis came back after the driver gave up on it: Redis says RUNNING, OUT/job.json says FAILED."""
    from services.jobs import durable
    from services.jobs.store import JobStore

    line = "redis at redis://127.0.0.1:1/0: no answer for 30 s (DKDM_REDIS_RIDE_OUT_S): connection refused"
    for job_id, newer in (("0123456789ab", True), ("ba9876543210", False)):
        store, out = JobStore(own_redis, job_id), tmp_path / job_id
        store.create({"steps": 5}, state="RUNNING", total_steps=5, out=str(out), submission=f"dkdm-{job_id}")
        record, counters = store.snapshot()
        written = float(record["updated"]) + (5 if newer else -5)
        durable.write_copy(out, job_id, {**record, "state": "FAILED", "error": line, "updated": str(written)}, counters)
    view = requests.get(f"{api}/jobs/0123456789ab").json()
    assert (view["state"], view["error"]) == ("FAILED", line)
    assert JobStore(own_redis, "0123456789ab").state() == "FAILED"  # written back to Redis
    assert requests.get(f"{api}/jobs/ba9876543210").json()["state"] == "RUNNING"  # an older copy is history


def test_unknown_and_malformed_job_ids(api: str) -> None:
    assert requests.get(f"{api}/jobs/0123456789ab").status_code == 404
    assert requests.post(f"{api}/jobs/0123456789ab/cancel", headers=AUTH).status_code == 404
    assert requests.get(f"{api}/jobs/..%2F..%2Fetc").status_code in (404, 422)
    assert requests.get(f"{api}/jobs/NOT-AN-ID").status_code == 422


def test_an_unreachable_ray_is_503_and_the_job_is_recorded_failed(api: str, tiny_teacher: Path) -> None:
    response = requests.post(f"{api}/jobs", json=small_job(tiny_teacher), headers=AUTH)
    assert response.status_code == 503
    (job,) = requests.get(f"{api}/jobs").json()
    assert job["state"] == "FAILED" and "could not submit to Ray" in job["error"]
    assert job["spec"]["teacher"] == str(tiny_teacher.resolve()) and job["spec"]["engine"] == "ray"
    assert requests.get(f"{api}/jobs/{job['id']}").json()["state"] == "FAILED"
    metrics = requests.get(f"{api}/metrics").text
    assert 'dkdm_jobs{state="FAILED"}' in metrics and f'dkdm_job_total_steps{{job_id="{job["id"]}"}} 5.0' in metrics


def test_healthz_and_models(api: str) -> None:
    assert requests.get(f"{api}/healthz").json() == {"status": "ok", "redis": "ok"}
    assert isinstance(requests.get(f"{api}/models").json(), dict)


def test_schema_fuzz_finds_no_server_error(own_redis: str, tmp_path: Path) -> None:
    """Every operation of the OpenAPI schema, fuzzed with and without the token. The model roots are an
    empty folder, so no fuzzed spec can name a real teacher: nothing is ever submitted to Ray."""
    empty = tmp_path / "no-models"
    empty.mkdir()
    with serve_api(settings(own_redis, tmp_path, [empty])) as url:
        for headers in ([], ["-H", f"Authorization: Bearer {TOKEN}"]):
            cmd = [str(BIN / "schemathesis"), "run", f"{url}/openapi.json", "--checks", "not_a_server_error"]
            cmd += ["--max-examples", "40", "--seed", "1", *headers]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout[-4000:]


def test_scaling_a_job_records_the_request_for_the_engine(api: str, own_redis: str) -> None:
    from services.jobs.store import JobStore

    store = JobStore(own_redis, "0123456789ab")
    store.create({"steps": 5}, state="RUNNING", total_steps=5)
    url = f"{api}/jobs/0123456789ab/scale"
    assert requests.post(url, json={"teacher_replicas": 3}).status_code == 401
    assert requests.post(url, json={"teacher_replicas": 0}, headers=AUTH).status_code == 422
    assert (
        requests.post(
            url.replace("0123456789ab", "ba9876543210"), json={"teacher_replicas": 2}, headers=AUTH
        ).status_code
        == 404
    )
    assert requests.post(url, json={"teacher_replicas": 3}, headers=AUTH).status_code == 200
    assert store.control()["teacher_replicas"] == "3"
