"""The knowledge pool of dynamic iterative distillation (DKDM paper Sec. 3.3, Fig. 3, Algorithm 1).

A pool holds noisy samples ``x̂^t`` and their timestep index ``t`` on a *chain*: the diffusion whose
steps the teacher takes. The chain is the teacher's full T steps or a respaced K-step subset (the
pool only knows its length). A student step leases a subset, the teacher denoises it one step, and
the denoised samples replace their counterparts; a sample denoised past ``t = 0`` has finished its
trajectory and restarts from fresh noise at ``t = T-1``.

Strategies (the paper's ablation, Fig. 4a):

* ``iterative``: ``b`` samples, all starting from noise; every step advances the whole batch.
* ``shuffled``: as iterative, but shuffle denoise first spreads ``t`` uniformly over the chain.
* ``dynamic``: ``ρ·T·b`` samples after shuffle denoise; every step takes a random subset of ``b``.

All randomness comes from the pool's own ``torch.Generator`` so a seeded pool is reproducible and a
snapshot (``state_dict``) continues exactly where it stopped. Leases make the pool safe to share:
a leased sample cannot be handed out again until its lease is put back (advanced) or released or
expired (not advanced). Each lease has its own id, so an answer that arrives after its lease expired
is refused rather than advancing samples a second time. Time is passed in (``now``), never read.

Class-conditional pools (``classes``) keep each sample's class label beside it, drawn uniformly from
the job's classes when a slot starts a trajectory (creation, initialisation, restart) and kept through
lease, advance and snapshot: a trajectory is denoised under one label from T to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from dkdm_core.wire import pack, rebuild

Strategy = Literal["iterative", "shuffled", "dynamic"]
# How a shuffled/dynamic pool gets its spread of t: shuffle denoise (the paper) or trajectory taps.
PoolInit = Literal["shuffle", "trajectory"]
# (x_t (B, ...), t (B,), labels (B,) or None) -> x_{t-1} (B, ...): one no-grad teacher step on the chain.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def pool_size(strategy: Strategy, batch_size: int, chain_length: int, rho: float) -> int:
    """|B^+| = ρ·T·b for the dynamic strategy (never below one batch), b otherwise."""
    if strategy == "dynamic":
        return max(batch_size, round(rho * chain_length * batch_size))
    return batch_size


@dataclass(frozen=True)
class Lease:
    """Samples handed out for one teacher step: their pool ids, x̂_t, t and class labels."""

    lease_id: int
    ids: torch.Tensor  # (b,) long
    x_t: torch.Tensor  # (b, C, H, W)
    t: torch.Tensor  # (b,) long
    labels: torch.Tensor | None = None  # (b,) long; None for an unconditional pool

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled through numpy (``dkdm_core.wire``): a lease crosses a Ray call every teacher step."""
        return rebuild, (Lease, *(pack(x) for x in (self.lease_id, self.ids, self.x_t, self.t, self.labels)))


class StaleLeaseError(ValueError):
    """A lease returned twice, or after it expired and its samples were handed out again."""


@dataclass
class _Outstanding:
    ids: torch.Tensor
    deadline: float = field(default=math.inf)


