"""The engine's plain parts without Ray: shards, queues, the replica loop, the student loop, JobStore
against a real redis-server, and the invariant that ties them to the local engine."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from dkdm_core.checkpoint import ModelCard, read_card
from dkdm_core.plan import JobPlan, make_plan, pool_seed, shard_sizes, teacher_seed
from dkdm_core.spec import DiffusionSpec, DistillSpec
from dkdm_core.training import StudentBatch, read_logs
from services.bounds import resource_refusal, shard_refusal
from services.engine.batch_queue import BatchQueue
from services.engine.driver import ddp_backend, scaling_config
from services.engine.loop import Knowledge, ReplicaLoop
from services.engine.replica import TeacherReplica
from services.engine.shard import PoolShard
from services.engine.student import StudentRank
from services.jobs import keys
from services.jobs.store import JobStore
from services.local_engine import build_distiller
from tests.services.engine.conftest import engine_spec


def test_shard_sizes_cover_the_pool() -> None:
    assert shard_sizes(10, 3) == [4, 3, 3]
    assert sum(shard_sizes(2560, 7)) == 2560
    assert pool_seed(5, 0) == 5 and teacher_seed(5, 0, 0) == 6  # shard 0 / replica 0 = the local engine


def shard_plan(size: int, timeout: float = 60.0) -> JobPlan:
    """A one-shard plan of ``size`` 1x2x2 samples on a 5-step chain (a dynamic pool of one batch)."""
    teacher = ModelCard(arch="unet-tiny", channels=1, image_size=2, learn_sigma=True, diffusion=DiffusionSpec())
    spec = DistillSpec.model_validate(
        {
            "pool": {"strategy": "dynamic", "rho": 0.01, "chain_steps": 5},
            "optim": {"batch_size": size},
            "engine": "ray",
            "ray": {"lease_timeout_s": timeout},
        }
    )
    return make_plan(spec, teacher)


def make_shard(size: int = 8, timeout: float = 60.0) -> PoolShard:
    shard = PoolShard(plan=shard_plan(size, timeout), index=0)
    shard.ready = True
    return shard


def test_shard_refuses_until_ready_and_when_too_few_are_free() -> None:
    shard = PoolShard(plan=shard_plan(8), index=0)
    assert shard.take(4) is None  # not initialised yet
    shard.ready = True
    a, b = shard.take(4), shard.take(4)
    assert a is not None and b is not None
    assert shard.take(1) is None  # all 8 leased out
    assert shard.put(a.lease_id, a.x_t)
    assert shard.take(4) is not None


def test_expired_lease_is_reissued_and_its_late_answer_refused() -> None:
    shard = make_shard(size=4, timeout=0.05)
    lease = shard.take(4)
    assert lease is not None and shard.take(4) is None
    time.sleep(0.06)
    again = shard.take(4)  # the dead holder's samples are free again, unadvanced
    assert again is not None and sorted(again.ids.tolist()) == sorted(lease.ids.tolist())
    assert torch.equal(again.t, lease.t)
    assert not shard.put(lease.lease_id, lease.x_t)  # the late answer does not advance anything
    assert shard.put(again.lease_id, again.x_t)
    stats = shard.stats()
    assert stats["expired"] == 1 and stats["stale"] == 1 and stats["advanced"] == 4 and stats["size"] == 4


def test_batch_queue_is_bounded_and_wakes_waiters() -> None:
    q = BatchQueue(maxsize=2)
    assert q.put(1, 0.01) and q.put(2, 0.01)
    assert not q.put(3, 0.01)  # full: the producer is told, nothing is lost
    assert q.get(0.01) == 1 and q.put(3, 0.01)
    assert [q.get(0.01), q.get(0.01), q.get(0.01)] == [2, 3, None]
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(q.get(5.0)))
    waiter.start()
    q.put("x", 0.01)
    waiter.join(5)
    assert got == ["x"]
    assert q.close() == 0 and not q.put(4, 0.01)


COND_TEACHER = Path(__file__).resolve().parents[3] / "dkdm_core" / "assets" / "teachers" / "digits-cond"


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "class-conditional"])
def test_replica_and_student_loops_reproduce_the_local_engine(
    tiny_teacher: Path, tmp_path: Path, conditional: bool
) -> None:
    """Teacher half and student half run as separate objects joined by a queue give the local
    engine's Algorithm 1 bit for bit: the same pool draws, teacher noise, batches and losses.
    A class-conditional teacher's labels travel with the leases and batches (guided, with a null share)."""
    teacher = COND_TEACHER if conditional else tiny_teacher
    spec = engine_spec(teacher, tmp_path / "out")
    distiller, _ = build_distiller(spec, torch.device("cpu"))
    distiller.init_pool(spec.teacher_batch_size)
    expected = [distiller.step()["loss"] for _ in range(12)]

    plan = make_plan(spec, read_card(teacher), str(teacher))
    replica = TeacherReplica(plan=plan.model_dump(), index=0)  # as actors get it: serialised
    shard = PoolShard(plan=plan.model_dump(), index=0)
    shard.load_state_dict(replica.init_shard(0))
    assert replica.evaluations > 0
    queue = BatchQueue(maxsize=2)
    loop = ReplicaLoop.local(replica, [shard], [queue], plan.rank_batch, attempt=1)
    student = StudentRank(plan=plan, device=torch.device("cpu"), fetch=queue.get)
    got = []
    for _ in range(12):
        assert loop.step()
        got.append(student.step()["loss"])
    assert got == expected
    assert torch.equal(shard.pool.x, distiller.pool.x) and torch.equal(shard.pool.t, distiller.pool.t)
    if conditional:
        assert shard.pool.labels is not None and distiller.pool.labels is not None
        assert torch.equal(shard.pool.labels, distiller.pool.labels)


