"""The job driver: lays a DKDM job out on Ray, supervises it, and finishes it.

    PoolShard actors (k)  ──lease──▶  TeacherReplica actors (n)  ──KnowledgeBatch──▶  BatchQueue (m)
          ▲                                   │                                         │
          └──── one-step-denoised samples ────┘                      Ray Train student ranks (m)

Shards are initialised by the replicas (shuffle denoise, shard k on replica k mod n, in parallel)
or restored from the newest student checkpoint's pool snapshot. While the student trains, a
supervisor thread replaces dead replicas, applies scaling requests (``teacher_replicas`` in the
job's control hash), and publishes shard histograms and lease bookkeeping to Redis.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
import yaml
from ray.exceptions import RayError
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from tqdm import tqdm

from dkdm_core.checkpoint import TRAIN_STATE_FILE, ModelCard, load_model, load_train_state, read_card, save_model
from dkdm_core.models import count_parameters
from dkdm_core.pool import pool_size
from dkdm_core.spec import DistillSpec
from dkdm_core.students import student_card as make_student_card
from services.engine.actors import BatchQueueActor, PoolShardActor, TeacherReplicaActor
from services.engine.shard import shard_sizes
from services.engine.student import train_loop_per_worker
from services.evaluation import resolve_path
from services.jobs.store import JobStore, ModelRegistry
from services.runner import RunResult, check_resumable, evaluate_model

log = logging.getLogger(__name__)

NAMESPACE = "dkdm"
SUPERVISE_EVERY_S = 1.0
TRAIN_RUN_NAME = "student"


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def actor_name(job_id: str, role: str, index: int) -> str:
    """Named actors, so operators (and tests) can find a job's replicas: ``dkdm-{job}-teacher-0``."""
    return f"dkdm-{job_id}-{role}-{index}"


@dataclass
class Plan:
    """The job's layout, derived from its spec and its teacher."""

    teacher_dir: str
    teacher_card: ModelCard
    student_card: ModelCard
    chain_length: int
    shard_sizes: list[int]
    rank_batch: int

    @classmethod
    def make(cls, spec: DistillSpec) -> Plan:
        teacher_dir = resolve_path(spec.teacher)
        card = read_card(teacher_dir)
        if spec.objective == "dkdm" and not card.learn_sigma:
            raise ValueError("objective 'dkdm' needs a teacher with learned variance; use objective: simple")
        steps = spec.pool.chain_steps
        if steps is not None and steps > card.diffusion.num_timesteps:
            raise ValueError(f"pool.chain_steps={steps} exceeds the teacher's T={card.diffusion.num_timesteps}")
        chain_length = steps or card.diffusion.num_timesteps
        rank_batch = spec.optim.batch_size // spec.ray.students
        total = pool_size(spec.pool.strategy, spec.optim.batch_size, chain_length, spec.pool.rho)
        sizes = shard_sizes(total, spec.ray.shards)
        if min(sizes) < rank_batch:
            raise ValueError(
                f"ray.shards={spec.ray.shards} splits the pool of {total} into shards smaller than one "
                f"rank's batch ({rank_batch}); use fewer shards"
            )
        student_card = make_student_card(spec, card)
        student_card.info = {
            "kind": "student",
            "method": spec.method,
            "engine": "ray",
            "teacher": str(spec.teacher),
            "chain_steps": chain_length,
            "pool_size": total,
        }
        return cls(str(teacher_dir), card, student_card, chain_length, sizes, rank_batch)


def ray_checkpoints(storage: Path) -> list[Path]:
    """Student checkpoints Ray Train persisted for this job, oldest first.

    Ray Train names them ``checkpoint_<timestamp>``, so the names sort in the order they were reported;
    no need to open the (pool-snapshot-sized) states to order them.
    """
    run_dir = storage / TRAIN_RUN_NAME
    return sorted(p.parent for p in run_dir.glob(f"checkpoint_*/{TRAIN_STATE_FILE}"))


@dataclass
class ReplicaSlot:
    index: int
    generation: int
    handle: Any
    run_ref: Any = None


