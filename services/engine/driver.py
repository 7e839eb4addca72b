"""The job driver: lays a DKDM job out on Ray, supervises it, and finishes it.

    PoolShard actors (k)  ──lease──▶  TeacherReplica actors (n)  ──KnowledgeBatch──▶  BatchQueue (m)
          ▲                                   │                                         │
          └──── one-step-denoised samples ────┘                      Ray Train student ranks (m)

Shards are initialised by the replicas (shuffle denoise, shard k on replica k mod n, in parallel)
or restored from the pool snapshot of the checkpoint the student resumes from: the driver decides
that once, before the pool is touched, and hands it to Ray Train's ranks too. While the student trains, a
supervisor thread replaces dead replicas, applies scaling requests (``teacher_replicas`` in the
job's control hash), and publishes shard histograms and lease bookkeeping to Redis.

Redis may restart under a running job: every client rides that out (``services.jobs.client``). Past
the ride-out limit the student stops with a checkpoint and the job fails with the one Redis error;
the job's record keeps a durable copy beside its output (``services.jobs.durable``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import redis
import torch
import yaml
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from tqdm import tqdm

from dkdm_core.checkpoint import TRAIN_STATE_FILE, load_model, load_train_state, read_card, save_model
from dkdm_core.plan import JobPlan, make_plan
from dkdm_core.spec import DistillSpec, RayEngineSpec
from services.bounds import resource_refusal
from services.engine.batch_queue import BatchQueue
from services.engine.replica import TeacherReplica
from services.engine.shard import PoolShard
from services.engine.student import STOPPED_BY, train_loop_per_worker
from services.evaluation import resolve_path
from services.jobs import durable
from services.jobs.client import RedisUnavailable, get_redis_settings
from services.jobs.keys import JobState
from services.jobs.store import JobStore, ModelRegistry, RecordGone
from services.runner import ResumePoint, RunResult, decide_resume, evaluate_model

log = logging.getLogger(__name__)

NAMESPACE = "dkdm"
SUPERVISE_EVERY_S = 1.0
TRAIN_RUN_NAME = "student"


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def actor_name(job_id: str, role: str, index: int) -> str:
    """Named actors, so operators (and tests) can find a job's replicas: ``dkdm-{job}-teacher-0``."""
    return f"dkdm-{job_id}-{role}-{index}"