def ship(teacher: Path, out: Path, dtype: str, steps: int) -> tuple[list[float], list[Knowledge], PoolShard]:
    """``steps`` replica-loop and student steps with ``ray.ship_dtype`` = ``dtype``: the losses, what
    the rank received and the shard."""
    spec = engine_spec(teacher, out, ray__ship_dtype=dtype)
    plan = make_plan(spec, read_card(teacher), str(teacher))
    replica = TeacherReplica(plan=plan.model_dump(), index=0)
    shard = PoolShard(plan=plan.model_dump(), index=0)
    shard.load_state_dict(replica.init_shard(0))
    queue = BatchQueue(maxsize=2)
    loop = ReplicaLoop.local(replica, [shard], [queue], plan.rank_batch, attempt=1)
    received: list[Knowledge] = []

    def fetch(timeout: float) -> Knowledge | None:
        item = queue.get(timeout)
        if item is not None:
            received.append(item)
        return item

    student = StudentRank(plan=plan, device=torch.device("cpu"), fetch=fetch)
    losses = []
    for _ in range(steps):
        assert loop.step()
        losses.append(read_logs(student.step())["loss"])
    return losses, received, shard


def test_a_rank_receives_no_x_prev_and_bf16_batches_train_like_fp32(tiny_teacher: Path, tmp_path: Path) -> None:
    """A rank gets x_t, t and the teacher's output only (x̂_{t-1} went back to its shard). In bf16 those
    take half the bytes; the pool advances exactly as with fp32 (the teacher side does not change) and
    8 digits steps give losses within 1% of fp32's (0.18% measured: bf16 keeps 8 bits of mantissa)."""
    fp32, sent32, shard32 = ship(tiny_teacher, tmp_path / "fp32", "fp32", 8)
    bf16, sent16, shard16 = ship(tiny_teacher, tmp_path / "bf16", "bf16", 8)
    for item in sent32 + sent16:
        assert isinstance(item.batch, StudentBatch) and not hasattr(item.batch, "x_prev")
        assert item.batch.t.dtype == torch.long
    a, b = sent32[0].batch, sent16[0].batch
    assert a.x_t.dtype == a.teacher_output.dtype == torch.float32
    assert b.x_t.dtype == b.teacher_output.dtype == torch.bfloat16
    assert b.x_t.nbytes * 2 == a.x_t.nbytes and b.teacher_output.nbytes * 2 == a.teacher_output.nbytes
    assert torch.equal(a.x_t.to(torch.bfloat16), b.x_t) and torch.equal(a.t, b.t)
    assert torch.equal(shard32.pool.x, shard16.pool.x) and torch.equal(shard32.pool.t, shard16.pool.t)
    assert bf16 == pytest.approx(fp32, rel=1e-2)
    assert bf16 != fp32  # the student did learn from rounded batches


