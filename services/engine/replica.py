"""TeacherReplica: a loaded teacher that initialises pool shards and then advances the pool.

One plain class: the driver places it as a Ray actor (threaded, so ``stop`` is answered while
``run`` loops); unit tests drive ``init_shard`` and ``teach`` directly. The teacher step itself is
``dkdm_core.training.Teacher``, the same object the local engine's ``Distiller`` steps through, and
the noise seed comes from the plan, so replica 0 of a fresh job reproduces the local engine.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from dkdm_core.checkpoint import DIFFUSERS_ARCHS, WEIGHTS_FILE, build_from_card, import_diffusers, load_weights
from dkdm_core.plan import JobPlan
from dkdm_core.pool import Lease, NoisePool
from dkdm_core.runtime import CPU_FP32
from dkdm_core.training import KnowledgeBatch, Teacher
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
        # fp32 and a CPU generator, as the local engine on the CPU: replica 0 reproduces its noise.
        runtime = replace(CPU_FP32, device=torch.device(device))
        rng = torch.Generator().manual_seed(self.plan.teacher_seed(index, generation))
        teacher = load_teacher(self.plan, runtime.device)
        self.teacher = Teacher(teacher, self.plan.build_chain(), rng, runtime, self.plan.guidance())
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

    def teach(self, lease: Lease) -> KnowledgeBatch:
        """One no-grad teacher call on a lease; every tensor of the result is on the CPU."""
        batch = self.teacher.teach(lease)
        return KnowledgeBatch(
            x_t=batch.x_t.cpu(),
            t=batch.t.cpu(),
            teacher_output=batch.teacher_output.cpu(),
            x_prev=batch.x_prev.cpu(),
            labels=None if batch.labels is None else batch.labels.cpu(),
        )

    def run(self, shards: list[Any], queues: list[Any], attempt: int) -> dict[str, int]:
        """Lease from the shard actors and feed the rank queues until ``stop``; returns what it did."""
        loop = ReplicaLoop(
            replica=self,
            takes=[blocking(s.take) for s in shards],
            puts=[blocking(s.put) for s in shards],
            offers=[blocking(q.put) for q in queues],
            batch_size=self.plan.rank_batch,
            attempt=attempt,
            store=self.store,
            stop_event=self.stop_event,
        )
        return loop.run()

    def stop(self) -> None:
        self.stop_event.set()
