"""Invariants of the knowledge pool: size, range, uniform t, one advance per lease, restarts."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from dkdm_core.pool import NoisePool, StaleLeaseError, pool_size

SHAPE = (1, 2, 2)


class CountingTeacher:
    """A stand-in denoiser with visible bookkeeping: x_{t-1} = x_t + 1 counts the steps taken."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += x.shape[0]
        return x + 1


def make_pool(strategy="dynamic", size=400, chain=50, seed=0) -> NoisePool:
    return NoisePool(strategy, size, SHAPE, chain, torch.Generator().manual_seed(seed))


def test_pool_size_formula() -> None:
    assert pool_size("dynamic", 128, 1000, 0.4) == 51200
    assert pool_size("dynamic", 64, 100, 0.4) == 2560
    assert pool_size("shuffled", 64, 100, 0.4) == 64
    assert pool_size("dynamic", 64, 10, 0.01) == 64  # never below one batch


def test_shuffle_denoise_makes_t_uniform_and_costs_about_half_a_chain() -> None:
    pool = make_pool(size=5000, chain=20)
    start = pool.x.clone()
    teacher = CountingTeacher()
    spent = pool.shuffle_denoise(teacher, batch_size=512)
    assert spent == teacher.calls
    counts = torch.bincount(pool.t, minlength=20)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3, counts
    # Each sample took exactly T-1-t steps, which the counting teacher wrote into x.
    steps_taken = (pool.x - start)[:, 0, 0, 0].round().long()
    assert torch.equal(steps_taken, 19 - pool.t)
    assert abs(spent / pool.size - 19 / 2) < 0.5


def test_take_put_keeps_size_and_range_and_advances_each_sample_once() -> None:
    pool = make_pool(size=300, chain=10)
    pool.shuffle_denoise(CountingTeacher(), 128)
    for _ in range(200):
        before_t = pool.t.clone()
        lease = pool.take(32)
        assert lease.ids.unique().numel() == 32
        assert torch.equal(lease.t, before_t[lease.ids])
        pool.put(lease.lease_id, lease.x_t + 1)
        assert pool.size == 300 and pool.t.min() >= 0 and pool.t.max() <= 9
        changed = torch.nonzero(pool.t != before_t).squeeze(1)
        assert set(changed.tolist()) <= set(lease.ids.tolist())
        expected = torch.where(before_t[lease.ids] == 0, torch.full_like(lease.t, 9), before_t[lease.ids] - 1)
        assert torch.equal(pool.t[lease.ids], expected)


def test_finished_samples_restart_from_fresh_noise_at_T() -> None:
    pool = make_pool("iterative", size=8, chain=3)
    for _ in range(3):
        lease = pool.take(8)
        pool.put(lease.lease_id, torch.full_like(lease.x_t, 7.0))
    assert pool.finished == 8
    assert torch.equal(pool.t, torch.full((8,), 2))
    assert not torch.any(pool.x == 7.0), "finished samples must be replaced by fresh noise"
    assert 0.3 < float(pool.x.std()) < 3


def test_iterative_strategy_moves_the_whole_batch_in_lockstep() -> None:
    pool = make_pool("iterative", size=16, chain=5)
    seen = []
    for _ in range(5):
        lease = pool.take(16)
        seen.append(lease.t.unique().tolist())
        pool.put(lease.lease_id, lease.x_t)
    assert seen == [[4], [3], [2], [1], [0]]


def test_leased_samples_are_not_handed_out_twice_until_returned() -> None:
    pool = make_pool(size=64, chain=10)
    a, b = pool.take(32), pool.take(32)
    assert not set(a.ids.tolist()) & set(b.ids.tolist())
    with pytest.raises(RuntimeError, match="free samples"):
        pool.take(1)
    pool.put(a.lease_id, a.x_t)
    with pytest.raises(StaleLeaseError, match="not outstanding"):
        pool.put(a.lease_id, a.x_t)
    t_before = pool.t[b.ids].clone()
    pool.release(b.lease_id)  # back unchanged, available again
    assert torch.equal(pool.t[b.ids], t_before)
    assert pool.take(64).ids.numel() == 64


