"""Drawing samples from a trained model: IDDPM respaced ancestral sampling (default) or DDIM.

:func:`draw` is what every caller uses (CLI, evaluation, serving): it reads the model card to pick
the procedure (many-step diffusion or a one-step BOOT student) and decodes latent models' samples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dkdm_core.checkpoint import ModelCard
from dkdm_core.diffusion import GaussianDiffusion, Sampler, sample_loop, space_timesteps
from dkdm_core.latent import decode as decode_latents
from dkdm_core.latent import load_autoencoder
from dkdm_core.methods.boot import one_step_sample
from dkdm_core.spec import DiffusionSpec


def sampling_diffusion(spec: DiffusionSpec, learn_sigma: bool, steps: int, sampler: Sampler) -> GaussianDiffusion:
    """The respaced diffusion a sampler walks: IDDPM's even spacing, or DDIM's stride T // steps."""
    if not 1 <= steps <= spec.num_timesteps:
        raise ValueError(f"sampling steps must be in [1, {spec.num_timesteps}], got {steps}")
    section = f"ddim{steps}" if sampler == "ddim" else str(steps)
    kept = space_timesteps(spec.num_timesteps, section)
    return spec.build(learn_sigma, respacing=kept)


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


def sampling_steps(card: ModelCard, steps: int) -> int:
    """The network calls a sample costs: 1 for a one-step student, else the steps asked for."""
    return 1 if card.generator == "one-step" else steps


@torch.no_grad()
def draw(
    model: nn.Module,
    card: ModelCard,
    num: int,
    seed: int,
    steps: int = 50,
    sampler: Sampler = "iddpm",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    decode: bool = True,
) -> torch.Tensor:
    """``num`` samples of what the model's card describes, as data (decoded for latent models).

    ``decode=False`` keeps a latent model's samples in its latent space.

    ``steps`` and ``sampler`` apply to diffusion models; a one-step student ignores them.
    """
    device = device if device is not None else next(model.parameters()).device
    if card.generator == "one-step":
        generator = torch.Generator().manual_seed(seed)
        chunks = []
        for start in range(0, num, batch_size):
            noise = torch.randn((min(batch_size, num - start), *card.sample_shape), generator=generator)
            chunks.append(one_step_sample(model, noise.to(device)).cpu())
        x = torch.cat(chunks)
    else:
        diffusion = sampling_diffusion(card.diffusion, card.learn_sigma, steps, sampler)
        x = generate(model, diffusion, card.sample_shape, num, seed, sampler, batch_size, device)
    if card.autoencoder is not None and decode:
        x = decode_latents(load_autoencoder(card.autoencoder), x)
    return x
