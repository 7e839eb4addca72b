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
from typing import Any

import numpy as np
import torch

# numpy has no bfloat16: such tensors travel as the int16 with the same bits.
_CARRIERS = {torch.bfloat16: torch.int16}


def pack(x: torch.Tensor | None) -> Any:
    """``x`` as something that pickles cheaply: (array, dtype) for a CPU tensor, else ``x`` itself."""
    if x is None or x.device.type != "cpu":
        return x
    x = x.detach().contiguous()
    carrier = _CARRIERS.get(x.dtype)
    return ((x.view(carrier) if carrier is not None else x).numpy(), str(x.dtype).removeprefix("torch."))


def unpack(packed: Any) -> torch.Tensor | None:
    """The tensor ``pack`` described, in memory of its own if the buffer came read-only."""
    if packed is None or isinstance(packed, torch.Tensor):
        return packed
    array, dtype_name = packed
    tensor = torch.from_numpy(array if array.flags.writeable else np.array(array))
    dtype = getattr(torch, dtype_name)
    return tensor.view(dtype) if dtype in _CARRIERS else tensor


@dataclass(frozen=True)
class Packed:
    """A bare tensor that crosses a process boundary as ``pack`` ships it; ``.tensor`` on arrival."""

    tensor: torch.Tensor

    def __reduce__(self) -> tuple[Any, ...]:
        return _packed, (pack(self.tensor),)


def _packed(packed: Any) -> Packed:
    return Packed(unpack(packed))  # type: ignore[arg-type]


def tensor_of(x: torch.Tensor | Packed) -> torch.Tensor:
    """``x`` as a tensor, whether it came wrapped in ``Packed`` or plain (a call in this process)."""
    return x.tensor if isinstance(x, Packed) else x
