"""TeacherReplica: a loaded teacher that initialises pool shards and then advances the pool.

One plain class: the driver places it as a Ray actor (threaded, so ``stop`` is answered while
``run`` loops); unit tests drive ``init_shard`` and ``teach`` directly. The teacher step itself is
``dkdm_core.training.Teacher``, the same object the local engine's ``Distiller`` steps through, and
the noise seed comes from the plan, so replica 0 of a fresh job reproduces the local engine.

The teacher runs as the job's ``runtime`` section says, resolved here for the device Ray gave this
actor (the driver may have none): on a GPU in bf16 and compiled by default, its noise from a seeded
generator on the device; on the CPU in fp32, uncompiled, with a CPU generator, as the local engine.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dkdm_core.checkpoint import DIFFUSERS_ARCHS, WEIGHTS_FILE, build_from_card, import_diffusers, load_weights
from dkdm_core.plan import JobPlan
from dkdm_core.pool import Lease, NoisePool
from dkdm_core.runtime import Runtime, resolve_runtime
from dkdm_core.training import StudentBatch, Teacher
from dkdm_core.wire import Packed
from services.engine.loop import ReplicaLoop, blocking
from services.jobs.store import JobStore


def load_teacher(plan: JobPlan, device: torch.device) -> torch.nn.Module:
    """The teacher's weights in the network the plan's card describes: the card is not read again
    (an imported diffusers pipeline is rebuilt from its own configs, as the local engine loads it)."""
    if plan.teacher_card.arch in DIFFUSERS_ARCHS:
        return import_diffusers(Path(plan.teacher_dir), device)[0]
    model = build_from_card(plan.teacher_card)
    weights = Path(plan.teacher_dir) / WEIGHTS_FILE
    load_weights(model, load_file(str(weights)), str(weights))
    return model.to(device)


SHIP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # ``ray.ship_dtype``


def actor_runtime(plan: JobPlan, device: str) -> Runtime:
    """The job's runtime resolved for ``device``, the one Ray placed this actor on, and applied.

    ``compile: step`` records a whole local step (lease, teacher, loss, update) as one CUDA graph;
    a replica or a rank holds only half a step, so its network is compiled with CUDA graphs.
    """
    r = plan.spec.runtime
    runtime = resolve_runtime(device, r.precision, r.compile).without_step()
    runtime.apply_global()
    return runtime


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` on the host: GPU ones copied without blocking into pinned memory, then one wait
    for all of them (instead of one synchronising ``.cpu()`` each); CPU ones as they are."""
    cuda = [x for x in tensors if x.is_cuda]
    if not cuda:
        return tensors
    out = [
        torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True) if x.is_cuda else x
        for x in tensors
    ]
    torch.cuda.current_stream(cuda[0].device).synchronize()
    return out


def _packed_put(put: Any) -> Any:
    return lambda lease_id, x_prev: put(lease_id, Packed(x_prev))


class TeacherReplica:
    def __init__(
        self,
        *,
        plan: JobPlan | dict[str, Any],
        index: int,
        generation: int = 0,
        device: str = "cpu",
        threads: int = 0,
        redis_url: str | None = None,
        job_id: str | None = None,
        ride_out_s: float | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.plan = JobPlan.model_validate(plan)
        self.index = index
        self.name = f"teacher-{index}"
        runtime = actor_runtime(self.plan, device)
        # A CPU generator on the CPU (replica 0 reproduces the local engine's noise), a device one on a GPU.
        rng = runtime.generator(self.plan.teacher_seed(index, generation))
        teacher = load_teacher(self.plan, runtime.device)
        self.teacher = Teacher(teacher, self.plan.build_chain(), rng, runtime, self.plan.guidance())
        self.ship_dtype = SHIP_DTYPES[self.plan.spec.ray.ship_dtype]
        self.store = JobStore(redis_url, job_id, ride_out_s=ride_out_s) if redis_url and job_id else None
        self.stop_event = threading.Event()

    @property
    def evaluations(self) -> int:
        return self.teacher.evaluations

    def init_shard(self, index: int) -> dict[str, Any]:
        """Build shard ``index``'s pool here, next to the teacher (shuffle denoise or trajectory taps).

        Returns the pool's state (what ``PoolShard.load_state_dict`` takes). The pool draws from the
        shard's generator, exactly as the shard would.
        """
        spec, plan = self.plan.spec, self.plan
        rng = torch.Generator().manual_seed(plan.pool_seed(index))
        size = plan.shard_sizes[index]
        pool = NoisePool(spec.pool.strategy, size, plan.sample_shape, plan.chain_length, rng, classes=plan.pool_classes)
        spent = self.teacher.init_pool(pool, spec.teacher_batch_size, spec.pool.init, spec.pool.per_trajectory)
        if self.store is not None:
            self.store.add(pool_init_teacher_evaluations=spent)
        return {"pool": pool.state_dict(), "advanced": 0}

    def teach(self, lease: Lease) -> tuple[torch.Tensor, StudentBatch]:
        """One no-grad teacher call on a lease: x̂_{t-1} (fp32) for the lease's shard, and what a
        student rank needs, x_t and the teacher's output in ``ray.ship_dtype``; all on the host."""
        self.teacher.runtime.begin_step()
        batch = self.teacher.teach(lease)
        ship = self.ship_dtype
        # The lease's x_t and t are on the host already: only a cast (on the device) makes a copy.
        x_t = lease.x_t if ship == torch.float32 else batch.x_t.to(ship)
        labels = [] if batch.labels is None else [batch.labels]  # some set to the null class here
        x_prev, x_t, target, *rest = to_host([batch.x_prev, x_t, batch.teacher_output.to(ship), *labels])
        return x_prev, StudentBatch(x_t=x_t, t=lease.t, teacher_output=target, labels=rest[0] if rest else None)

    def run(self, shards: list[Any], queues: list[Any], attempt: int) -> dict[str, int]:
        """Lease from the shard actors and feed the rank queues until ``stop``; returns what it did."""
        loop = ReplicaLoop(
            replica=self,
            takes=[blocking(s.take) for s in shards],
            # x̂_{t-1} goes back wrapped, so it pickles through numpy as leases and batches do.
            puts=[_packed_put(blocking(s.put)) for s in shards],
            offers=[blocking(q.put) for q in queues],
            batch_size=self.plan.rank_batch,
            attempt=attempt,
            store=self.store,
            stop_event=self.stop_event,
        )
        return loop.run()

    def stop(self) -> None:
        self.stop_event.set()