def test_put_rejects_wrong_shapes() -> None:
    pool = make_pool(size=10, chain=5)
    lease = pool.take(4)
    with pytest.raises(ValueError, match="shape"):
        pool.put(lease.lease_id, torch.zeros(4, 1, 3, 3))


def test_snapshot_continues_identically() -> None:
    a = make_pool(size=100, chain=10, seed=3)
    a.shuffle_denoise(CountingTeacher(), 64)
    for _ in range(5):
        lease = a.take(16)
        a.put(lease.lease_id, lease.x_t * 0.5)
    snap = a.state_dict()
    b = make_pool(size=100, chain=10, seed=99)
    b.load_state_dict(snap)
    for _ in range(20):
        la, lb = a.take(16), b.take(16)
        assert torch.equal(la.ids, lb.ids)
        a.put(la.lease_id, la.x_t * 0.5)
        b.put(lb.lease_id, lb.x_t * 0.5)
    assert torch.equal(a.x, b.x) and torch.equal(a.t, b.t)
    with pytest.raises(ValueError, match="chain length"):
        make_pool(size=100, chain=11).load_state_dict(snap)


def test_random_subsets_cover_the_pool_uniformly() -> None:
    pool = make_pool(size=200, chain=1000)
    hits = torch.zeros(200)
    for _ in range(500):
        lease = pool.take(20)
        hits[lease.ids] += 1
        pool.put(lease.lease_id, lease.x_t)
    assert stats.chisquare(hits.numpy()).pvalue > 1e-3


def test_expired_leases_are_reissued_and_late_answers_refused() -> None:
    pool = make_pool(size=32, chain=10)
    slow = pool.take(16, now=0.0, timeout=5.0)
    fast = pool.take(16, now=1.0, timeout=5.0)
    pool.put(fast.lease_id, fast.x_t + 1)
    assert pool.expire(now=4.0) == []
    assert pool.expire(now=5.0) == [slow.lease_id]
    t_before = pool.t.clone()
    again = pool.take(32, now=6.0)  # the expired samples are free again
    assert set(slow.ids.tolist()) <= set(again.ids.tolist())
    with pytest.raises(StaleLeaseError):
        pool.put(slow.lease_id, slow.x_t + 1)  # the dead teacher's late answer must not advance them
    assert torch.equal(pool.t, t_before)
    pool.put(again.lease_id, again.x_t + 1)
    assert not pool.leased.any() and not pool.leases


def test_trajectory_init_taps_each_trajectory_at_uniform_t_for_a_fraction_of_the_cost() -> None:
    chain, k = 40, 8
    pool = make_pool(size=4000, chain=chain)
    teacher = CountingTeacher()
    spent = pool.initialise(teacher, batch_size=512, method="trajectory", per_trajectory=k)
    assert spent == teacher.calls
    # t stays uniform over the chain (stratified taps) ...
    counts = torch.bincount(pool.t, minlength=chain).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    # ... at about 1/k of a chain per sample instead of shuffle denoise's 1/2.
    assert spent < 1.1 * pool.size * chain / k
    assert spent < 0.3 * pool.size * chain / 2
    # A slot tapped at t holds its trajectory after exactly T-1-t steps: the counting teacher
    # makes x - (T-1-t) the trajectory's starting noise, shared by the k slots of one trajectory.
    start = pool.x - (chain - 1 - pool.t).view(-1, 1, 1, 1).float()
    per_trajectory = start.view(-1, k, *SHAPE)
    assert torch.allclose(per_trajectory, per_trajectory[:, :1].expand_as(per_trajectory), atol=1e-4)
    bands = (pool.t.view(-1, k) * k) // chain
    assert torch.equal(bands, torch.arange(k).expand_as(bands))  # one tap per band
