"""ReplicaLoop: what a teacher replica does all job long, over any shard and queue objects.

lease a random subset from a shard → one no-grad teacher call → return the one-step-denoised
samples to the shard → hand the knowledge batch to a student rank's bounded queue. The loop talks
to shards and queues through plain calls, so unit tests drive it with ``PoolShard`` and
``BatchQueue`` objects in this process and a replica actor with blocking calls to the actors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import torch

from dkdm_core.pool import Lease
from dkdm_core.training import StudentBatch
from services.jobs.keys import lease_field
from services.jobs.store import JobStore

if TYPE_CHECKING:
    from services.engine.batch_queue import BatchQueue
    from services.engine.replica import TeacherReplica
    from services.engine.shard import PoolShard

HEARTBEAT_EVERY_S = 2.0
IDLE_SLEEP_S = 0.005  # back-off while every shard's samples are leased out


Take = Callable[[int], Lease | None]  # a shard's take(batch_size)
Put = Callable[[int, torch.Tensor], bool]  # a shard's put(lease_id, x_prev)
Offer = Callable[[Any, float], bool]  # a queue's put(item, timeout)


def blocking(method: Any) -> Callable[..., Any]:
    """An actor method as a plain blocking call: ``blocking(handle.take)(b)`` is ``ray.get(handle.take.remote(b))``."""
    return lambda *args: ray.get(method.remote(*args))


@dataclass(frozen=True)
class Knowledge:
    """What travels to a student rank: the batch and its job-unique id (for exactly-once checks).

    Only what the student reads: x̂_{t-1} went back to its shard and does not travel a second time.
    """

    batch_id: str
    batch: StudentBatch


class ReplicaLoop:
    """A replica's work over shards and queues reached through plain calls: the shards' and queues'
    own methods in unit tests, ``blocking`` actor calls on Ray."""

    def __init__(
        self,
        *,
        replica: TeacherReplica,
        takes: list[Take],
        puts: list[Put],
        offers: list[Offer],
        batch_size: int,
        attempt: int,
        store: JobStore | None = None,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.replica = replica
        self.takes, self.puts, self.offers = takes, puts, offers
        self.batch_size = batch_size
        self.attempt = attempt
        self.store = store
        self.name = replica.name
        self.stop_event = stop_event or threading.Event()
        # Replica i starts at shard i and queue i so replicas spread over both from the first step.
        self.next_shard = replica.index % len(takes)
        self.next_queue = replica.index % len(offers)
        self.delivered = 0
        self.undelivered = 0
        self.stale = 0
        self._last_beat = 0.0

    @classmethod
    def local(
        cls, replica: TeacherReplica, shards: list[PoolShard], queues: list[BatchQueue], batch_size: int, attempt: int
    ) -> ReplicaLoop:
        """The loop over plain shards and queues in this process (unit tests)."""
        takes, puts = [s.take for s in shards], [s.put for s in shards]
        offers = [q.put for q in queues]
        return cls(replica=replica, takes=takes, puts=puts, offers=offers, batch_size=batch_size, attempt=attempt)

    def lease(self) -> tuple[int, Lease] | None:
        n = len(self.takes)
        for offset in range(n):
            k = (self.next_shard + offset) % n
            lease = self.takes[k](self.batch_size)
            if lease is not None:
                self.next_shard = (k + 1) % n
                return k, lease
        return None

    def deliver(self, item: Knowledge) -> bool:
        """Put ``item`` into the next rank's queue, waiting for room until the loop is stopped."""
        offer = self.offers[self.next_queue]
        while not self.stop_event.is_set():
            if offer(item, 0.5):
                self.next_queue = (self.next_queue + 1) % len(self.offers)
                return True
        return False

    def step(self) -> bool:
        """One lease → teacher call → return → hand-off; False when no shard had samples to lease."""
        t0 = time.perf_counter()
        taken = self.lease()
        t1 = time.perf_counter()
        if taken is None:
            return False
        k, lease = taken
        if self.store is not None:
            self.store.open_lease(k, lease.lease_id, self.name)
        x_prev, batch = self.replica.teach(lease)
        t2 = time.perf_counter()
        accepted = self.puts[k](lease.lease_id, x_prev)
        t3 = time.perf_counter()
        b = lease.ids.numel()
        if self.store is not None:  # the lease is closed in the shard: close it in the table too
            self.store.close_lease(
                k,
                lease.lease_id,
                teacher_calls=1,
                teacher_evaluations=b,
                samples_advanced=b if accepted else 0,
                stale_returns=int(not accepted),
                teacher_busy_seconds=t2 - t1,
                lease_seconds=t1 - t0,
                return_seconds=t3 - t2,
            )
        if not accepted:
            self.stale += 1  # the lease expired and was re-issued: this answer must not count
            return True
        delivered = self.deliver(Knowledge(f"{self.attempt}:{lease_field(k, lease.lease_id)}", batch))
        self.delivered += delivered
        self.undelivered += not delivered
        if self.store is not None:
            self.store.add(
                batches_produced=int(delivered),
                batches_dropped=int(not delivered),
                queue_put_seconds=time.perf_counter() - t3,
            )
        return True

    def beat(self) -> None:
        now = time.monotonic()
        if self.store is not None and now - self._last_beat >= HEARTBEAT_EVERY_S:
            self.store.heartbeat(self.name, delivered=self.delivered)
            self._last_beat = now

    def run(self) -> dict[str, int]:
        """Loop until ``stop_event`` is set; returns what this replica did."""
        while not self.stop_event.is_set():
            if not self.step():
                time.sleep(IDLE_SLEEP_S)
            self.beat()
        return {"delivered": self.delivered, "undelivered": self.undelivered, "stale": self.stale}
