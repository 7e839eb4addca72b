"""Student ranks on Ray Train: each consumes its own queue of knowledge batches and learns L*_DKDM.

``StudentRank`` is the plain loop object (step, save, restore) that unit tests drive with a local
queue; ``train_loop_per_worker`` is the short Ray Train function around it. Ranks split the global
batch b into b/m per rank; with m > 1 the student is wrapped in DistributedDataParallel, whose
all-reduce averages the per-rank gradients into the gradient of the mean over all b samples, so the
update does not depend on how the batch was sharded.

A rank's student runs as the job's ``runtime`` section says, resolved for the device Ray Train gave
it (``services.engine.replica.actor_runtime``): on a GPU under bf16 autocast with fp32 master weights
and compiled by default; on the CPU in fp32, uncompiled, as the local engine.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import redis
import torch
import torch.distributed as dist

from dkdm_core.checkpoint import load_train_state, save_checkpoint, save_model
from dkdm_core.plan import JobPlan
from dkdm_core.runtime import compiled
from dkdm_core.students import init_student
from dkdm_core.training import Learner, StepLogs, read_logs
from services.engine.loop import Knowledge
from services.engine.replica import actor_runtime
from services.jobs.client import RedisUnavailable
from services.jobs.store import JobStore, RecordGone
from services.quality import quality_at

log = logging.getLogger(__name__)

Fetch = Callable[[float], Knowledge | None]
FETCH_SLICE_S = 1.0  # how long one wait on the queue lasts before control requests are checked
STOPPED_BY = "stopped_by"  # reported with the last checkpoint of a rank that lost Redis: the job's error


class JobAborted(RuntimeError):
    """The driver gave up on the job (e.g. no teacher replica left); ranks stop at once."""


class StudentRank:
    """One student rank: its Learner (the plan's student and chain), its queue and its bookkeeping."""

    def __init__(
        self,
        *,
        plan: JobPlan,
        fetch: Fetch,
        device: torch.device,
        rank: int = 0,
        store: JobStore | None = None,
        shard_states: Callable[[], dict[int, Any]] | None = None,
        out: Path | None = None,
    ) -> None:
        spec = plan.spec
        # The student as the local engine builds it: same seed, same initial weights, same chain.
        self.learner = Learner(
            init_student(plan),
            plan.build_chain(),
            spec.optim,
            spec.vlb_weight,
            plan.objective,
            runtime=actor_runtime(plan, str(device)),
        )
        self.card = plan.student_card
        self.spec = spec
        self.fetch = fetch
        self.rank = rank
        self.store = store
        self.shard_states = shard_states
        self.out = out
        self.wait_seconds = 0.0
        self.busy_seconds = 0.0
        self.started = time.perf_counter()
        self.last_logs: StepLogs = {}
        self.stopped_by = ""  # the Redis error that stopped this rank, if one did

    @property
    def steps_done(self) -> int:
        return self.learner.steps_done

    def next_batch(self) -> Knowledge:
        """Wait for this rank's next knowledge batch; fail loudly if none comes for too long."""
        start = time.perf_counter()
        while True:
            item = self.fetch(FETCH_SLICE_S)
            if item is not None:
                self.wait_seconds += time.perf_counter() - start
                return item
            if self.store is not None and self.store.control().get("abort"):
                raise JobAborted(f"job aborted by the driver: {self.store.control()['abort']}")
            if time.perf_counter() - start > self.spec.ray.starve_timeout_s:
                raise RuntimeError(f"rank {self.rank}: no knowledge batch for {self.spec.ray.starve_timeout_s:.0f} s")

    def step(self) -> StepLogs:
        t0 = time.perf_counter()
        item = self.next_batch()
        if self.store is not None and not self.store.consume(item.batch_id):
            raise RuntimeError(f"knowledge batch {item.batch_id} was delivered twice")
        t1 = time.perf_counter()
        logs = self.learner.learn(item.batch)
        t2 = time.perf_counter()
        self.busy_seconds += t2 - t1
        if self.store is not None:
            self.store.add(
                student_steps_total=int(self.rank == 0), student_wait_seconds=t1 - t0, student_busy_seconds=t2 - t1
            )
        self.last_logs = logs
        return logs

    def idle_fraction(self) -> float:
        wall = time.perf_counter() - self.started
        return self.wait_seconds / wall if wall > 0 else 0.0

    def log(self, logs: StepLogs) -> None:
        """Rank 0 appends to OUT/log.jsonl (the local engine's format) and publishes to Redis."""
        record = {
            "step": self.steps_done,
            **read_logs(logs),
            "idle_fraction": self.idle_fraction(),
            "elapsed_s": time.perf_counter() - self.started,
        }
        if self.store is not None:
            self.store.set_metrics({k: v for k, v in record.items() if k != "step"})
            self.store.update(step=self.steps_done)
        if self.out is not None:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def quality(self) -> None:
        """Rank 0, on ``run.quality_every``'s steps: the EMA student's teacher-feature FD, logged and
        published (the job's metric; the dashboard plots it over steps). Training waits meanwhile."""
        if self.out is None:
            return
        model, run = self.learner.ema.model, self.spec.run
        figures = quality_at(model, self.card, run, self.spec.seed, self.out, self.steps_done)
        if not figures:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": self.steps_done, "quality": figures}) + "\n")
        if self.store is not None:
            self.store.set_metrics(figures)

    def stop_requested(self) -> bool:
        return bool(self.store is not None and self.store.cancel_requested())

    def save(self, root: Path) -> Path:
        """A checkpoint folder: EMA model + student/optimiser/EMA/step + a snapshot of every pool shard."""
        state = self.learner.state_dict()
        state["pool_shards"] = self.shard_states() if self.shard_states is not None else {}
        path = save_checkpoint(root, self.steps_done, self.learner.ema.model, self.card, state)
        if self.out is not None:
            save_model(self.out, self.learner.ema.model, self.card)
            self.save_copy()
        return path

    def save_copy(self) -> None:
        """The job record's durable copy beside the checkpoint; skipped (logged) while Redis is lost."""
        if self.store is None or self.out is None or self.stopped_by:
            return
        try:
            self.store.save_copy(self.out)
        except (redis.RedisError, OSError) as exc:
            log.warning("durable copy of job %s not refreshed: %s", self.store.job_id, exc)

    def restore(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any (all ranks must stop at the same step)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    # NCCL reduces GPU tensors only; gloo takes either.
    value = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class QueueFetch:
    """Fetch from a BatchQueue actor, keeping one get in flight so the next batch arrives during a step."""

    def __init__(self, handle: Any, store: JobStore | None) -> None:
        self.handle = handle
        self.store = store
        self.pending: Any = None

    def __call__(self, timeout: float) -> Knowledge | None:
        if self.pending is None:
            self.pending = self.handle.get.remote(timeout)
        ready, _ = ray.wait([self.pending], timeout=timeout + 5.0)
        if not ready:
            return None
        item = ray.get(self.pending)
        self.pending = self.handle.get.remote(FETCH_SLICE_S) if item is not None else None
        return item

    def drop_pending(self) -> None:
        """At the end: a prefetched batch nobody will train on is counted as dropped."""
        if self.pending is not None and ray.get(self.pending) is not None and self.store is not None:
            self.store.add(batches_dropped=1)
        self.pending = None


def _report(loop: StudentRank, rank: int) -> None:
    metrics: dict[str, Any] = {"step": loop.steps_done, **read_logs(loop.last_logs)}
    if loop.stopped_by:
        metrics[STOPPED_BY] = loop.stopped_by
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="dkdm-ckpt-") as tmp:
        path = loop.save(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)))


