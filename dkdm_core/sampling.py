"""Drawing samples from a trained model: IDDPM respaced ancestral sampling (default) or DDIM."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dkdm_core.diffusion import GaussianDiffusion, Sampler, make_diffusion, sample_loop, space_timesteps
from dkdm_core.spec import DiffusionSpec


def sampling_diffusion(spec: DiffusionSpec, learn_sigma: bool, steps: int, sampler: Sampler) -> GaussianDiffusion:
    """The respaced diffusion a sampler walks: IDDPM's even spacing, or DDIM's stride T // steps."""
    if not 1 <= steps <= spec.num_timesteps:
        raise ValueError(f"sampling steps must be in [1, {spec.num_timesteps}], got {steps}")
    section = f"ddim{steps}" if sampler == "ddim" else str(steps)
    kept = space_timesteps(spec.num_timesteps, section)
    return make_diffusion(spec.schedule, spec.num_timesteps, learn_sigma, respacing=kept)


@torch.no_grad()
def generate(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    sample_shape: tuple[int, ...],
    num: int,
    seed: int,
    sampler: Sampler = "iddpm",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``num`` samples (N, *sample_shape) on the CPU, reproducible for a seed on any device."""
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        x = sample_loop(diffusion, model, (b, *sample_shape), generator, sampler=sampler, device=device)
        chunks.append(x.cpu())
        if progress is not None:
            progress(b)
    return torch.cat(chunks)
