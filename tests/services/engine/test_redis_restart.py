"""A Redis restart under a running Ray job: the engine rides it out and nothing is lost or counted twice."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray

from dkdm_core.checkpoint import load_train_state
from services.engine.driver import ray_checkpoints
from services.engine.embedded import RedisServer
from services.jobs import durable
from services.jobs.client import RedisUnavailable, get_redis_settings
from services.jobs.store import ModelRegistry
from tests.services.conftest import free_port
from tests.services.engine.conftest import engine_spec
from tests.services.engine.test_ray_engine import Background, assert_pool_consistent

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_a_job_rides_out_a_redis_restart(ray_cluster: None, tiny_teacher: Path, tmp_path: Path) -> None:
    server = RedisServer(port=free_port(), directory=tmp_path / "redis", appendfsync="always")
    (tmp_path / "redis").mkdir()
    with server:
        spec = engine_spec(tiny_teacher, tmp_path / "out", steps=40)
        job = Background(spec, "restart", server.url)
        job.wait_for(lambda: job.step() >= 5 and "teacher-0" in job.store.heartbeats())
        before = job.step()
        server.shutdown()  # SIGTERM: Redis flushes its append-only file and exits
        time.sleep(1.0)  # every component meets a refused connection meanwhile
        server.start()  # the same port and directory: the file is replayed (LOADING), then it answers
        result = job.join()
        assert before < spec.steps  # the restart happened mid-job

        store = job.store
        record = store.record()
        assert record["state"] == "SUCCEEDED" and result.steps == 40 and record["total_steps"] == "40"
        assert json.loads(record["spec"])["steps"] == 40
        c = store.counters()
        # Exactly once across the restart: no batch trained on twice, none counted twice.
        assert c["student_steps_total"] == c["batches_consumed"] == store.consumed_count() == 40
        assert c["teacher_calls"] - c["stale_returns"] == c["batches_consumed"] + c["batches_dropped"]
        assert_pool_consistent(store, spec)
        entry = ModelRegistry(store.r).get("job-restart")
        assert entry is not None and entry["steps"] == 40
        copy = durable.read_copy(tmp_path / "out" / durable.COPY_FILE)
        assert copy is not None and copy["record"]["state"] == "SUCCEEDED"
        assert copy["counters"]["batches_consumed"] == "40"


def test_past_the_ride_out_limit_a_job_stops_with_a_checkpoint_and_one_error(
    ray_cluster: None, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DKDM_REDIS_RIDE_OUT_S", "3")
    get_redis_settings.cache_clear()
    out = tmp_path / "out"
    try:
        with RedisServer(port=free_port()) as server:
            spec = engine_spec(tiny_teacher, out, steps=1000, run__checkpoint_every=500)
            job = Background(spec, "lost-redis", server.url)
            job.wait_for(lambda: job.step() >= 5)
            server.shutdown()  # and it does not come back
            job.thread.join(300)
            assert not job.thread.is_alive(), "the job hangs without Redis"
    finally:
        get_redis_settings.cache_clear()
    assert isinstance(job.error, RedisUnavailable), job.error
    assert str(job.error).startswith(f"redis at {server.url}: no answer for 3 s")
    # The student stopped where it was, with a checkpoint to resume from.
    stopped = load_train_state(ray_checkpoints(out / "ray_train")[-1])["steps_done"]
    assert 5 <= stopped < 1000
    # Redis could not take the FAILED state: the durable copy has it, with the one cause.
    copy = durable.read_copy(out / durable.COPY_FILE)
    assert copy is not None and copy["record"]["state"] == "FAILED"
    assert copy["record"]["error"] == str(job.error)
    # No actor of the job is left behind (ray.kill returns before the actor is gone: wait for it).
    deadline = time.monotonic() + 60
    while [a for a in ray.util.list_named_actors(all_namespaces=True) if "lost-redis" in a["name"]]:
        assert time.monotonic() < deadline, "actors of the failed job are still alive"
        time.sleep(0.2)
