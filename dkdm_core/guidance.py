"""Class labels and classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022).

A class-conditional network takes ``(x_t, t, labels)``. Trained with label dropout, label
``num_classes`` (the *null class*) means "no label", and the guided prediction is Eq. (6) of the
paper written as diffusers' pipelines do: ``ε̃ = ε_u + w (ε_c − ε_u)`` (w = 1: plain conditional).
Guidance combines the network's prediction channels only (ε, v or x_0: the combination is linear in
any of them); a learned variance output is the conditional one, as in DiT's ``forward_with_cfg``.

Everything here turns a conditional network into the ``(x_t, t) -> output`` function the diffusion
maths takes (``ModelFn``), so ``diffusion.py`` stays label-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dkdm_core.diffusion import ModelFn

# (x_t, t, labels) -> output: a class-conditional network.
ConditionalFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    """How a conditional teacher is run: guidance scale, the null label, the student's null share."""

    num_classes: int
    scale: float = 1.0  # w; 1: the conditional prediction alone (one network call)
    null_label: int | None = None  # num_classes when the network knows a null class, else None
    # Share of each knowledge batch whose student label is the null class (target: the teacher's ε_u),
    # so the student learns the unconditional prediction too and can itself be guided.
    null_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.null_label is None and (self.scale != 1.0 or self.null_fraction > 0):
            raise ValueError("classifier-free guidance needs a model trained with a null class")

    @property
    def needs_unconditional(self) -> bool:
        return self.scale != 1.0 or self.null_fraction > 0


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Labels must be class ids in [0, num_classes); the null class is not a class one asks for."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class labels must be in [0, {num_classes - 1}], got {labels.tolist()}")


def conditioned(model: ConditionalFn, labels: torch.Tensor | None) -> ModelFn:
    """``model`` with its labels bound: an unconditional model (labels None) is returned as it is."""
    if labels is None:
        return model
    return lambda x_t, t: model(x_t, t, labels)


def both_predictions(
    model: ConditionalFn, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, null_label: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditional and unconditional outputs of one batched network call: ((B, ...), (B, ...))."""
    null = torch.full_like(labels, null_label)
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))  # (2B, k·C, ...)
    cond, uncond = out.chunk(2)
    return cond, uncond


def combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """Eq. (6): ε_u + w (ε_c − ε_u) on the prediction channels; the variance channels stay conditional."""
    pred_c, rest = cond[:, :channels], cond[:, channels:]
    pred_u = uncond[:, :channels]
    return torch.cat([pred_u + scale * (pred_c - pred_u), rest], dim=1)


def guided(model: ConditionalFn, labels: torch.Tensor | None, guidance: Guidance | None, channels: int) -> ModelFn:
    """``model`` as a ModelFn predicting with classifier-free guidance at ``guidance.scale``."""
    if labels is None or guidance is None or guidance.scale == 1.0 or guidance.null_label is None:
        return conditioned(model, labels)
    null_label, scale = guidance.null_label, guidance.scale

    def run(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = both_predictions(model, x_t, t, labels, null_label)
        return combine(cond, uncond, scale, channels)

    return run


def uniform_labels(
    num: int, classes: torch.Tensor, generator: torch.Generator, device: torch.device | str | None = None
) -> torch.Tensor:
    """``num`` labels drawn uniformly from ``classes`` (the class ids a job asks for): (num,) long."""
    device = device if device is not None else generator.device
    picks = torch.randint(0, classes.numel(), (num,), generator=generator, device=generator.device)
    return classes.to(generator.device)[picks].to(device)
