"""UNet denoisers (Ho et al.; improved-diffusion's layout) built on diffusers' ``UNet2DModel``.

Using diffusers' class means a UNet exports to, and imports from, a diffusers ``DDPMPipeline``
folder without weight conversion (``dkdm_core.checkpoint``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dkdm_core.imports import DIFFUSERS

if TYPE_CHECKING:
    from diffusers import UNet2DModel


class UNet(nn.Module):
    """ε (and v, with learned variance) from (x_t, t): (B, C, H, W), (B,) -> (B, k·C, H, W)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        learn_sigma: bool,
        block_out_channels: tuple[int, ...],
        attention_levels: tuple[bool, ...],
        layers_per_block: int = 2,
        norm_num_groups: int = 8,
        dropout: float = 0.0,
        attention_head_dim: int | None = None,
        time_scale_shift: str = "default",
        class_embeds: int = 0,
    ) -> None:
        super().__init__()
        if len(block_out_channels) != len(attention_levels):
            raise ValueError("one attention flag per resolution level")
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
        # Imported here, not with the module: diffusers takes seconds to import, and every process that
        # only validates specs or holds a pool (Ray actors, the control plane) imports this registry.
        with DIFFUSERS:
            from diffusers import UNet2DModel

        self.net = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels * (2 if learn_sigma else 1),
            block_out_channels=block_out_channels,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,  # None: one head over all channels (DDPM)
            dropout=dropout,
            resnet_time_scale_shift=time_scale_shift,  # "scale_shift": ADM's adaptive group norm
            # Class-conditional: diffusers adds a learned label embedding to the time embedding, as in
            # ADM; the null class of classifier-free guidance is one more embedding (ModelCard.classes).
            num_class_embeds=class_embeds or None,
        )

    @classmethod
    def wrap(cls, net: UNet2DModel) -> UNet:
        """Adopt an existing diffusers UNet (e.g. one loaded from a pipeline folder)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.net = net
        return model

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x_t, t, class_labels=labels).sample  # type: ignore[operator]  # (B, k·C, H, W)


def unet_tiny(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> UNet:
    return UNet(
        in_channels,
        image_size,
        learn_sigma,
        (16, 32, 32),
        (False, True, False),
        layers_per_block=1,
        class_embeds=class_embeds,
    )


def unet_small(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> UNet:
    return UNet(
        in_channels,
        image_size,
        learn_sigma,
        (32, 64, 64),
        (False, True, True),
        layers_per_block=1,
        class_embeds=class_embeds,
    )


def unet_base(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> UNet:
    return UNet(
        in_channels,
        image_size,
        learn_sigma,
        (64, 128, 128),
        (False, True, True),
        layers_per_block=2,
        class_embeds=class_embeds,
    )


# Real-size presets, all with the learned-variance output when ``learn_sigma`` (2C channels).


def ddpm_cifar10(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> UNet:
    """Ho et al.'s CIFAR-10 UNet (35.7M): channels 128·(1, 2, 2, 2), 2 blocks per level, attention at 16x16."""
    return _ddpm(in_channels, image_size, learn_sigma, 128, class_embeds)


def ddpm_cifar10_half(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> UNet:
    return _ddpm(in_channels, image_size, learn_sigma, 64, class_embeds)


def ddpm_cifar10_quarter(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> UNet:
    return _ddpm(in_channels, image_size, learn_sigma, 32, class_embeds)


def _ddpm(in_channels: int, image_size: int, learn_sigma: bool, width: int, class_embeds: int) -> UNet:
    channels = (width, 2 * width, 2 * width, 2 * width)
    attention = (False, True, False, False)
    return UNet(
        in_channels, image_size, learn_sigma, channels, attention, 2, norm_num_groups=32, class_embeds=class_embeds
    )


def adm_64(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> UNet:
    """An ADM-style 64x64 UNet (Dhariwal & Nichol): channels 128·(1, 2, 3, 4), 3 blocks per level,
    64-dim attention heads at 16x16 and 8x8, scale-shift timestep conditioning."""
    return UNet(
        in_channels,
        image_size,
        learn_sigma,
        (128, 256, 384, 512),
        (False, False, True, True),
        layers_per_block=3,
        norm_num_groups=32,
        attention_head_dim=64,
        time_scale_shift="scale_shift",
        class_embeds=class_embeds,
    )
