"""A job whose driver dies, resumed through the API: a real redis-server, a real Ray head (`ray start`)
and the control plane over real HTTP. The driver is the process Ray's job supervisor started
(``python -m services.engine --job-id ...``); it is killed with SIGKILL, as an OOM kill would."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes

from dkdm_core.checkpoint import load_train_state
from services.control_plane.settings import Settings
from services.engine.driver import ray_checkpoints
from services.jobs.store import JobStore
from tests.services.conftest import ray_head, redis_server
from tests.services.control_plane.conftest import TOKEN, serve_api
from tests.services.engine.test_ray_engine import logged, registered

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STEPS = 40
# Ray Train's own detached actors, not the job's: the cluster-wide autoscaling coordinator, and the
# cleaner that removes a run's placement group once its controller is gone and then exits by itself
# (on a loaded machine its state-API checks can take minutes).
RAY_SINGLETONS = frozenset({"_AutoscalingCoordinatorActor", "PlacementGroupCleaner"})


def job_body(teacher: Path, **ray: Any) -> dict[str, Any]:
    """The engine tests' small job (tests/services/engine/conftest.py: engine_spec), over the API."""
    return {
        "teacher": str(teacher),
        "student": {"arch": "unet-tiny"},
        "pool": {"strategy": "dynamic", "rho": 0.4, "chain_steps": 10},
        "optim": {"batch_size": 16, "lr": 1e-3, "warmup_steps": 5},
        "teacher_batch_size": 64,
        "steps": STEPS,
        "seed": 3,
        "run": {"log_every": 1, "checkpoint_every": 10, "eval_samples": 16, "sample_steps": 5, "threads": 1},
        "ray": {"teacher_cpus": 1, "queue_size": 2, "lease_timeout_s": 30, **ray},
    }


def poll(what: str, fn: Any, timeout: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_a_killed_driver_is_reported_and_resume_finishes_the_job_from_its_checkpoint(
    tiny_teacher: Path, tmp_path: Path
) -> None:
    with redis_server() as server, ray_head(num_cpus=4, auth=False) as head:
        settings = Settings(
            api_token=TOKEN,
            redis_url=server.url,
            ray_address=head.dashboard,
            model_roots=[tiny_teacher.parent],
            runs_dir=tmp_path / "jobs",
        )
        with serve_api(settings) as api:
            run(api, head.dashboard, server.url, tiny_teacher, tmp_path)


def run(api: str, dashboard: str, redis_url: str, teacher: Path, tmp: Path) -> None:
    # The cluster's CPUs are known at POST time: a job that could never be placed is refused there
    # (once the head lists its node: it may still be registering it when the dashboard first answers).
    poll("the head's node", lambda: list_nodes(address=dashboard, timeout=5), 60)
    too_big = requests.post(f"{api}/jobs", json=job_body(teacher, teacher_replicas=64), headers=AUTH)
    assert too_big.status_code == 422 and too_big.json()["detail"][0]["loc"] == ["body", "ray", "teacher_replicas"]

    response = requests.post(f"{api}/jobs", json=job_body(teacher), headers=AUTH)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    store, out = JobStore(redis_url, job_id), tmp / "jobs" / job_id
    view = lambda: requests.get(f"{api}/jobs/{job_id}").json()  # noqa: E731

    # Kill the driver once Ray Train has registered the step-10 checkpoint (the one to resume from).
    poll("the step-10 checkpoint", lambda: "driver" in store.heartbeats() and 10 in registered(out), 600)
    first = view()["submission"]
    os.kill(store.heartbeats()["driver"]["pid"], signal.SIGKILL)

    failed = poll("the record to say the driver died", lambda: (v := view())["state"] == "FAILED" and v, 120)
    assert failed["error"].startswith(f"the driver (Ray job {first}) died: killed by SIGKILL")
    assert "\n" not in failed["error"] and f"/jobs/{job_id}/resume" in failed["error"]

    # No actor of the job survives its driver: shards, queues, replicas, Ray Train's workers.
    ray_job = JobSubmissionClient(dashboard).get_job_info(first).job_id

    def survivors() -> list[str] | None:
        """The job's actors still alive (by Ray job, and by the names the driver gives its own); None
        while Ray lists none of them yet."""
        actors = list_actors(address=dashboard, limit=10_000)
        mine = [a for a in actors if a.job_id == ray_job or (a.name or "").startswith(f"dkdm-{job_id}-")]
        # Ray Train's detached helpers (RAY_SINGLETONS) are Ray's, not the job's.
        mine = [a for a in mine if a.class_name not in RAY_SINGLETONS]
        return [f"{a.class_name} {a.name}" for a in mine if a.state != "DEAD"] if mine else None

    deadline = time.monotonic() + 120
    while (left := survivors()) != [] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], f"actors of the job alive after its driver died: {left}"
    before = store.counters()
    # The pool's advance count in each checkpoint the first run left (read now: the resumed run's
    # Ray Train keeps only the newest checkpoints).
    advanced_at = {}
    for path in ray_checkpoints(out / "ray_train"):
        with contextlib.suppress(Exception):  # one the kill cut short is passed over by the resume too
            state = load_train_state(path)
            advanced_at[int(state["steps_done"])] = sum(s["advanced"] for s in state["pool_shards"].values())

    resumed = requests.post(f"{api}/jobs/{job_id}/resume", headers=AUTH)
    assert resumed.status_code == 202, resumed.text
    assert resumed.json()["submission"] == f"{first}-r1" and resumed.json()["error"] == ""
    assert requests.post(f"{api}/jobs/{job_id}/resume", headers=AUTH).status_code == 409  # it runs again

    def ended() -> dict[str, Any] | None:
        v = view()
        # The view follows the new submission: the old one's failure in Ray never shows through.
        assert v["state"] != "FAILED", v
        return v if v["state"] not in ("PENDING", "RUNNING") else None

    done = poll("the resumed job to end", ended, 600)
    assert done["state"] == "SUCCEEDED" and done["step"] == STEPS and done["error"] == ""
    old, new = done["submissions"]
    assert old["id"] == first and old["outcome"] == "FAILED" and "SIGKILL" in old["error"]
    assert new["id"] == f"{first}-r1" and new["outcome"] == "SUCCEEDED"
    assert requests.post(f"{api}/jobs/{job_id}/resume", headers=AUTH).status_code == 409  # succeeded

    # The student continued from a checkpoint (not from scratch), its step count going on from there.
    steps = [r["step"] for r in logged(out)]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    resumed_from = steps[restart] - 1
    assert resumed_from >= 10 and resumed_from % 10 == 0 and steps[-1] == STEPS
    # The pool continued from that checkpoint's snapshot: its advance count goes on from there.
    advanced_before = advanced_at[resumed_from]
    after = store.counters()
    advanced = after["samples_advanced"] - before["samples_advanced"]
    assert sum(s["advanced"] for s in store.shards().values()) == advanced_before + advanced > advanced_before
    # Counters went on from the first run's, and no knowledge batch was trained on twice.
    assert after["student_steps_total"] >= STEPS and after["batches_consumed"] == store.consumed_count()
