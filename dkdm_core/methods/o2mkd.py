"""O2MKD (Zhang & Ma, "Accelerating Diffusion Models with One-to-Many Knowledge Distillation").

N students, each owning a contiguous interval of the teacher's timesteps. :class:`TimestepRouter`
is one module holding all of them: every sample of a batch goes to the student that owns its t, so
training on a DKDM knowledge batch routes each sample to its owner, and sampling (where a batch
shares one t) runs exactly one small student per step.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


def equal_edges(num_timesteps: int, students: int) -> list[int]:
    """Interval edges [0, e_1, ..., T] splitting T timesteps into ``students`` near-equal intervals."""
    if not 1 <= students <= num_timesteps:
        raise ValueError(f"cannot split {num_timesteps} timesteps between {students} students")
    return [round(i * num_timesteps / students) for i in range(students + 1)]


def interval_edges(num_timesteps: int, students: int, boundaries: Sequence[int] | None) -> list[int]:
    """Edges from user boundaries (the N-1 interior cut points), or equal widths when None."""
    if boundaries is None:
        return equal_edges(num_timesteps, students)
    edges = [0, *boundaries, num_timesteps]
    if len(boundaries) != students - 1:
        raise ValueError(f"o2mkd.boundaries needs {students - 1} cut points for {students} students")
    if any(a >= b for a, b in itertools.pairwise(edges)):
        raise ValueError(f"o2mkd.boundaries must increase strictly inside (0, {num_timesteps}), got {list(boundaries)}")
    return edges


class TimestepRouter(nn.Module):
    """Student i answers for t in [edges[i], edges[i+1]); t are the teacher's (original) timesteps."""

    def __init__(self, students: Sequence[nn.Module], edges: Sequence[int]) -> None:
        super().__init__()
        if len(edges) != len(students) + 1:
            raise ValueError("one interval per student: len(edges) must be len(students) + 1")
        self.parts = nn.ModuleList(students)
        self.edges = [int(e) for e in edges]
        self.register_buffer("_cuts", torch.tensor(self.edges[1:-1], dtype=torch.long), persistent=False)

    def owner(self, t: torch.Tensor) -> torch.Tensor:
        """The index of the student owning each timestep: (B,) -> (B,)."""
        cuts: torch.Tensor = self._cuts  # type: ignore[assignment]
        return torch.bucketize(t.long(), cuts, right=True)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        owner = self.owner(t)
        if bool((owner == owner[0]).all()):  # sampling: one t per batch, one student
            return self.parts[int(owner[0])](x_t, t)
        out = torch.zeros(0)
        unused = []
        for i, part in enumerate(self.parts):
            idx = (owner == i).nonzero().squeeze(1)
            if idx.numel() == 0:
                # A student that owns none of these t still runs on one sample, weighted by zero: all
                # parameters stay in the graph, so data-parallel ranks agree on which ones are used.
                unused.append(part(x_t[:1], t[:1]).sum() * 0.0)
                continue
            y = part(x_t[idx], t[idx])  # (n_i, k·C, H, W)
            if out.numel() == 0:
                out = y.new_zeros((x_t.shape[0], *y.shape[1:]))
            out = out.index_copy(0, idx, y)
        return out + sum(unused) if unused else out
