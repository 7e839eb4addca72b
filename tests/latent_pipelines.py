"""Tiny random-weight latent pipelines built with diffusers and saved with ``save_pretrained``.

The shapes of the real ones (CompVis/ldm-celebahq-256: VQModel + UNet2DModel + DDIMScheduler on
scaled-linear β's; facebook/DiT-XL-2-256: AutoencoderKL + a 2C-output DiT + DDIMScheduler on linear
β's, with id2label), small enough for a shared 2-core machine: 16x16 RGB images, 8x8 latents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    LDMPipeline,
    UNet2DModel,
    VQModel,
)

IMAGE_SIZE = 16  # pixels; the autoencoders downsample by 2 to 8x8 latents
LATENT_SIZE = 8
DIT_CLASSES = {0: "cat", 1: "dog", 2: "fish"}


def tiny_unet(size: int, channels: int, out_channels: int | None = None, **extra: Any) -> UNet2DModel:
    """The tests' diffusers UNet2DModel: two 16/32-channel levels, one layer each."""
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=out_channels or channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        **extra,
    )


def _blocks() -> dict[str, object]:
    return {
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": IMAGE_SIZE,
    }


def save_ldm(root: Path, seed: int = 0) -> Path:
    """An LDMPipeline folder: vqvae/ (VQModel, 3 latent channels), unet/, scheduler/ (DDIM)."""
    torch.manual_seed(seed)
    vqvae = VQModel(in_channels=3, out_channels=3, latent_channels=3, num_vq_embeddings=32, **_blocks())  # type: ignore[arg-type]
    unet = tiny_unet(LATENT_SIZE, 3)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(str(root), safe_serialization=True)
    return root


def save_dit(root: Path, seed: int = 0) -> Path:
    """A DiTPipeline folder: transformer/ (ε and learned Σ: 2C outputs, 3 classes + null), vae/, scheduler/."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=len(DIT_CLASSES),
    )
    with torch.no_grad():  # a trained DiT's variance output v lies in [-1, 1] (σ² between β̃_t and β_t)
        out = transformer.proj_out_2  # rows ordered (patch row, patch column, channel)
        out.weight.view(4, 8, -1)[:, 4:] *= 0.2
        out.bias.view(4, 8)[:, 4:] *= 0.2
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215, **_blocks())  # type: ignore[arg-type]
    scheduler = DDIMScheduler(clip_sample=False)  # DiT's: linear β, ε, no variance named
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=DIT_CLASSES)  # type: ignore[arg-type]
    pipe.save_pretrained(str(root), safe_serialization=True)
    # save_pretrained does not write id2label; the hub's DiT folders hold it in model_index.json.
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(
        json.dumps(index | {"id2label": {str(k): v for k, v in DIT_CLASSES.items()}})
    )
    return root
