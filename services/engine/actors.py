"""Ray actor wrappers: thin ``@ray.remote`` shells over the plain engine classes.

Methods that hand back ObjectRefs say so in their names; everything else returns values.
"""

from __future__ import annotations

import threading
from typing import Any

import ray
import torch

from dkdm_core.pool import Lease
from services.engine.batch_queue import BatchQueue
from services.engine.loop import ReplicaLoop
from services.engine.replica import TeacherReplica
from services.engine.shard import PoolShard
from services.jobs.store import JobStore


@ray.remote(num_cpus=0)
class PoolShardActor(PoolShard):
    """One pool slice; calls run one at a time, so the shard needs no locks."""


@ray.remote(num_cpus=0, max_concurrency=64)
class BatchQueueActor(BatchQueue):
    """One rank's queue; threaded so blocked puts and a blocked get wait side by side."""


class RemoteShard:
    """A ``loop.Shard`` over a PoolShardActor handle (blocking calls from inside a replica)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def take(self, batch_size: int) -> Lease | None:
        return ray.get(self.handle.take.remote(batch_size))

    def put(self, lease_id: int, x_prev: torch.Tensor) -> bool:
        return bool(ray.get(self.handle.put.remote(lease_id, x_prev)))


class RemoteQueue:
    """A ``loop.Queue`` over a BatchQueueActor handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def put(self, item: Any, timeout: float) -> bool:
        return bool(ray.get(self.handle.put.remote(item, timeout)))


@ray.remote(max_concurrency=4)
class TeacherReplicaActor:
    """A teacher replica: initialises shards, then runs its ReplicaLoop until told to stop.

    Threaded (``max_concurrency``) so ``stop`` and ``stats`` are answered while ``run`` loops.
    """

    def __init__(
        self,
        teacher_dir: str,
        chain_steps: int | None,
        seed: int,
        index: int,
        generation: int,
        device: str,
        threads: int,
        redis_url: str,
        job_id: str,
    ) -> None:
        self.replica = TeacherReplica(teacher_dir, chain_steps, seed, index, generation, device, threads)
        self.store = JobStore(redis_url, job_id)
        self.name = f"teacher-{index}"
        self.stop_event = threading.Event()

    def init_shard(
        self, index: int, strategy: Any, size: int, teacher_batch_size: int, method: Any, per_trajectory: int
    ) -> dict[str, Any]:
        state, spent = self.replica.init_shard(index, strategy, size, teacher_batch_size, method, per_trajectory)
        self.store.add(pool_init_teacher_evaluations=spent)
        return state

    def run(self, shards: list[Any], queues: list[Any], batch_size: int, attempt: int) -> dict[str, int]:
        loop = ReplicaLoop(
            self.replica,
            [RemoteShard(h) for h in shards],
            [RemoteQueue(h) for h in queues],
            batch_size,
            attempt,
            self.store,
            self.name,
            self.stop_event,
        )
        return loop.run()

    def stop(self) -> None:
        self.stop_event.set()

    def ready(self) -> bool:
        return True
