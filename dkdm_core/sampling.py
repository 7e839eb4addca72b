"""Drawing samples from a trained model: IDDPM respaced ancestral sampling (default) or DDIM.

:func:`draw` is what every caller uses (CLI, evaluation, serving): it reads the model card to pick
the procedure (many-step diffusion or a one-step BOOT student) and decodes latent models' samples.
Class-conditional models sample the classes asked for (by default every class in turn), guided by
the card's scale unless the caller gives another (classifier-free guidance, ``dkdm_core.guidance``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dkdm_core.checkpoint import ClassCard, ModelCard
from dkdm_core.diffusion import GaussianDiffusion, Sampler, sample_loop, space_timesteps
from dkdm_core.guidance import Guidance, check_labels, guided
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
    labels: torch.Tensor | None = None,
    guidance: Guidance | None = None,
) -> torch.Tensor:
    """``num`` samples (N, *sample_shape) on the CPU, reproducible for a seed on any device.

    ``labels`` (N,): a class-conditional model's classes, guided as ``guidance`` says.
    """
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        chunk = None if labels is None else labels[start : start + b].to(device)
        fn = guided(model, chunk, guidance, sample_shape[0])
        x = sample_loop(diffusion, fn, (b, *sample_shape), generator, sampler=sampler, device=device)
        chunks.append(x.cpu())
        if progress is not None:
            progress(b)
    return torch.cat(chunks)


def class_labels(classes: ClassCard | None, num: int, labels: torch.Tensor | list[int] | None) -> torch.Tensor | None:
    """The labels of ``num`` samples: as asked (one label for all, or one per sample), or every class in
    turn (0, 1, ..., 9, 0, ...), so evaluations see a balanced set. None for an unconditional model."""
    if classes is None:
        if labels is not None:
            raise ValueError("this model is not class-conditional: it takes no class labels")
        return None
    if labels is None:
        return torch.arange(num) % classes.num
    out = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if out.numel() == 1:
        out = out.expand(num).clone()
    if out.numel() != num:
        raise ValueError(f"give one class label or one per sample ({num}), not {out.numel()}")
    check_labels(out, classes.num)
    return out


def sampling_guidance(classes: ClassCard | None, scale: float | None) -> Guidance | None:
    """The guidance samples are drawn with: ``scale``, or the card's; an error if the model cannot be guided."""
    if classes is None:
        if scale is not None:
            raise ValueError("this model is not class-conditional: guidance_scale does not apply")
        return None
    scale = classes.guidance_scale if scale is None else scale
    if scale != 1.0 and not classes.null:
        raise ValueError("this model has no null class, so it cannot be guided: use guidance scale 1")
    return Guidance(classes.num, scale, classes.null_label)


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
    labels: torch.Tensor | list[int] | None = None,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """``num`` samples of what the model's card describes, as data (decoded for latent models).

    ``decode=False`` keeps a latent model's samples in its latent space. Class-conditional models:
    ``labels`` (one class, or one per sample; default every class in turn) and ``guidance_scale``
    (default the card's).

    ``steps`` and ``sampler`` apply to diffusion models; a one-step student ignores them.
    """
    device = device if device is not None else next(model.parameters()).device
    y = class_labels(card.classes, num, labels)
    guidance = sampling_guidance(card.classes, guidance_scale)
    if card.generator == "one-step":
        generator = torch.Generator().manual_seed(seed)
        chunks = []
        for start in range(0, num, batch_size):
            noise = torch.randn((min(batch_size, num - start), *card.sample_shape), generator=generator)
            chunks.append(one_step_sample(model, noise.to(device)).cpu())
        x = torch.cat(chunks)
    else:
        diffusion = sampling_diffusion(card.diffusion, card.learn_sigma, steps, sampler)
        x = generate(model, diffusion, card.sample_shape, num, seed, sampler, batch_size, device, None, y, guidance)
    if card.autoencoder is not None and decode:
        x = decode_latents(load_autoencoder(card.autoencoder), x)
    return x
