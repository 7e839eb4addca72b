"""PoolShard: one slice of the knowledge pool, owned by one actor (a plain class here).

The mutable tensors stay inside the shard; leases leave it as immutable copies and one-step-
denoised samples come back by lease id, so a shard is safe to share between any number of
teacher replicas. Leases that are not returned within ``lease_timeout_s`` (a replica died) are
released and their samples handed out again; a late answer to such a lease is refused, so no
sample is lost or advanced twice.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from dkdm_core.plan import JobPlan
from dkdm_core.pool import Lease, NoisePool, StaleLeaseError
from dkdm_core.wire import Packed, tensor_of


class PoolShard:
    """Shard ``index`` of the plan's pool. A Ray actor where the driver places it (calls run one at
    a time, so the shard needs no locks); a plain object in unit tests."""

    def __init__(self, *, plan: JobPlan | dict[str, Any], index: int) -> None:
        plan = JobPlan.model_validate(plan)
        self.index = index
        self.lease_timeout_s = plan.spec.ray.lease_timeout_s
        rng = torch.Generator().manual_seed(plan.pool_seed(index))
        size = plan.shard_sizes[index]
        self.pool = NoisePool(
            plan.spec.pool.strategy, size, plan.sample_shape, plan.chain_length, rng, classes=plan.pool_classes
        )
        self.advanced = 0  # samples replaced by a teacher step
        self.expired = 0  # leases released after their deadline
        self.stale = 0  # answers refused because their lease had expired
        self.ready = False  # True once initialised (shuffle denoise) or restored

    # Pool state ---------------------------------------------------------------------------------

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take an initialised or snapshotted pool (built by a replica, or from a checkpoint)."""
        self.pool.load_state_dict(state["pool"])
        self.advanced = int(state.get("advanced", 0))
        self.ready = True

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict(), "advanced": self.advanced}

    def stats(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "size": self.pool.size,
            "ready": self.ready,
            "histogram": self.pool.t_histogram(),
            "t_min": int(self.pool.t.min()),
            "t_max": int(self.pool.t.max()),
            "outstanding": len(self.pool.leases),
            "lease_ids": sorted(self.pool.leases),
            "leased_samples": int(self.pool.leased.sum()),
            "advanced": self.advanced,
            "finished": self.pool.finished,
            "expired": self.expired,
            "stale": self.stale,
        }

    # Leases -------------------------------------------------------------------------------------

    def expire(self) -> list[int]:
        expired = self.pool.expire(time.monotonic())
        self.expired += len(expired)
        return expired

    def take(self, batch_size: int) -> Lease | None:
        """A lease of ``batch_size`` samples, or None while too few are free (all leased out)."""
        if not self.ready:
            return None
        self.expire()
        free = self.pool.size - int(self.pool.leased.sum())
        if free < batch_size:
            return None
        return self.pool.take(batch_size, now=time.monotonic(), timeout=self.lease_timeout_s)

    def put(self, lease_id: int, x_prev: torch.Tensor | Packed) -> bool:
        """Advance a lease's samples; False if the lease had expired (the answer is dropped)."""
        x_prev = tensor_of(x_prev)
        try:
            self.pool.put(lease_id, x_prev)
        except StaleLeaseError:
            self.stale += 1
            return False
        self.advanced += x_prev.shape[0]
        return True