@pytest.mark.parametrize(
    ("ray", "loc"),
    [
        ({"ship_dtype": "fp16"}, ("ray", "ship_dtype")),
        ({"teacher_gpus": 2}, ("ray", "teacher_gpus")),  # a replica's teacher runs on one device
        ({"student_gpus": 1.5}, ("ray", "student_gpus")),
    ],
)
def test_bad_placement_and_shipping_fields_are_named(ray: dict[str, object], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        DistillSpec.model_validate({"engine": "ray", "ray": ray})
    assert [e["loc"] for e in info.value.errors()] == [loc]


def test_fractional_and_whole_gpus_place_ranks_and_the_device_follows_the_placement() -> None:
    def spec(runtime: str = "auto", **ray: float) -> DistillSpec:
        return DistillSpec.model_validate({"engine": "ray", "ray": ray, "runtime": {"device": runtime}})

    shared = spec(teacher_replicas=2, teacher_gpus=0.25, students=2, student_gpus=0.25)
    assert resource_refusal(shared, {"CPU": 4, "GPU": 1}) is None  # four actors on one GPU
    config = scaling_config(shared.ray)
    assert config.use_gpu and config.resources_per_worker == {"CPU": 1.0, "GPU": 0.25}
    assert ddp_backend(shared.ray) == "gloo"  # NCCL refuses two ranks on one GPU
    whole = spec(teacher_gpus=1, students=2, student_gpus=1)
    assert ddp_backend(whole.ray) == "nccl" and scaling_config(whole.ray).resources_per_worker["GPU"] == 1
    refusal = resource_refusal(whole, {"CPU": 4, "GPU": 2})
    assert refusal is not None and "needs 3 GPUs" in refusal.message
    assert scaling_config(spec().ray).resources_per_worker == {"CPU": 1.0} and ddp_backend(spec().ray) == "gloo"
    for bad in (spec("cuda"), spec("cpu", teacher_gpus=0.5)):
        refusal = resource_refusal(bad, {"CPU": 4, "GPU": 1})
        assert refusal is not None and refusal.fields[0] == "runtime.device" and "\n" not in refusal.message
    assert resource_refusal(spec("cuda:0", student_gpus=1), {"CPU": 4, "GPU": 1}) is None


def test_the_largest_pool_shard_must_fit_the_largest_node(tiny_teacher: Path) -> None:
    def plan(shards: int) -> JobPlan:
        data = {"teacher": str(tiny_teacher), "engine": "ray", "ray": {"shards": shards}}
        data |= {"pool": {"rho": 1.0, "chain_steps": 100}, "optim": {"batch_size": 1024}}
        return make_plan(DistillSpec.model_validate(data), read_card(tiny_teacher), str(tiny_teacher))

    one, four = plan(1), plan(4)  # 102,400 samples of 1x8x8: 2 x 27.1 MB with the snapshot
    node = 30_000_000
    refusal = shard_refusal(one, node)
    assert (
        refusal is not None and refusal.fields[0] == "ray.shards" and "largest Ray node has 0.03 GB" in refusal.message
    )
    assert "\n" not in refusal.message and shard_refusal(four, node) is None  # four actors, on four nodes if need be


def test_job_store_on_a_real_redis(redis_url: str) -> None:
    store = JobStore(redis_url, "unit-job")
    assert store.create({"steps": 3}, state="PENDING")
    assert not store.create({"steps": 4})  # an existing record is never overwritten
    assert store.spec() == {"steps": 3} and store.state() == "PENDING"
    store.set_state("RUNNING", step=2)
    assert store.record()["step"] == "2"
    assert store.next_attempt() == 1 and store.next_attempt() == 2
    store.add(teacher_calls=2, teacher_busy_seconds=0.5)
    store.add(teacher_calls=3)
    counters = store.counters()
    assert counters["teacher_calls"] == 5 and counters["teacher_busy_seconds"] == pytest.approx(0.5)
    assert set(keys.COUNTERS) <= counters.keys()
    assert store.consume("1:0:7") and not store.consume("1:0:7")
    assert store.consumed_count() == 1
    store.open_lease(0, 7, "teacher-0")
    assert store.leases()["0:7"]["replica"] == "teacher-0"
    store.close_lease(0, 7, samples_advanced=16)
    assert store.leases() == {} and store.counters()["samples_advanced"] == 16
    store.request(cancel=1)
    assert store.cancel_requested()
    store.heartbeat("teacher-0", delivered=1)
    assert store.heartbeats()["teacher-0"]["delivered"] == 1
    assert 0 < store.r.ttl(keys.heartbeat("unit-job", "teacher-0")) <= keys.HEARTBEAT_TTL_S
    assert all(k.startswith("dkdm:job:unit-job") for k in store.r.keys("dkdm:job:*"))