def _restore(loop: StudentRank, config: dict[str, Any]) -> None:
    """Continue from the driver's resume point, or from a checkpoint this run made since.

    Ray Train hands back its newest registered checkpoint; one that existed before this run started
    is ignored for the driver's choice (``resume_from``), which the pool was restored from too, so
    student and pool always come from the same checkpoint. A newer one was saved during this run by
    a worker group that then failed: the pool in the shards has moved on past it already.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and Path(checkpoint.path).name not in config["checkpoints_before"]:
        with checkpoint.as_directory() as directory:
            loop.restore(load_train_state(directory))
    elif config["resume_from"] is not None:
        loop.restore(load_train_state(config["resume_from"]))


def _train(loop: StudentRank, store: JobStore, rank: int) -> None:
    """Consume knowledge batches until the step budget is spent or a cancel is requested."""
    spec, run = loop.spec, loop.spec.run
    while loop.steps_done < spec.steps:
        logs = loop.step()
        step = loop.steps_done
        stop = False
        if step % run.log_every == 0 or step == spec.steps:
            store.heartbeat(f"student-{rank}", step=step)
            if rank == 0:
                loop.log(logs)
            stop = _any_rank(loop.stop_requested(), loop.learner.device)
        if step % run.checkpoint_every == 0 or step == spec.steps or stop:
            _report(loop, rank)
        if rank == 0 and step != spec.steps and not stop:
            loop.quality()  # the driver evaluates the final student
        if stop:
            break


def data_parallel(learner: Learner) -> torch.nn.Module:
    """The student wrapped in DDP, compiled as the runtime says. CUDA graphs would not hold DDP's
    gradient all-reduce (autograd hooks outside the compiled graph): ``cudagraphs`` compiles the
    wrapper with the default mode here."""
    ddp = torch.nn.parallel.DistributedDataParallel(learner.model)
    runtime = learner.runtime
    if runtime.compile == "cudagraphs":
        runtime = replace(runtime, compile="default")
    return compiled(ddp, runtime)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One student rank: restore, then consume knowledge batches until the step budget is spent."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    store = JobStore(config["redis_url"], config["job_id"], ride_out_s=config["ride_out_s"])
    shards = config["shards"]
    fetch = QueueFetch(config["queues"][rank], store)
    loop = StudentRank(
        plan=JobPlan.model_validate(config["plan"]),
        fetch=fetch,
        device=ray.train.torch.get_device(),
        rank=rank,
        store=store,
        shard_states=lambda: dict(enumerate(ray.get([s.state_dict.remote() for s in shards]))),
        out=Path(config["out"]) if rank == 0 else None,
    )
    _restore(loop, config)
    if world > 1:
        loop.learner.forward = data_parallel(loop.learner)
    store.heartbeat(f"student-{rank}", step=loop.steps_done)
    try:
        _train(loop, store, rank)
    except (RedisUnavailable, RecordGone) as exc:
        if world > 1:  # a peer may wait in a collective: only Ray Train can stop the group now
            raise
        # One rank: stop here with a checkpoint, reported as a normal end, so Ray Train does not
        # restart the rank against a Redis that is gone; the driver fails the job with this error.
        loop.stopped_by = f"{type(exc).__name__}: {exc}"
        _report(loop, rank)
        return
    fetch.drop_pending()
