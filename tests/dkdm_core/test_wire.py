"""Leases, knowledge batches and returned samples pickle through numpy, bit-exact, as writable tensors."""

from __future__ import annotations

import pickle

import pytest
import torch

from dkdm_core.pool import Lease
from dkdm_core.training import StudentBatch
from dkdm_core.wire import Packed, pack, tensor_of, unpack


def out_of_band(obj: object) -> object:
    """Pickle with protocol 5, its buffers handed over read-only, as Ray maps a large object from its store."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=[bytes(b.raw()) for b in buffers])


def in_band(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj, protocol=5))


@pytest.mark.parametrize("roundtrip", [out_of_band, in_band])
def test_a_student_batch_arrives_equal_with_its_dtypes_and_writable(roundtrip) -> None:
    g = torch.Generator().manual_seed(0)
    batch = StudentBatch(
        x_t=torch.randn(4, 3, 8, 8, generator=g).bfloat16(),
        t=torch.randint(0, 1000, (4,), generator=g),
        teacher_output=torch.randn(4, 6, 8, 8, generator=g),
        labels=torch.tensor([0, 3, 9, 10]),
    )
    got = roundtrip(batch)
    for name in ("x_t", "t", "teacher_output", "labels"):
        sent, came = getattr(batch, name), getattr(got, name)
        assert came.dtype == sent.dtype and came.shape == sent.shape
        assert torch.equal(came, sent), name
    before = batch.teacher_output.clone()
    got.teacher_output.fill_(0)  # memory of its own: no read-only store buffer under it
    assert torch.equal(batch.teacher_output, before) and not got.teacher_output.any()
    assert roundtrip(StudentBatch(batch.x_t, batch.t, batch.teacher_output)).labels is None


def test_a_lease_and_a_packed_return_arrive_equal() -> None:
    lease = Lease(7, torch.arange(5), torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 98, 99]))
    got = out_of_band(lease)
    assert got.lease_id == 7 and got.labels is None
    assert all(torch.equal(getattr(got, n), getattr(lease, n)) for n in ("ids", "x_t", "t"))
    x_prev = torch.randn(5, 1, 8, 8)
    assert torch.equal(tensor_of(out_of_band(Packed(x_prev))), x_prev)
    assert tensor_of(x_prev) is x_prev  # a call inside one process passes the tensor as it is


def test_a_non_contiguous_tensor_is_shipped_as_its_values() -> None:
    x = torch.randn(4, 6).t()
    assert not x.is_contiguous()
    assert torch.equal(unpack(in_band(pack(x))), x)


def test_numpy_pickles_far_fewer_bytes_of_framing_than_torch() -> None:
    """Size, not time (no wall-clock in tests): torch's pickle wraps the storage in a torch.save archive."""
    x = torch.randn(64, 1, 8, 8)
    framing_numpy = len(pickle.dumps(Packed(x), protocol=5)) - x.numel() * 4
    framing_torch = len(pickle.dumps(x, protocol=5)) - x.numel() * 4
    assert framing_numpy < 300 < framing_torch
