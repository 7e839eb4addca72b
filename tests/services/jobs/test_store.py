"""The job store on a real redis-server: writes never recreate a lost record, the durable copy rebuilds
it, and every client rides out a Redis restart (append-only on) and fails in one clear error past it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.control_plane.launcher import RayLauncher
from services.control_plane.service import JobService
from services.control_plane.settings import Settings
from services.engine.driver import fail
from services.engine.embedded import RedisServer
from services.jobs import durable, keys
from services.jobs.client import RedisUnavailable, redis_client
from services.jobs.store import JobStore, RecordGone
from tests.services.conftest import free_port, redis_server


@pytest.fixture(autouse=True)
def leave_no_keys(redis_url: str) -> Iterator[None]:
    """The session's Redis is shared with other tests that look at every job key: clean up after."""
    yield
    client = redis_client(redis_url)
    for job_id in ("lost-job", "retried-job", "0123456789cd"):
        client.delete(*client.scan_iter(match=keys.job(job_id) + "*"), keys.job(job_id))
        client.zrem(keys.jobs_index(), job_id)


def wipe(store: JobStore) -> None:
    """What a Redis restart without persistence does to one job: every key of it gone."""
    found = list(store.r.scan_iter(match=keys.job(store.job_id) + "*"))
    store.r.delete(*found)


def test_a_write_never_recreates_a_lost_record(redis_url: str) -> None:
    store = JobStore(redis_url, "lost-job")
    assert store.create({"steps": 400}, state="RUNNING", total_steps=400)
    store.add(teacher_calls=3)
    wipe(store)
    writes = (
        lambda: store.set_state("FAILED", error="x"),
        lambda: store.update(step=5),
        lambda: store.next_attempt(),
        lambda: store.add(teacher_calls=1, teacher_busy_seconds=0.5),
        lambda: store.consume("1:0:1"),
        lambda: store.set_metrics({"loss": 1.0}),
        lambda: store.set_shard(0, {"size": 4}),
        lambda: store.open_lease(0, 1, "teacher-0"),
        lambda: store.close_lease(0, 1, samples_advanced=16),
        lambda: store.set_queue_depths([1]),
        lambda: store.drop_leases(["0:1"]),
    )
    for write in writes:
        with pytest.raises(RecordGone, match="lost-job has no record in Redis"):
            write()
    assert list(store.r.scan_iter(match=keys.job("lost-job") + "*")) == []  # not even a stub
    assert not store.exists()


def test_a_retried_write_applies_once(redis_url: str) -> None:
    """The client resends a write whose reply was lost as Redis went down; it must not count twice."""
    store = JobStore(redis_url, "retried-job")
    store.create({}, state="RUNNING")
    assert store.consume("1:0:1")
    store._local.seq -= 1  # the same write again, numbered as the client's retry sends it
    assert store.consume("1:0:1")  # its own first try went in: not a second delivery
    assert store.counters()["batches_consumed"] == 1 and store.consumed_count() == 1
    assert not store.consume("1:0:1")  # a new write of the same batch is a second delivery
    store.add(teacher_calls=1)
    store._local.seq -= 1
    store.add(teacher_calls=1)
    assert store.counters()["teacher_calls"] == 1


def test_the_durable_copy_rebuilds_a_lost_record(redis_url: str, tmp_path: Path) -> None:
    job_id = "0123456789cd"
    out = tmp_path / job_id
    store = JobStore(redis_url, job_id)
    store.create({"steps": 40}, state="RUNNING", out=str(out), total_steps=40)
    store.update(step=20)
    store.add(teacher_calls=21, teacher_busy_seconds=1.5)
    assert store.save_copy(out) == out / durable.COPY_FILE
    record, _ = store.snapshot()
    wipe(store)
    store.r.zrem(keys.jobs_index(), job_id)

    copy = durable.read_copy(out / durable.COPY_FILE)
    assert copy is not None and store.restore(copy)
    assert store.record() == record and store.counters()["teacher_calls"] == 21
    assert store.counters()["teacher_busy_seconds"] == pytest.approx(1.5)
    assert job_id in store.r.zrange(keys.jobs_index(), 0, -1)
    store.add(teacher_calls=1, teacher_busy_seconds=0.5)  # counters restored as Redis can count on
    assert store.counters()["teacher_calls"] == 22
    assert not store.restore(copy)  # an existing record is never overwritten
    with pytest.raises(ValueError, match="not 'other'"):
        JobStore(redis_url, "other", client=store.r).restore(copy)

    # The control plane rebuilds it on a lookup (and at start-up) from runs_dir/<id>/job.json.
    store.set_state("SUCCEEDED", step=40)
    store.save_copy(out)
    wipe(store)
    settings = Settings(redis_url=redis_url, runs_dir=tmp_path, ray_address="http://127.0.0.1:1")
    service = JobService(settings, store.r, RayLauncher(settings.ray_address, {}))
    view = service.view(job_id)
    assert view is not None and view.state == "SUCCEEDED" and view.step == 40 and view.counters["teacher_calls"] == 22
    assert service.view("abcdefabcdef") is None  # no copy: still 404
    wipe(store)
    assert service.recover_all() == [job_id] and service.recover_all() == []


def test_a_failed_job_whose_redis_is_gone_keeps_its_cause(tmp_path: Path) -> None:
    """The FAILED write of the error handler fails too: the cause survives, in the log and the copy."""
    server = redis_server()
    store = JobStore(server.url, "gone-job", ride_out_s=0.2)
    store.create({"steps": 4}, state="RUNNING")
    store.save_copy(tmp_path)
    server.stop()
    fail(store, tmp_path, ValueError("the original cause"))  # does not raise over the cause
    copy = durable.read_copy(tmp_path / durable.COPY_FILE)
    assert copy is not None and copy["record"]["state"] == "FAILED"
    assert copy["record"]["error"] == "the original cause"  # the line `dkdm: error:` would print


def test_clients_ride_out_a_redis_restart_and_fail_clearly_past_the_limit(tmp_path: Path) -> None:
    server = RedisServer(port=free_port(), directory=tmp_path, appendfsync="always").start()
    try:
        store = JobStore(server.url, "restart-job", ride_out_s=60)
        store.create({"steps": 4}, state="RUNNING")
        store.add(teacher_calls=1)
        server.shutdown()
        restarter = threading.Timer(1.0, server.start)  # down for a second, then the append-only file replays
        restarter.start()
        store.add(teacher_calls=1)  # waits for the restart instead of failing
        store.set_state("RUNNING", step=2)
        restarter.join()
        assert store.counters()["teacher_calls"] == 2 and store.spec() == {"steps": 4}

        server.shutdown()  # and not back: past the limit, one error naming the server
        hasty = JobStore(server.url, "restart-job", client=redis_client(server.url, ride_out_s=0.3))
        with pytest.raises(RedisUnavailable, match=rf"^redis at {server.url}: no answer for 0.3 s"):
            hasty.add(teacher_calls=1)
    finally:
        server.stop()
