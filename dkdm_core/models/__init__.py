"""Denoiser architectures by name: the registry configs and the CLI validate against.

Every model maps (x_t, t) to ε, or to ε and the variance interpolation v (``learn_sigma``),
stacked on the channel axis; class-conditional ones take (x_t, t, labels). Factories take
(in_channels, image_size, learn_sigma, class_embeds); ``class_embeds`` 0 is unconditional.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dkdm_core.models.mlp import mlp_base, mlp_small
from dkdm_core.models.unet import (
    adm_64,
    ddpm_cifar10,
    ddpm_cifar10_half,
    ddpm_cifar10_quarter,
    unet_base,
    unet_small,
    unet_tiny,
)
from dkdm_core.models.vit import dit_b_2, dit_s_2, vit_small, vit_tiny

ModelFactory = Callable[[int, int, bool, int], nn.Module]

MODELS: dict[str, ModelFactory] = {
    "unet-tiny": unet_tiny,
    "unet-small": unet_small,
    "unet-base": unet_base,
    "vit-tiny": vit_tiny,
    "vit-small": vit_small,
    "mlp-small": mlp_small,
    "mlp-base": mlp_base,
    "ddpm-cifar10": ddpm_cifar10,
    "ddpm-cifar10-half": ddpm_cifar10_half,
    "ddpm-cifar10-quarter": ddpm_cifar10_quarter,
    "adm-64": adm_64,
    "dit-s-2": dit_s_2,
    "dit-b-2": dit_b_2,
}

# The image sizes a real-size preset is made for (its attention resolutions and depth assume them);
# the small models take any size their downsampling allows.
IMAGE_SIZES: dict[str, tuple[int, ...]] = {
    "ddpm-cifar10": (32,),
    "ddpm-cifar10-half": (32,),
    "ddpm-cifar10-quarter": (32,),
    "adm-64": (64,),
    "dit-s-2": (32,),
    "dit-b-2": (32,),
}

# Architectures that take vectors (B, D) rather than images (B, C, H, W).
VECTOR_MODELS = frozenset({"mlp-small", "mlp-base"})


def build_model(arch: str, in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> nn.Module:
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; choose one of {', '.join(sorted(MODELS))}")
    sizes = IMAGE_SIZES.get(arch)
    if sizes is not None and image_size not in sizes:
        raise ValueError(
            f"model {arch!r} is made for {' or '.join(f'{s}x{s}' for s in sizes)} images, not {image_size}"
        )
    return MODELS[arch](in_channels, image_size, learn_sigma, class_embeds)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
