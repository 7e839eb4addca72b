"""MLP denoisers for low-dimensional toy data (2-D mixtures), as in many diffusion tutorials."""

from __future__ import annotations

import torch
from torch import nn

from dkdm_core.models.vit import timestep_embedding


class MLPDenoiser(nn.Module):
    """ε (and v) from (x_t, t): (B, D), (B,) -> (B, k·D)."""

    def __init__(self, in_channels: int, learn_sigma: bool, hidden: int = 128, depth: int = 3) -> None:
        super().__init__()
        self.t_dim = hidden
        layers: list[nn.Module] = [nn.Linear(in_channels + hidden, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, in_channels * (2 if learn_sigma else 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x_t, timestep_embedding(t, self.t_dim)], dim=1))  # (B, k·D)


def _unconditional(class_embeds: int) -> None:
    if class_embeds:
        raise ValueError("MLP denoisers have no class embedding; use a unet-* or vit-*/dit-* student")


def mlp_small(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> MLPDenoiser:
    del image_size  # vectors have no spatial size
    _unconditional(class_embeds)
    return MLPDenoiser(in_channels, learn_sigma, hidden=128, depth=3)


def mlp_base(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> MLPDenoiser:
    del image_size
    _unconditional(class_embeds)
    return MLPDenoiser(in_channels, learn_sigma, hidden=256, depth=4)