def plan_ray_job(spec: DistillSpec) -> JobPlan:
    """The job's plan, reading the teacher's card: the one read of it on the Ray path."""
    teacher_dir = resolve_path(spec.teacher).resolve()
    return make_plan(spec, read_card(teacher_dir), str(teacher_dir))


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

    plan: JobPlan
    job_id: str
    store: JobStore
    out: Path
    attempt: int = 1
    ride_out_s: float = 30.0  # every component's Redis ride-out limit (DKDM_REDIS_RIDE_OUT_S of the driver)
    checkpoints_before: list[str] = field(default_factory=list)  # Ray Train's, when this run started
    shards: list[Any] = field(default_factory=list)
    queues: list[Any] = field(default_factory=list)
    replicas: list[ReplicaSlot] = field(default_factory=list)
    restarts: int = 0
    unwritten_restarts: int = 0  # replica_restarts not yet added to the counters (a write failed)
    unreplaced: int = 0  # replicas that died and wait for a replacement
    target: int = 0  # the replica count the supervisor restores every round
    next_index: int = 0
    stopping: threading.Event = field(default_factory=threading.Event)
    expired_seen: dict[int, int] = field(default_factory=dict)

    @property
    def spec(self) -> DistillSpec:
        return self.plan.spec

    # Actors ---------------------------------------------------------------------------------------

    def start_shards(self) -> None:
        plan = self.plan.model_dump()  # actors take the plan in its serialised form
        self.shards = [
            ray.remote(PoolShard)
            .options(name=actor_name(self.job_id, "shard", k), namespace=NAMESPACE, num_cpus=0)
            .remote(plan=plan, index=k)
            for k in range(len(self.plan.shard_sizes))
        ]
        # Threaded, so blocked puts from replicas and a blocked get from the rank wait side by side.
        self.queues = [
            ray.remote(BatchQueue)
            .options(name=actor_name(self.job_id, "queue", r), namespace=NAMESPACE, num_cpus=0, max_concurrency=64)
            .remote(maxsize=self.spec.ray.queue_size)
            for r in range(self.spec.ray.students)
        ]

    def add_replica(self, generation: int) -> ReplicaSlot:
        r = self.spec.ray
        index = self.next_index
        self.next_index += 1
        # Threaded (max_concurrency) so ``stop`` is answered while ``run`` loops.
        handle = (
            ray.remote(TeacherReplica)
            .options(
                name=actor_name(self.job_id, "teacher", index),
                namespace=NAMESPACE,
                num_cpus=r.teacher_cpus,
                num_gpus=r.teacher_gpus,
                max_concurrency=4,
            )
            .remote(
                plan=self.plan.model_dump(),
                index=index,
                generation=generation,
                device="cuda" if r.teacher_gpus > 0 else "cpu",
                threads=max(1, int(r.teacher_cpus)),
                redis_url=self.store.url,
                job_id=self.job_id,
                ride_out_s=self.ride_out_s,
            )
        )
        slot = ReplicaSlot(index, generation, handle)
        self.replicas.append(slot)
        return slot

    def start_loop(self, slot: ReplicaSlot) -> None:
        slot.run_ref = slot.handle.run.remote(self.shards, self.queues, self.attempt)

    # The pool -------------------------------------------------------------------------------------

    def init_pool(self) -> float:
        """Shuffle denoise every shard on the replicas, shard k on replica k mod n, in parallel."""
        start = time.perf_counter()
        loads = []
        for k in range(len(self.shards)):
            state_ref = self.replicas[k % len(self.replicas)].handle.init_shard.remote(k)
            loads.append(self.shards[k].load_state_dict.remote(state_ref))  # by reference: never via the driver
        ray.get(loads)
        return time.perf_counter() - start

    def restore_pool(self, resume: ResumePoint) -> None:
        """The pool snapshot of the checkpoint the student resumes from too."""
        states = resume.state["pool_shards"]
        if len(states) != len(self.shards):
            raise ValueError(
                f"the checkpoint holds {len(states)} pool shards but ray.shards={len(self.shards)}; "
                "resume with the same number of shards"
            )
        ray.get([self.shards[k].load_state_dict.remote(states[k]) for k in range(len(self.shards))])
        log.info("pool restored from %s", resume.path)

    def place(self, resume: ResumePoint | None) -> dict[str, float]:
        """Shards, queues and replicas on the cluster; the pool initialised or restored; loops started."""
        self.start_shards()
        self.target = self.spec.ray.teacher_replicas
        for _ in range(self.target):
            self.add_replica(generation=self.attempt - 1)
        stats = {"pool_size": float(self.plan.pool_size), "chain_steps": float(self.plan.chain_length)}
        if resume is not None:
            self.restore_pool(resume)
        else:
            stats["pool_init_seconds"] = self.init_pool()
        for slot in self.replicas:
            self.start_loop(slot)
        return stats

    # Supervision ----------------------------------------------------------------------------------

    def check_replicas(self) -> None:
        """Drop replicas whose loop ended, then bring the count back to ``target``.

        The restore never depends on Redis: a counter write that fails (Redis restarting) is retried
        next round, so a job is never left with fewer replicas, or none, because of it.
        """
        self.reap()
        self.restore_replicas()
        if self.unwritten_restarts:
            self.store.add(replica_restarts=self.unwritten_restarts)
            self.unwritten_restarts = 0

    def reap(self) -> None:
        """Forget replicas whose loop returned (stopped on request) and kill those whose loop died:
        an actor that outlives its loop would hold its CPUs and keep the replacement from starting."""
        for slot in list(self.replicas):
            ready, _ = ray.wait([slot.run_ref], timeout=0)
            if not ready:
                continue
            self.replicas.remove(slot)
            try:
                ray.get(slot.run_ref)
            except Exception as exc:  # RayActorError (actor died) or RayTaskError (its loop raised)
                log.warning("teacher replica %d died: %s", slot.index, _one_line(exc))
                ray.kill(slot.handle, no_restart=True)
                self.unreplaced += 1

    def restore_replicas(self) -> None:
        if self.stopping.is_set():
            return
        self.unreplaced = min(self.unreplaced, max(0, self.target - len(self.replicas)))
        while len(self.replicas) < self.target:
            if self.unreplaced:
                if self.restarts >= self.spec.ray.max_replica_restarts:
                    if not self.replicas:
                        reason = f"every teacher replica died and max_replica_restarts={self.restarts} is spent"
                        self.store.request(abort=reason)
                    return
                self.restarts += 1
                self.unwritten_restarts += 1
                self.unreplaced -= 1
            self.start_loop(self.add_replica(generation=self.restarts))

    def apply_scaling(self) -> None:
        """Take up a ``teacher_replicas`` request: the next restore adds replicas, surplus ones stop."""
        wanted = self.store.control().get("teacher_replicas")
        if wanted is None or self.stopping.is_set():
            return
        self.target = max(1, int(wanted))
        for slot in self.replicas[self.target :]:
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
        """Every round runs each task, whatever the one before it did (a failed Redis call included)."""
        while not self.stopping.wait(SUPERVISE_EVERY_S):
            for task in (self.check_replicas, self.apply_scaling, self.publish_shards, lambda: self.show(bar)):
                if self.stopping.is_set():
                    break
                try:
                    task()
                except Exception as exc:  # the supervisor must outlive one failed task; the next round retries
                    log.warning("supervision: %s", _one_line(exc))

    def show(self, bar: tqdm | None) -> None:
        if bar is not None:
            bar.n = int(self.store.record().get("step", 0))
            bar.refresh()

    def stop_replicas(self) -> None:
        self.stopping.set()
        for q in self.queues:
            q.close.remote()  # wakes replicas blocked on a full queue
        for slot in self.replicas:
            slot.handle.stop.remote()
        refs = [s.run_ref for s in self.replicas if s.run_ref is not None]
        ray.wait(refs, num_returns=len(refs), timeout=30)
        left = ray.get([q.depth.remote() for q in self.queues])
        try:
            self.store.add(batches_dropped=int(sum(left)))
        except redis.RedisError as exc:  # on the way out of a failure: the job's own error says more
            log.warning("batches_dropped not counted: %s", _one_line(exc))

    def kill_all(self) -> None:
        for handle in [s.handle for s in self.replicas] + self.shards + self.queues:
            ray.kill(handle, no_restart=True)

    # Training -------------------------------------------------------------------------------------

    def trainer(self, resume: ResumePoint | None) -> TorchTrainer:
        r = self.spec.ray
        config = {
            "plan": self.plan.model_dump(),
            "resume_from": str(resume.path) if resume is not None else None,
            "checkpoints_before": self.checkpoints_before,
            "redis_url": self.store.url,
            "ride_out_s": self.ride_out_s,
            "job_id": self.job_id,
            "shards": self.shards,
            "queues": self.queues,
            "out": str(self.out),
            "threads": self.spec.run.threads or max(1, int(r.student_cpus)),
        }
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            torch_config=TorchConfig(backend=ddp_backend(r)),
            scaling_config=scaling_config(r),
            run_config=RunConfig(
                name=TRAIN_RUN_NAME,
                storage_path=str(self.out / "ray_train"),
                failure_config=FailureConfig(max_failures=r.max_student_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=3),
            ),
        )


