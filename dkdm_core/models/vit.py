"""DiT-style vision transformer denoisers (Peebles & Xie, "Scalable Diffusion Models with Transformers").

Patchify -> transformer blocks with adaLN-Zero conditioning on the timestep -> linear unpatchify.
Class-conditional variants add a label embedding to the timestep's (DiT's ``LabelEmbedder``); the
null class of classifier-free guidance is its last row (``ModelCard.classes``).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))  # (B, dim)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 128) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))  # (B, D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (B, N, D)


class DiTBlock(nn.Module):
    """Self-attention + MLP, each gated and modulated by the timestep (adaLN-Zero)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, int(hidden * mlp_ratio)),
            nn.GELU(approximate="tanh"),
            nn.Linear(int(hidden * mlp_ratio), hidden),
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)  # 6 x (B, D)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1.unsqueeze(1) * self.attn(h, h, h, need_weights=False)[0]
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, N, D)


class DiT(nn.Module):
    """ε (and v) from (x_t, t): (B, C, H, W), (B,) -> (B, k·C, H, W)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        learn_sigma: bool,
        patch_size: int = 2,
        hidden: int = 128,
        depth: int = 4,
        heads: int = 4,
        class_embeds: int = 0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, hidden))
        self.t_embed = TimestepEmbedder(hidden)
        self.y_embed = nn.Embedding(class_embeds, hidden) if class_embeds else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.proj_out = nn.Linear(hidden, patch_size * patch_size * self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)  # DiT's label-table init
        # adaLN-Zero: every block starts as the identity, the output as zero.
        zeroed = [cast(DiTBlock, block).ada[-1] for block in self.blocks] + [self.ada_out[-1], self.proj_out]
        for layer in zeroed:
            for p in layer.parameters():
                nn.init.zeros_(p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, g, c = x.shape[0], self.patch_size, self.grid, self.out_channels
        x = x.reshape(b, g, g, p, p, c)  # (B, g, g, p, p, C')
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)  # (B, C', H, W)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(x_t).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)
        c = self.t_embed(t)  # (B, D)
        if self.y_embed is not None:
            if labels is None:
                raise ValueError("a class-conditional model needs class labels")
            c = c + self.y_embed(labels)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.ada_out(c).chunk(2, dim=1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # (B, N, p·p·C')
        return self.unpatchify(x)


def vit_tiny(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> DiT:
    return DiT(
        in_channels, image_size, learn_sigma, patch_size=2, hidden=64, depth=4, heads=4, class_embeds=class_embeds
    )


def vit_small(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> DiT:
    return DiT(
        in_channels, image_size, learn_sigma, patch_size=2, hidden=128, depth=6, heads=4, class_embeds=class_embeds
    )


def dit_s_2(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> DiT:
    """DiT-S/2: hidden 384, 12 blocks, 6 heads, 2x2 patches (pixel 32x32x3 or latent 32x32x4)."""
    return DiT(
        in_channels, image_size, learn_sigma, patch_size=2, hidden=384, depth=12, heads=6, class_embeds=class_embeds
    )


def dit_b_2(in_channels: int, image_size: int, learn_sigma: bool, class_embeds: int = 0) -> DiT:
    """DiT-B/2: hidden 768, 12 blocks, 12 heads, 2x2 patches."""
    return DiT(
        in_channels, image_size, learn_sigma, patch_size=2, hidden=768, depth=12, heads=12, class_embeds=class_embeds
    )