@dataclass
class Engine:
    """One run of one job on the connected Ray cluster."""

    spec: DistillSpec
    job_id: str
    store: JobStore
    plan: Plan
    out: Path
    attempt: int = 1
    shards: list[Any] = field(default_factory=list)
    queues: list[Any] = field(default_factory=list)
    replicas: list[ReplicaSlot] = field(default_factory=list)
    restarts: int = 0
    next_index: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)
    expired_seen: dict[int, int] = field(default_factory=dict)

    # Actors ---------------------------------------------------------------------------------------

    def start_shards(self) -> None:
        pool, ray_spec = self.spec.pool, self.spec.ray
        self.shards = [
            PoolShardActor.options(name=actor_name(self.job_id, "shard", k), namespace=NAMESPACE).remote(
                k,
                pool.strategy,
                size,
                self.plan.teacher_card.sample_shape,
                self.plan.chain_length,
                self.spec.seed,
                ray_spec.lease_timeout_s,
            )
            for k, size in enumerate(self.plan.shard_sizes)
        ]
        self.queues = [
            BatchQueueActor.options(name=actor_name(self.job_id, "queue", r), namespace=NAMESPACE).remote(
                ray_spec.queue_size
            )
            for r in range(ray_spec.students)
        ]

    def add_replica(self, generation: int) -> ReplicaSlot:
        r = self.spec.ray
        index = self.next_index
        self.next_index += 1
        handle = TeacherReplicaActor.options(
            name=actor_name(self.job_id, "teacher", index),
            namespace=NAMESPACE,
            num_cpus=r.teacher_cpus,
            num_gpus=r.teacher_gpus,
        ).remote(
            self.plan.teacher_dir,
            self.spec.pool.chain_steps,
            self.spec.seed,
            index,
            generation,
            "cuda" if r.teacher_gpus > 0 else "cpu",
            max(1, int(r.teacher_cpus)),
            self.store.url,
            self.job_id,
        )
        slot = ReplicaSlot(index, generation, handle)
        self.replicas.append(slot)
        return slot

    def start_loop(self, slot: ReplicaSlot) -> None:
        slot.run_ref = slot.handle.run.remote(self.shards, self.queues, self.plan.rank_batch, self.attempt)

    # The pool -------------------------------------------------------------------------------------

    def init_pool(self) -> float:
        """Shuffle denoise every shard on the replicas, shard k on replica k mod n, in parallel."""
        start = time.perf_counter()
        loads = []
        for k, size in enumerate(self.plan.shard_sizes):
            replica = self.replicas[k % len(self.replicas)].handle
            pool = self.spec.pool
            state_ref = replica.init_shard.remote(
                k, pool.strategy, size, self.spec.teacher_batch_size, pool.init, pool.per_trajectory
            )
            loads.append(self.shards[k].load_state_dict.remote(state_ref))  # by reference: never via the driver
        ray.get(loads)
        return time.perf_counter() - start

    def restore_pool(self, checkpoint: Path) -> None:
        states = load_train_state(checkpoint)["pool_shards"]
        if len(states) != len(self.shards):
            raise ValueError(
                f"the checkpoint holds {len(states)} pool shards but ray.shards={len(self.shards)}; "
                "resume with the same number of shards"
            )
        ray.get([self.shards[k].load_state_dict.remote(states[k]) for k in range(len(self.shards))])
        log.info("pool restored from %s", checkpoint)

    # Supervision ----------------------------------------------------------------------------------

    def check_replicas(self) -> None:
        """Replace replicas whose loop ended with an error (a dead actor) while restarts remain."""
        for slot in list(self.replicas):
            ready, _ = ray.wait([slot.run_ref], timeout=0)
            if not ready:
                continue
            try:
                ray.get(slot.run_ref)
                self.replicas.remove(slot)  # stopped on request
                continue
            except RayError as exc:
                log.warning("teacher replica %d died: %s", slot.index, type(exc).__name__)
                self.replicas.remove(slot)
            if self.stopping.is_set():
                continue
            if self.restarts >= self.spec.ray.max_replica_restarts:
                if not self.replicas:
                    reason = f"every teacher replica died and max_replica_restarts={self.restarts} is spent"
                    self.store.request(abort=reason)
                continue
            self.restarts += 1
            self.store.add(replica_restarts=1)
            self.start_loop(self.add_replica(generation=self.restarts))

    def apply_scaling(self) -> None:
        wanted = self.store.control().get("teacher_replicas")
        if wanted is None or self.stopping.is_set():
            return
        target = max(1, int(wanted))
        while len(self.replicas) < target:
            self.start_loop(self.add_replica(generation=self.restarts))
        for slot in self.replicas[target:]:
            slot.handle.stop.remote()

    def publish_shards(self) -> None:
        stats = ray.get([s.stats.remote() for s in self.shards], timeout=30)
        outstanding: set[str] = set()
        for s in stats:
            self.store.set_shard(s["index"], s)
            new = s["expired"] - self.expired_seen.get(s["index"], 0)
            if new:
                self.store.add(leases_expired=new)
                self.expired_seen[s["index"]] = s["expired"]
            outstanding.update(f"{s['index']}:{lid}" for lid in s["lease_ids"])
        self.store.set_queue_depths(ray.get([q.depth.remote() for q in self.queues], timeout=30))
        # Leases a dead replica opened are gone from the shards once expired: drop them here too.
        self.store.drop_leases([f for f in self.store.leases() if f not in outstanding])

    def supervise(self, bar: tqdm | None) -> None:
        while not self.stopping.wait(SUPERVISE_EVERY_S):
            try:
                self.check_replicas()
                self.apply_scaling()
                self.publish_shards()
                self.store.heartbeat("driver", replicas=len(self.replicas))
                if bar is not None:
                    bar.n = int(self.store.record().get("step", 0))
                    bar.refresh()
            except Exception:  # the supervisor must outlive one failed round; the next one retries
                log.exception("supervision round failed")

    def stop_replicas(self) -> None:
        self.stopping.set()
        for q in self.queues:
            q.close.remote()  # wakes replicas blocked on a full queue
        for slot in self.replicas:
            slot.handle.stop.remote()
        refs = [s.run_ref for s in self.replicas if s.run_ref is not None]
        ray.wait(refs, num_returns=len(refs), timeout=30)
        left = ray.get([q.depth.remote() for q in self.queues])
        self.store.add(batches_dropped=int(sum(left)))

    def kill_all(self) -> None:
        for handle in [s.handle for s in self.replicas] + self.shards + self.queues:
            ray.kill(handle, no_restart=True)

    # Training -------------------------------------------------------------------------------------

    def trainer(self, storage: Path) -> TorchTrainer:
        r = self.spec.ray
        resources = {"CPU": r.student_cpus, **({"GPU": r.student_gpus} if r.student_gpus else {})}
        config = {
            "spec": self.spec.model_dump(),
            "card": self.plan.student_card.model_dump(),
            "redis_url": self.store.url,
            "job_id": self.job_id,
            "shards": self.shards,
            "queues": self.queues,
            "out": str(self.out),
            "threads": self.spec.run.threads or max(1, int(r.student_cpus)),
        }
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=r.students, use_gpu=r.student_gpus > 0, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=TRAIN_RUN_NAME,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=r.max_student_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=3),
            ),
        )