def scaling_config(r: RayEngineSpec) -> ScalingConfig:
    """One Ray Train worker per rank with ``ray.student_cpus`` and ``ray.student_gpus`` each: a fraction
    packs several ranks (or a rank and replicas) on one GPU, 1 gives each rank a GPU of its own."""
    resources = {"CPU": r.student_cpus, **({"GPU": r.student_gpus} if r.student_gpus else {})}
    return ScalingConfig(num_workers=r.students, use_gpu=r.student_gpus > 0, resources_per_worker=resources)


def ddp_backend(r: RayEngineSpec) -> str:
    """NCCL when every rank holds a whole GPU; gloo on CPUs and when ranks take fractions of a GPU:
    two ranks may then share one device, which NCCL refuses ("Duplicate GPU detected")."""
    return "nccl" if r.student_gpus >= 1 else "gloo"


def check_resources(spec: DistillSpec) -> None:
    """Fail at once, naming the fields, when the job can never be placed on this cluster."""
    refusal = resource_refusal(spec, ray.cluster_resources())
    if refusal is not None:
        raise ValueError(refusal.message)


def error_line(exc: BaseException) -> str:
    """One line for the job record: the cause the CLI would print (a Ray error's remote traceback is
    reduced to its cause), else the exception's type and text."""
    from services.cli import _error_line

    found = _error_line(exc) if isinstance(exc, Exception) else None
    text = found[0] if found is not None else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


