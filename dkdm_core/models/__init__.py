"""Denoiser architectures by name: the registry configs and the CLI validate against.

Every model maps (x_t, t) to ε, or to ε and the variance interpolation v (``learn_sigma``),
stacked on the channel axis. Factories take (in_channels, image_size, learn_sigma).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dkdm_core.models.mlp import mlp_base, mlp_small
from dkdm_core.models.unet import unet_base, unet_small, unet_tiny
from dkdm_core.models.vit import vit_small, vit_tiny

ModelFactory = Callable[[int, int, bool], nn.Module]

MODELS: dict[str, ModelFactory] = {
    "unet-tiny": unet_tiny,
    "unet-small": unet_small,
    "unet-base": unet_base,
    "vit-tiny": vit_tiny,
    "vit-small": vit_small,
    "mlp-small": mlp_small,
    "mlp-base": mlp_base,
}

# Architectures that take vectors (B, D) rather than images (B, C, H, W).
VECTOR_MODELS = frozenset({"mlp-small", "mlp-base"})


def build_model(arch: str, in_channels: int, image_size: int, learn_sigma: bool) -> nn.Module:
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[arch](in_channels, image_size, learn_sigma)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