class NoisePool:
    """A fixed-size set of noisy samples moving down the chain, with leases."""

    def __init__(
        self,
        strategy: Strategy,
        size: int,
        sample_shape: tuple[int, ...],
        chain_length: int,
        generator: torch.Generator,
        sync_free: bool | None = None,
        classes: Sequence[int] | None = None,
    ) -> None:
        if size < 1 or chain_length < 1:
            raise ValueError("pool size and chain length must be positive")
        if classes is not None and len(classes) == 0:
            raise ValueError("a class-conditional pool needs at least one class")
        self.strategy: Strategy = strategy
        self.chain_length = chain_length
        self.sample_shape = tuple(sample_shape)
        self.generator = generator
        # The pool lives where its generator does: on a GPU, leases and returns never leave it.
        device = generator.device
        self.x = torch.randn((size, *self.sample_shape), generator=generator, device=device)  # (N, C, H, W)
        self.t = torch.full((size,), chain_length - 1, dtype=torch.long, device=device)  # (N,)
        self.leased = torch.zeros(size, dtype=torch.bool, device=device)  # (N,)
        # The class ids labels are drawn from; drawn after x so an unconditional pool draws as before.
        self.classes = None if classes is None else torch.tensor(list(classes), dtype=torch.long, device=device)
        self.labels = self._draw_labels(size)  # (N,) long, or None
        self.leases: dict[int, _Outstanding] = {}
        self.next_lease_id = 0
        # None: sync-free exactly when the pool is on a GPU (on a CPU there is no device to wait for,
        # and the CPU path keeps today's random draws bit for bit).
        self._sync_free = sync_free
        # Trajectories that reached t = 0 and restarted; sync-free: a device counter, read when logged.
        self._finished: int | torch.Tensor = self._counter(0)

    def _counter(self, value: int) -> int | torch.Tensor:
        if self.sync_free:  # updated in place, so a recorded CUDA graph keeps counting on replay
            return torch.tensor(value, dtype=torch.long, device=self.device)
        return value

    def _draw_labels(self, num: int) -> torch.Tensor | None:
        """``num`` labels uniform over the pool's classes, from the pool's generator; None if unconditional."""
        if self.classes is None:
            return None
        picks = torch.randint(0, self.classes.numel(), (num,), generator=self.generator, device=self.device)
        return self.classes[picks]

    def _labels_of(self, ids: torch.Tensor) -> torch.Tensor | None:
        return None if self.labels is None else self.labels[ids]

    @property
    def finished(self) -> int:
        return int(self._finished)

    @property
    def sync_free(self) -> bool:
        """On a GPU every step avoids data-dependent shapes, which would make the host wait for the device."""
        return self.device.type != "cpu" if self._sync_free is None else self._sync_free

    @property
    def size(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    # Initialisation ---------------------------------------------------------------------------

    def shuffle_denoise(self, denoise: DenoiseFn, batch_size: int) -> int:
        """Denoise each sample a uniformly random number of steps so t ~ U{0, ..., T-1}.

        Costs about T/2 teacher evaluations per sample; returns the number spent.
        """
        targets = torch.randint(0, self.chain_length, (self.size,), generator=self.generator, device=self.device)
        evaluations = 0
        while True:
            active = torch.nonzero(self.t > targets).squeeze(1)
            if active.numel() == 0:
                return evaluations
            for ids in active.split(batch_size):
                self.x[ids] = denoise(self.x[ids], self.t[ids], self._labels_of(ids))
                self.t[ids] -= 1
                evaluations += ids.numel()

    def trajectory_init(self, denoise: DenoiseFn, batch_size: int, per_trajectory: int) -> int:
        """A cheaper initialisation: each teacher trajectory from T fills ``per_trajectory`` pool slots.

        Trajectory j gives one sample in each of ``per_trajectory`` equal bands of the chain, at a
        uniform t inside its band (stratified, so t is still uniform over the pool). A trajectory only
        runs down to its lowest tap, so the cost is about ``size · T / per_trajectory`` teacher
        evaluations against shuffle denoise's ``size · T / 2``; the price is that the samples of one
        trajectory are correlated. Returns the evaluations spent.
        """
        k, chain = per_trajectory, self.chain_length
        if not 1 <= k <= chain:
            raise ValueError(f"per_trajectory must be in [1, {chain}], got {k}")
        # 1. Slot i belongs to trajectory i // k and band i % k; its tap is a uniform t in the band.
        slots = torch.arange(self.size, device=self.device)
        trajectory, band = slots // k, slots % k
        u = torch.rand(self.size, generator=self.generator, device=self.device)
        taps = ((band + u) * chain / k).long().clamp(max=chain - 1)  # (N,)
        num = int(trajectory[-1]) + 1
        lowest = torch.full((num,), chain, dtype=torch.long, device=self.device)
        lowest = lowest.scatter_reduce(0, trajectory, taps, "amin")
        # 2. Run every trajectory down from fresh noise, copying it into the slots that tap it.
        x = torch.randn((num, *self.sample_shape), generator=self.generator, device=self.device)  # (J, C, H, W)
        labels = self._draw_labels(num)  # (J,): one class per trajectory, which all its slots keep
        evaluations = 0
        for step in reversed(range(chain)):
            hit = torch.nonzero(taps == step).squeeze(1)
            self.x[hit] = x[trajectory[hit]]
            self.t[hit] = step
            if labels is not None and self.labels is not None:
                self.labels[hit] = labels[trajectory[hit]]
            active = torch.nonzero(lowest < step).squeeze(1)
            if active.numel() == 0:
                break
            for ids in active.split(batch_size):
                t = torch.full((ids.numel(),), step, dtype=torch.long, device=self.device)
                x[ids] = denoise(x[ids], t, None if labels is None else labels[ids])
                evaluations += ids.numel()
        return evaluations

    def initialise(
        self, denoise: DenoiseFn, batch_size: int, method: PoolInit = "shuffle", per_trajectory: int = 8
    ) -> int:
        """Spread t over the chain (shuffled and dynamic strategies); returns teacher evaluations."""
        if self.strategy == "iterative":
            return 0
        if method == "trajectory":
            return self.trajectory_init(denoise, batch_size, per_trajectory)
        return self.shuffle_denoise(denoise, batch_size)

    # One distillation step ----------------------------------------------------------------------

    def take(self, batch_size: int, now: float = 0.0, timeout: float = math.inf) -> Lease:
        """Lease ``batch_size`` samples: a random subset (dynamic) or the whole batch in order.

        The lease expires at ``now + timeout`` (see ``expire``); by default it never does.
        """
        ids = self._free_ids(batch_size)
        # index_fill_ passes the value to the kernel; ``leased[ids] = True`` would copy a host scalar
        # to the device on every step (and cannot be recorded in a CUDA graph).
        self.leased.index_fill_(0, ids, True)
        lease_id = self.next_lease_id
        self.next_lease_id += 1
        self.leases[lease_id] = _Outstanding(ids=ids, deadline=now + timeout)
        # Indexing copies: the lease keeps its values whatever happens to the pool meanwhile.
        return Lease(lease_id=lease_id, ids=ids, x_t=self.x[ids], t=self.t[ids], labels=self._labels_of(ids))

    def _free_ids(self, batch_size: int) -> torch.Tensor:
        """``batch_size`` ids of unleased samples: random (dynamic) or the first ones in order."""
        if not self.leases:
            # Every sample is free, so no search (whose result size the host would wait for): the
            # same ids, from the same generator draws, as the search below would give.
            if self.size < batch_size:
                raise RuntimeError(f"pool has {self.size} free samples, {batch_size} requested")
            if self.strategy == "dynamic":
                return torch.randperm(self.size, generator=self.generator, device=self.device)[:batch_size]
            return torch.arange(batch_size, device=self.device)
        free = torch.nonzero(~self.leased).squeeze(1)
        if free.numel() < batch_size:
            raise RuntimeError(f"pool has {free.numel()} free samples, {batch_size} requested")
        if self.strategy == "dynamic":
            return free[torch.randperm(free.numel(), generator=self.generator, device=self.device)[:batch_size]]
        return free[:batch_size]

    def _close(self, lease_id: int) -> torch.Tensor:
        outstanding = self.leases.pop(lease_id, None)
        if outstanding is None:
            raise StaleLeaseError(f"lease {lease_id} is not outstanding: already returned, released or expired")
        self.leased.index_fill_(0, outstanding.ids, False)
        return outstanding.ids

    def put(self, lease_id: int, x_prev: torch.Tensor) -> None:
        """Replace a lease's samples by their one-step-denoised versions; finished ones restart at T."""
        outstanding = self.leases.get(lease_id)
        if outstanding is not None and x_prev.shape != (outstanding.ids.numel(), *self.sample_shape):
            raise ValueError(f"put() got shape {tuple(x_prev.shape)} for {outstanding.ids.numel()} samples")
        ids = self._close(lease_id)
        x_prev = x_prev.to(device=self.device, dtype=self.x.dtype)
        if self.sync_free:
            # Fresh noise for the whole lease, kept where a trajectory finished: no data-dependent
            # shape. (Other draws than the CPU path below, which only draws for finished samples.)
            t_prev = self.t[ids] - 1
            restart = t_prev < 0  # (b,)
            fresh = torch.randn(x_prev.shape, generator=self.generator, device=self.device)
            self.x[ids] = torch.where(restart.view(-1, *([1] * len(self.sample_shape))), fresh, x_prev)
            self.t[ids] = torch.where(restart, torch.full_like(t_prev, self.chain_length - 1), t_prev)
            fresh_labels = self._draw_labels(ids.numel())
            if fresh_labels is not None and self.labels is not None:  # a restarted trajectory draws a new class
                self.labels[ids] = torch.where(restart, fresh_labels, self.labels[ids])
            assert isinstance(self._finished, torch.Tensor)
            self._finished.add_(restart.sum())
            return
        self.x[ids] = x_prev
        self.t[ids] -= 1
        done = ids[self.t[ids] < 0]
        if done.numel():
            self.x[done] = torch.randn((done.numel(), *self.sample_shape), generator=self.generator)
            self.t[done] = self.chain_length - 1
            fresh_labels = self._draw_labels(done.numel())
            if fresh_labels is not None and self.labels is not None:  # a restarted trajectory draws a new class
                self.labels[done] = fresh_labels
            self._finished = self.finished + done.numel()

    def release(self, lease_id: int) -> None:
        """Give a lease's samples back unchanged (the teacher holding it gave up or died)."""
        self._close(lease_id)

    def expire(self, now: float) -> list[int]:
        """Release every lease whose deadline has passed; returns their ids."""
        expired = [lid for lid, o in self.leases.items() if o.deadline <= now]
        for lease_id in expired:
            self._close(lease_id)
        return expired

    # Introspection and snapshots -----------------------------------------------------------------

    def t_histogram(self, bins: int = 10) -> list[int]:
        """Counts of samples per equal-width band of chain indices, low t first."""
        edges = torch.div(self.t * bins, self.chain_length, rounding_mode="floor")
        return torch.bincount(edges, minlength=bins).tolist()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue exactly here; outstanding leases are returned unadvanced."""
        labels = {} if self.labels is None else {"labels": self.labels.clone()}
        return {
            **labels,
            "x": self.x.clone(),
            "t": self.t.clone(),
            "finished": torch.tensor(self.finished),
            # Lease ids keep counting across a restore so a pre-snapshot answer can never match.
            "next_lease_id": torch.tensor(self.next_lease_id),
            "chain_length": torch.tensor(self.chain_length),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if int(state["chain_length"]) != self.chain_length or tuple(state["x"].shape[1:]) != self.sample_shape:
            raise ValueError("pool snapshot does not match this pool's chain length or sample shape")
        if (self.labels is None) != ("labels" not in state):
            raise ValueError("pool snapshot and pool disagree on class labels (conditional vs unconditional)")
        device = self.device
        if self.labels is not None:
            self.labels = state["labels"].to(device, copy=True)
        self.x = state["x"].to(device, copy=True)
        self.t = state["t"].to(device, copy=True)
        self.leased = torch.zeros(self.x.shape[0], dtype=torch.bool, device=device)
        self.leases = {}
        self._finished = self._counter(int(state["finished"]))
        self.next_lease_id = int(state["next_lease_id"])
        self.generator.set_state(state["generator"])