def check_resources(spec: DistillSpec) -> None:
    """Fail at once, naming the fields, when the job can never be placed on this cluster."""
    r = spec.ray
    total = ray.cluster_resources()
    for kind, need in (
        ("CPU", r.teacher_replicas * r.teacher_cpus + r.students * r.student_cpus),
        ("GPU", r.teacher_replicas * r.teacher_gpus + r.students * r.student_gpus),
    ):
        have = total.get(kind, 0.0)
        if need > have + 1e-9:
            low = kind.lower()
            raise ValueError(
                f"the job needs {need:g} {kind}s (ray.teacher_replicas x ray.teacher_{low}s + ray.students x "
                f"ray.student_{low}s) but the Ray cluster has {have:g}; lower them (fractions are allowed)"
            )


def run_job(spec: DistillSpec, job_id: str, redis_url: str, progress: bool = True) -> RunResult:
    """Run (or resume) job ``job_id`` on the connected Ray cluster; its metadata goes to ``redis_url``."""
    out = Path(spec.out).resolve()
    storage = out / "ray_train"
    previous = ray_checkpoints(storage)
    check_resumable(out, spec.model_dump(), has_checkpoints=bool(previous))
    check_resources(spec)
    plan = Plan.make(spec)
    store = JobStore(redis_url, job_id)
    store.create(spec.model_dump(), state="PENDING", out=str(out), total_steps=spec.steps)
    if store.cancel_requested():  # cancelled before it started: nothing to run, nothing to lose
        store.set_state("CANCELLED", error="")
        return RunResult(out=out, steps=0)
    attempt = store.next_attempt()
    store.set_state("RUNNING", out=str(out), total_steps=spec.steps, error="")
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    engine = Engine(spec, job_id, store, plan, out, attempt)
    stats: dict[str, float] = {"pool_size": float(sum(plan.shard_sizes)), "chain_steps": float(plan.chain_length)}
    try:
        engine.start_shards()
        for _ in range(spec.ray.teacher_replicas):
            engine.add_replica(generation=attempt - 1)
        if previous:
            engine.restore_pool(previous[-1])
        else:
            stats["pool_init_seconds"] = engine.init_pool()
        for slot in engine.replicas:
            engine.start_loop(slot)
        bar = tqdm(total=spec.steps, disable=not progress, desc="train", dynamic_ncols=True)
        supervisor = threading.Thread(target=engine.supervise, args=(bar,), daemon=True, name="dkdm-supervisor")
        supervisor.start()
        started = time.perf_counter()
        try:
            result = engine.trainer(storage).fit()
        finally:
            engine.stop_replicas()
            supervisor.join()
            bar.close()
        engine.publish_shards()  # the final pool bookkeeping, with every replica stopped
        stats["train_seconds"] = time.perf_counter() - started
        if result.checkpoint is None:
            raise RuntimeError("the student finished without a checkpoint")
        with result.checkpoint.as_directory() as directory:
            model, _ = load_model(directory)
            steps = int(load_train_state(directory)["steps_done"])
    except BaseException as exc:
        store.set_state("FAILED", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        engine.kill_all()
    cancelled = store.cancel_requested()
    metrics = finish(spec, plan, out, model, steps, stats, store)
    ModelRegistry(store.r).register(
        f"job-{job_id}", str(out), job_id=job_id, arch=spec.student.arch, steps=steps, method=spec.method
    )
    store.set_state("CANCELLED" if cancelled else "SUCCEEDED", step=steps)
    return RunResult(out=out, steps=steps, metrics=metrics, resumed_from=0)


def finish(
    spec: DistillSpec,
    plan: Plan,
    out: Path,
    model: torch.nn.Module,
    steps: int,
    stats: dict[str, float],
    store: JobStore,
) -> dict[str, float]:
    """Save the final EMA student to OUT, evaluate it, write OUT/metrics.json."""
    card = plan.student_card
    card.info["parameters"] = count_parameters(model)
    metrics, _ = evaluate_model(model, card, spec.run, spec.run.eval_samples, spec.seed)
    counters = store.counters()
    metrics.update(stats)
    metrics.update({k: v for k, v in counters.items() if v})
    metrics["steps"] = float(steps)
    busy, wait = counters.get("student_busy_seconds", 0.0), counters.get("student_wait_seconds", 0.0)
    if busy + wait > 0:
        metrics["student_idle_fraction"] = wait / (busy + wait)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    store.set_metrics({k: v for k, v in metrics.items() if k in ("digits_fd", "digits_is")})
    card.info["metrics"] = metrics
    save_model(out, model, card)
    return metrics