def refuse(redis_url: str, job_id: str, exc: BaseException) -> None:
    """A job the engine refused before it started: its record (if the control plane wrote one) says
    why. No record is created here: a job run without one leaves nothing behind."""
    try:
        store = JobStore(redis_url, job_id)
        if store.exists():
            transition(store, "FAILED", error=error_line(exc))
    except Exception as store_exc:  # Redis is down too: the raised error still says why
        log.warning("could not record why job %s was refused: %s", job_id, store_exc)


def transition(store: JobStore, state: JobState, copy_to: Path | None = None, **fields: Any) -> None:
    """Every state change of a run goes through here; with ``copy_to``, the durable copy follows it."""
    log.info("job %s: %s", store.job_id, state)
    try:
        store.set_state(state, **fields)
    except BaseException:
        if copy_to is not None:  # Redis did not take it: the copy on disk still says what happened
            durable.overlay_copy(copy_to, store.job_id, state=state, **fields)
        raise
    if copy_to is not None:
        keep_copy(store, copy_to)


def keep_copy(store: JobStore, out: Path) -> None:
    """Refresh ``out/job.json`` from Redis; a copy that cannot be refreshed now is refreshed at the next change."""
    try:
        store.save_copy(out)
    except (redis.RedisError, OSError) as exc:
        log.warning("durable copy of job %s not refreshed: %s", store.job_id, _one_line(exc))


def fail(store: JobStore, out: Path, exc: BaseException) -> None:
    """Record FAILED with the cause; if that write fails too (Redis is gone), log it: the caller re-raises
    the cause, which a second error must never hide."""
    try:
        transition(store, "FAILED", out, error=cause(exc))
    except Exception as second:
        log.error(
            "job %s could not be recorded as FAILED (%s); its error: %s", store.job_id, _one_line(second), cause(exc)
        )


def cause(exc: BaseException) -> str:
    """One line for the record: a Redis failure anywhere in the chain (a worker's included) wins."""
    from services.cli import _causes

    for e in _causes(exc):
        if isinstance(e, (RedisUnavailable, RecordGone)):
            return _one_line(e)
    return error_line(exc)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


