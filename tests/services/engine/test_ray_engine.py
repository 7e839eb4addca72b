"""The Ray engine end to end on a real local Ray and a real redis-server: its invariants."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import yaml

from dkdm_core.checkpoint import load_model, load_train_state
from dkdm_core.pool import pool_size
from dkdm_core.spec import DistillSpec
from services.engine.driver import NAMESPACE, actor_name, ray_checkpoints, run_job
from services.jobs.store import JobStore
from services.local_engine import distill_local
from services.runner import RunResult
from tests.conftest import run_dkdm
from tests.services.engine.conftest import engine_spec

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def logged(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


class Background:
    """A job run in a thread, so the test can watch it in Redis and break things meanwhile."""

    def __init__(self, spec: DistillSpec, job_id: str, redis_url: str) -> None:
        self.store = JobStore(redis_url, job_id)
        self.result: RunResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(spec, job_id, redis_url), daemon=True)
        self.thread.start()

    def _run(self, spec: DistillSpec, job_id: str, redis_url: str) -> None:
        try:
            self.result = run_job(spec, job_id, redis_url, progress=False)
        except BaseException as exc:
            self.error = exc

    def wait_for(self, condition: Callable[[], bool], timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.thread.is_alive(), f"job ended early: {self.error!r}"
            assert time.monotonic() < deadline, "timed out waiting on the job"
            time.sleep(0.05)

    def step(self) -> int:
        return int(self.store.record().get("step", 0))

    def join(self, timeout: float = 600.0) -> RunResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "job did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def assert_pool_consistent(store: JobStore, spec: DistillSpec, advanced_before: int = 0) -> None:
    """Pool size constant, t on the chain, no lease left open, every advance accounted for
    (``advanced_before``: samples the pool snapshot a resumed job started from had advanced)."""
    shards = store.shards()
    chain = spec.pool.chain_steps
    assert chain is not None
    assert sum(s["size"] for s in shards.values()) == pool_size("dynamic", spec.optim.batch_size, chain, spec.pool.rho)
    assert all(0 <= s["t_min"] <= s["t_max"] < chain for s in shards.values())
    assert all(s["outstanding"] == 0 and s["leased_samples"] == 0 for s in shards.values())
    c = store.counters()
    assert sum(s["advanced"] for s in shards.values()) == advanced_before + c["samples_advanced"]
    accepted = c["teacher_calls"] - c["stale_returns"]
    assert c["samples_advanced"] == accepted * spec.optim.batch_size // spec.ray.students
    assert store.leases() == {}


def test_matches_the_local_engine_and_every_batch_is_used_once(
    ray_cluster: None, redis_url: str, tiny_teacher: Path, tmp_path: Path
) -> None:
    spec = engine_spec(tiny_teacher, tmp_path / "ray", steps=20)
    result = run_job(spec, "repro", redis_url, progress=False)
    threads = torch.get_num_threads()
    try:
        distill_local(spec.model_copy(update={"engine": "local", "out": str(tmp_path / "local")}), progress=False)
    finally:
        torch.set_num_threads(threads)
    ray_losses = [r["loss"] for r in logged(tmp_path / "ray")]
    local_losses = [r["loss"] for r in logged(tmp_path / "local") if "loss" in r]
    assert len(ray_losses) == 20 and ray_losses == local_losses  # 1 teacher, 1 student, same seed: identical

    store = JobStore(redis_url, "repro")
    assert store.state() == "SUCCEEDED" and result.steps == 20
    c = store.counters()
    # Exactly once: each step trained on one batch, no batch twice, every produced batch accounted for.
    assert c["student_steps_total"] == c["batches_consumed"] == store.consumed_count() == 20
    assert c["teacher_calls"] - c["stale_returns"] == c["batches_consumed"] + c["batches_dropped"]
    assert_pool_consistent(store, spec)
    metrics = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    assert metrics["steps"] == 20 and "digits_fd" in metrics and 0 <= metrics["student_idle_fraction"] < 1
    assert (tmp_path / "ray" / "model.safetensors").is_file()


def freeze_holding_a_lease(store: JobStore, job_id: str, pid: int) -> str:
    """SIGSTOP replica 0 at a moment it holds a lease (per the Redis lease table and the shard); returns it."""
    shard = ray.get_actor(actor_name(job_id, "shard", 0), namespace=NAMESPACE)
    for _ in range(500):
        os.kill(pid, signal.SIGSTOP)
        held = [f for f, v in store.leases().items() if v["replica"] == "teacher-0"]
        outstanding = {f"0:{i}" for i in ray.get(shard.stats.remote())["lease_ids"]}
        if held and held[0] in outstanding:
            return held[0]
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.003)
    raise AssertionError("replica 0 was never caught holding a lease")


def test_a_killed_teacher_replica_is_replaced_and_its_lease_reissued(
    ray_cluster: None, redis_url: str, tiny_teacher: Path, tmp_path: Path
) -> None:
    spec = engine_spec(
        tiny_teacher,
        tmp_path / "out",
        steps=100,
        ray__teacher_replicas=2,
        ray__teacher_cpus=0.5,
        ray__lease_timeout_s=2.0,
        run__log_every=5,
        run__checkpoint_every=50,
    )
    job = Background(spec, "kill-teacher", redis_url)
    job.wait_for(lambda: job.step() >= 10 and "teacher-0" in job.store.heartbeats())
    held = freeze_holding_a_lease(job.store, "kill-teacher", job.store.heartbeats()["teacher-0"]["pid"])
    ray.kill(ray.get_actor(actor_name("kill-teacher", "teacher", 0), namespace=NAMESPACE), no_restart=True)
    assert held  # replica 0 died holding this lease
    result = job.join()
    assert result.steps == 100 and job.store.state() == "SUCCEEDED"
    c = job.store.counters()
    assert c["replica_restarts"] >= 1 and c["leases_expired"] >= 1
    assert c["batches_consumed"] == job.store.consumed_count() == 100
    assert_pool_consistent(job.store, spec)


def registered(out: Path) -> list[int]:
    """Steps of the student checkpoints Ray Train's controller has registered (its snapshot file)."""
    found = []
    for snapshot in (out / "ray_train").glob("*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(ValueError, KeyError):  # being written
            found += [int(r["metrics"]["step"]) for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    return found


def test_a_killed_student_worker_restarts_from_its_checkpoint(
    ray_cluster: None, redis_url: str, tiny_teacher: Path, tmp_path: Path
) -> None:
    spec = engine_spec(tiny_teacher, tmp_path / "out", steps=60, run__checkpoint_every=20, ray__teacher_cpus=0.5)
    job = Background(spec, "kill-student", redis_url)
    job.store.request(teacher_replicas=2)  # scale the teacher side up while the job runs
    # Kill once Ray Train's controller has registered the step-20 checkpoint (on a loaded machine it
    # can lag the worker's report by seconds; a checkpoint it never saw cannot be resumed from).
    job.wait_for(
        lambda: "teacher-1" in job.store.heartbeats() and job.step() >= 28 and 20 in registered(tmp_path / "out")
    )
    os.kill(job.store.heartbeats()["student-0"]["pid"], signal.SIGKILL)
    result = job.join()
    assert result.steps == 60 and job.store.state() == "SUCCEEDED"
    steps = [r["step"] for r in logged(tmp_path / "out")]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] in (21, 41)  # resumed after the latest registered checkpoint, not from scratch
    c = job.store.counters()
    assert c["student_steps_total"] > 60  # steps after the checkpoint were redone
    assert c["batches_consumed"] == job.store.consumed_count()  # ... on fresh batches, none twice


def test_cancel_then_resume_continues_student_and_pool(
    ray_cluster: None, redis_url: str, tiny_teacher: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    spec = engine_spec(tiny_teacher, out, steps=1000, run__checkpoint_every=500)
    job = Background(spec, "resume-1", redis_url)
    job.wait_for(lambda: job.step() >= 15)
    job.store.request(cancel=1)
    stopped = job.join()
    assert job.store.state() == "CANCELLED" and 15 <= stopped.steps < 1000
    snapshot = load_train_state(ray_checkpoints(out / "ray_train")[-1])
    assert snapshot["steps_done"] == stopped.steps  # cancelling saved a checkpoint where it stopped
    advanced_before = sum(s["advanced"] for s in snapshot["pool_shards"].values())

    resumed = run_job(spec.model_copy(update={"steps": stopped.steps + 10}), "resume-2", redis_url, progress=False)
    assert resumed.steps == stopped.steps + 10
    steps = [r["step"] for r in logged(out)]
    assert steps[steps.index(stopped.steps) + 1] == stopped.steps + 1  # the student continues
    # The pool continues from the snapshot: its advance count goes on from there.
    assert_pool_consistent(JobStore(redis_url, "resume-2"), spec, advanced_before)


def test_a_job_too_big_for_the_cluster_fails_at_once_and_writes_nothing(
    ray_cluster: None, redis_url: str, tiny_teacher: Path, tmp_path: Path
) -> None:
    spec = engine_spec(tiny_teacher, tmp_path / "out", ray__teacher_replicas=64)
    with pytest.raises(ValueError, match=r"ray.teacher_replicas x ray.teacher_cpus"):
        run_job(spec, "too-big", redis_url, progress=False)
    assert not JobStore(redis_url, "too-big").exists() and not (tmp_path / "out").exists()
    # A job the control plane recorded: every refusal before the start is written to its record, in one line.
    unreadable = engine_spec(tmp_path, tmp_path / "out")  # no model folder as the teacher
    for job_id, refused, match in (("too-big-2", spec, "ray.teacher_replicas x"), ("no-teacher", unreadable, "")):
        store = JobStore(redis_url, job_id)
        store.create(refused.model_dump(), state="PENDING")
        with pytest.raises(Exception, match=match):
            run_job(refused, job_id, redis_url, progress=False)
        record = store.record()
        assert record["state"] == "FAILED" and match in record["error"] and "\n" not in record["error"]
        assert record["error"] and not (tmp_path / "out").exists()


def test_dkdm_distill_engine_ray_starts_and_stops_its_own_redis(
    ray_cluster: None, tiny_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    monkeypatch.delenv("DKDM_REDIS_URL", raising=False)
    # This process's own redis-servers (the command runs in it): other test sessions on the machine
    # start and stop theirs meanwhile.
    mine = ["pgrep", "-c", "-P", str(os.getpid()), "-x", "redis-server"]
    before = subprocess.run(mine, capture_output=True, text=True).stdout.strip()
    spec = engine_spec(tiny_teacher, tmp_path / "out", steps=5, run__checkpoint_every=5)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(spec.model_dump()))
    proc = run_dkdm("distill", "--config", str(config), "--quiet")
    assert "distillation finished: 5 steps" in proc.stdout
    after = subprocess.run(mine, capture_output=True, text=True).stdout.strip()
    assert after == before  # the private redis-server is gone again


def test_o2mkd_routes_the_shared_pool_to_its_students_on_both_engines(
    ray_cluster: None, redis_url: str, tiny_teacher: Path, tmp_path: Path
) -> None:
    """One knowledge pool feeds 3 students; one rank reproduces the local engine, two ranks run DDP."""
    spec = engine_spec(tiny_teacher, tmp_path / "ray", steps=12, method="o2mkd", o2mkd__students=3)
    run_job(spec, "o2mkd-1", redis_url, progress=False)
    threads = torch.get_num_threads()
    try:
        distill_local(spec.model_copy(update={"engine": "local", "out": str(tmp_path / "local")}), progress=False)
    finally:
        torch.set_num_threads(threads)
    ray_logs = logged(tmp_path / "ray")
    local_logs = [r for r in logged(tmp_path / "local") if "loss" in r]
    assert [r["loss"] for r in ray_logs] == [r["loss"] for r in local_logs]
    assert all({"mse_s0", "mse_s1", "mse_s2"} & r.keys() for r in ray_logs)
    card = json.loads((tmp_path / "ray" / "config.json").read_text())
    assert card["arch"] == "o2mkd-router" and card["router"]["edges"] == [0, 33, 67, 100]

    # Two DDP ranks: a rank whose batch misses a student's interval must still agree on the parameters.
    two = engine_spec(tiny_teacher, tmp_path / "ddp", steps=12, method="o2mkd", o2mkd__students=4, ray__students=2)
    result = run_job(two, "o2mkd-2", redis_url, progress=False)
    assert result.steps == 12 and JobStore(redis_url, "o2mkd-2").state() == "SUCCEEDED"
    _, loaded = load_model(tmp_path / "ddp")
    assert loaded.router is not None and len(loaded.router.archs) == 4


def test_a_class_conditional_job_matches_the_local_engine_on_ray(
    ray_cluster: None, redis_url: str, tmp_path: Path
) -> None:
    """Labels travel in leases and knowledge batches: a guided job with a null share reproduces the local engine.

    The quality figure taken while training (``run.quality_every``) is the same on both engines too.
    """
    teacher = Path(__file__).resolve().parents[3] / "dkdm_core" / "assets" / "teachers" / "digits-cond"
    spec = engine_spec(
        teacher, tmp_path / "ray", steps=6, run__eval_samples=20, run__quality_samples=20, run__quality_every=3
    )
    run_job(spec, "classes", redis_url, progress=False)
    threads = torch.get_num_threads()
    try:
        distill_local(spec.model_copy(update={"engine": "local", "out": str(tmp_path / "local")}), progress=False)
    finally:
        torch.set_num_threads(threads)
    ray_log, local_log = logged(tmp_path / "ray"), logged(tmp_path / "local")
    assert [r["loss"] for r in ray_log if "loss" in r] == [r["loss"] for r in local_log if "loss" in r]
    ray_quality = [r for r in ray_log if "quality" in r]
    assert [r["step"] for r in ray_quality] == [3]  # step 6 is the last: the final evaluation covers it
    local_quality = [r for r in local_log if "quality" in r]
    assert [r["step"] for r in local_quality] == [3]
    # Equal up to the last bits of the Fréchet distance's matrix square root (thread counts differ).
    assert ray_quality[0]["quality"] == pytest.approx(local_quality[0]["quality"], rel=1e-9)
    assert ray_quality[0]["quality"]["teacher_fd"] > 0
    card = json.loads((tmp_path / "ray" / "config.json").read_text())
    assert card["classes"] == {"num": 10, "null": True, "guidance_scale": 2.0}
    assert JobStore(redis_url, "classes").state() == "SUCCEEDED"
