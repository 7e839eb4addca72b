"""Tensors that travel between processes pickled as numpy arrays instead of through torch's pickler.

A torch tensor pickles its storage through ``torch.save`` into bytes: about 0.2 ms to pickle and as
much to unpickle even for a 16 KB batch, on both ends of every Ray call that carries one (a lease,
a returned batch, a knowledge batch through its queue). A numpy array pickles (protocol 5) as a
header and its raw buffer, which Ray ships out of band, into its object store for large ones:
about 0.03 ms. ``Lease`` and ``StudentBatch`` pickle their tensors this way; ``Packed`` wraps a
bare tensor (the x̂_{t-1} a replica returns to its shard).

Unpickled tensors own writable memory: a buffer Ray hands over read-only (a large object mapped
from its store) is copied once, so no reader can write into shared memory. bf16, which numpy lacks,
travels as its int16 bit pattern. A tensor off the CPU pickles as torch pickles it (device kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

# numpy has no bfloat16: such tensors travel as the int16 with the same bits.
_CARRIERS = {torch.bfloat16: torch.int16}


class Wired(NamedTuple):
    """A CPU tensor as it travels: its values as a numpy array, and its torch dtype's name."""

    array: np.ndarray
    dtype: str


def pack(x: Any) -> Any:
    """A CPU tensor as ``Wired``; anything else (None, a number, a tensor off the CPU) as it is."""
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return x
    x = x.detach().contiguous()
    carrier = _CARRIERS.get(x.dtype)
    return Wired((x.view(carrier) if carrier is not None else x).numpy(), str(x.dtype).removeprefix("torch."))


def unpack(value: Any) -> Any:
    """The tensor a ``Wired`` describes, in memory of its own if its buffer came read-only; anything
    else as it is."""
    if not isinstance(value, Wired):
        return value
    tensor = torch.from_numpy(value.array if value.array.flags.writeable else np.array(value.array))
    dtype = getattr(torch, value.dtype)
    return tensor.view(dtype) if dtype in _CARRIERS else tensor


def rebuild(cls: type, *fields: Any) -> Any:
    """``cls(*fields)`` with packed fields unpacked: what a ``__reduce__`` through ``pack`` returns to."""
    return cls(*(unpack(f) for f in fields))


@dataclass(frozen=True)
class Packed:
    """A bare tensor that crosses a process boundary as ``pack`` ships it; ``.tensor`` on arrival."""

    tensor: torch.Tensor

    def __reduce__(self) -> tuple[Any, ...]:
        return rebuild, (Packed, pack(self.tensor))


def tensor_of(x: torch.Tensor | Packed) -> torch.Tensor:
    """``x`` as a tensor, whether it came wrapped in ``Packed`` or plain (a call in this process)."""
    return x.tensor if isinstance(x, Packed) else x