@contextlib.contextmanager
def beating(store: JobStore, info: Callable[[], dict[str, Any]]) -> Iterator[None]:
    """The driver's heartbeat through the whole run (placement, training, evaluation), every
    ``SUPERVISE_EVERY_S``: the control plane takes a live job whose driver has not beaten for
    ``HEARTBEAT_TTL_S`` and that Ray does not know (a restarted cluster) as dead. A failed beat
    (Redis away) is retried at the next one."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                store.heartbeat("driver", **info())
            except Exception as exc:
                log.debug("driver heartbeat: %s", _one_line(exc))
            if stop.wait(SUPERVISE_EVERY_S):
                return

    thread = threading.Thread(target=loop, daemon=True, name="dkdm-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def admit(store: JobStore, spec: DistillSpec, out: Path) -> int | None:
    """Record the job (PENDING) and start its attempt (RUNNING); None if it was cancelled before it started."""
    out.mkdir(parents=True, exist_ok=True)
    store.create(spec.model_dump(), state="PENDING", out=str(out), total_steps=spec.steps)
    if store.cancel_requested():  # nothing to run, nothing to lose
        transition(store, "CANCELLED", out, error="")
        return None
    attempt = store.next_attempt()
    transition(store, "RUNNING", out, out=str(out), total_steps=spec.steps, error="")
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(), sort_keys=False))
    return attempt


def train(engine: Engine, resume: ResumePoint | None, progress: bool) -> tuple[torch.nn.Module, int, float]:
    """Ray Train's student ranks, with the supervisor alongside; the final EMA student and its step."""
    bar = tqdm(total=engine.spec.steps, disable=not progress, desc="train", dynamic_ncols=True)
    supervisor = threading.Thread(target=engine.supervise, args=(bar,), daemon=True, name="dkdm-supervisor")
    supervisor.start()
    started = time.perf_counter()
    try:
        result = engine.trainer(resume).fit()
    finally:
        engine.stop_replicas()
        supervisor.join()
        bar.close()
    stopped = (result.metrics or {}).get(STOPPED_BY)
    if stopped:  # the student lost Redis (or the job's record) and stopped with a checkpoint
        kind, _, message = stopped.partition(": ")
        raise (RecordGone if kind == RecordGone.__name__ else RedisUnavailable)(message)
    engine.publish_shards()  # the final pool bookkeeping, with every replica stopped
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError("the student finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        model, _ = load_model(directory)
        steps = int(load_train_state(directory)["steps_done"])
    return model, steps, seconds


def run_job(
    spec: DistillSpec, job_id: str, redis_url: str, progress: bool = True, plan: JobPlan | None = None
) -> RunResult:
    """Run (or resume) job ``job_id`` on the connected Ray cluster; its metadata goes to ``redis_url``.

    ``plan``: the job's plan when the caller made it already (the control plane stores it with the job).
    """
    out = Path(spec.out).resolve()
    # 1. Everything that can refuse the job, before anything is written or placed; a refusal goes
    #    to the job's record, so the job view shows it rather than the tail of Ray's log.
    try:
        check_resources(spec)
        plan = plan if plan is not None else plan_ray_job(spec)
        before = ray_checkpoints(out / "ray_train")
        resume = decide_resume(out, spec.model_dump(), before)
    except Exception as exc:
        refuse(redis_url, job_id, exc)
        raise
    # 2. The record and the attempt.
    ride_out_s = get_redis_settings().redis_ride_out_s
    store = JobStore(redis_url, job_id, ride_out_s=ride_out_s)
    attempt = admit(store, spec, out)
    if attempt is None:
        return RunResult(out=out, steps=0)
    # 3. Placement and training; any failure is the job's.
    engine = Engine(plan, job_id, store, out, attempt, ride_out_s, checkpoints_before=[p.name for p in before])
    with beating(store, lambda: {"replicas": len(engine.replicas)}):
        try:
            stats = engine.place(resume)
            model, steps, stats["train_seconds"] = train(engine, resume, progress)
        except BaseException as exc:
            fail(store, out, exc)
            raise
        finally:
            engine.kill_all()
        # 4. The student: evaluated, saved, registered.
        cancelled = store.cancel_requested()
        metrics = finish(plan, out, model, steps, stats, store)
        ModelRegistry(store.r).register(
            f"job-{job_id}", str(out), job_id=job_id, arch=spec.student.arch, steps=steps, method=spec.method
        )
        transition(store, "CANCELLED" if cancelled else "SUCCEEDED", out, step=steps)
    return RunResult(out=out, steps=steps, metrics=metrics, resumed_from=resume.step if resume else 0)


def finish(
    plan: JobPlan,
    out: Path,
    model: torch.nn.Module,
    steps: int,
    stats: dict[str, float],
    store: JobStore,
) -> dict[str, float]:
    """Save the final EMA student to OUT, evaluate it, write OUT/metrics.json."""
    spec, card = plan.spec, plan.student_card.model_copy(deep=True)
    metrics, _ = evaluate_model(model, card, spec.run, spec.run.eval_samples, spec.seed, out / "quality")
    counters = store.counters()
    metrics.update(stats)
    metrics.update({k: v for k, v in counters.items() if v})
    metrics["steps"] = float(steps)
    busy, wait = counters.get("student_busy_seconds", 0.0), counters.get("student_wait_seconds", 0.0)
    if busy + wait > 0:
        metrics["student_idle_fraction"] = wait / (busy + wait)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    store.set_metrics(
        {k: v for k, v in metrics.items() if k in ("digits_fd", "digits_is") or k.startswith("teacher_fd")}
    )
    card.info["metrics"] = metrics
    save_model(out, model, card)
    return metrics
