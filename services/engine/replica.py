"""TeacherReplica: a loaded teacher that initialises pool shards and takes one-step teacher calls.

Plain class; ``actors.TeacherReplicaActor`` wraps it with the loop that leases from shards and
feeds student queues. Randomness is explicit: replica i of generation g draws its ancestral-step
noise from its own generator, so replica 0 of a fresh job reproduces the local engine's teacher.
"""

from __future__ import annotations

from typing import Any

import torch

from dkdm_core.checkpoint import load_model
from dkdm_core.pool import Lease, NoisePool, PoolInit, Strategy
from dkdm_core.training import KnowledgeBatch, teacher_step
from services.engine.shard import shard_seed


def replica_seed(seed: int, index: int, generation: int) -> int:
    """Replica ``index``'s noise seed; replica 0 of generation 0 matches the local engine (seed + 1)."""
    return seed + 1 + index * 7_919 + generation * 104_729


class TeacherReplica:
    def __init__(
        self,
        teacher_dir: str,
        chain_steps: int | None,
        seed: int,
        index: int,
        generation: int = 0,
        device: str = "cpu",
        threads: int = 0,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.teacher, self.card = load_model(teacher_dir, self.device)
        self.teacher.eval().requires_grad_(False)
        diff = self.card.diffusion
        self.chain = diff.build(self.card.learn_sigma, respacing=chain_steps)
        self.seed = seed
        self.index = index
        self.generator = torch.Generator().manual_seed(replica_seed(seed, index, generation))
        self.evaluations = 0

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The pool's DenoiseFn for shuffle denoise: one teacher step, back on the CPU."""
        self.evaluations += x_t.shape[0]
        return teacher_step(self.teacher, self.chain, x_t, t, self.generator, self.device).x_prev.cpu()

    def init_shard(
        self,
        index: int,
        strategy: Strategy,
        size: int,
        teacher_batch_size: int,
        method: PoolInit = "shuffle",
        per_trajectory: int = 8,
    ) -> tuple[dict[str, Any], int]:
        """Build shard ``index``'s pool here, next to the teacher (shuffle denoise or trajectory taps).

        Returns the pool's state (what ``PoolShard.load_state_dict`` takes) and the teacher
        evaluations spent. The pool draws from the shard's generator, exactly as the shard would.
        """
        pool = NoisePool(
            strategy,
            size,
            self.card.sample_shape,
            self.chain.num_timesteps,
            torch.Generator().manual_seed(shard_seed(self.seed, index)),
        )
        spent = pool.initialise(self.denoise, teacher_batch_size, method, per_trajectory)
        return {"pool": pool.state_dict(), "advanced": 0}, spent

    def teach(self, lease: Lease) -> KnowledgeBatch:
        """One no-grad teacher call on a lease; every tensor of the result is on the CPU."""
        self.evaluations += lease.ids.numel()
        batch = teacher_step(self.teacher, self.chain, lease.x_t, lease.t, self.generator, self.device)
        return KnowledgeBatch(
            x_t=batch.x_t.cpu(), t=batch.t.cpu(), teacher_output=batch.teacher_output.cpu(), x_prev=batch.x_prev.cpu()
        )
