"""Latent space: a diffusers ``AutoencoderKL`` between images and the latents a diffusion models.

The project trains a small one on the bundled digits (8x8 -> 3x4x4) or loads a user's from a local
diffusers folder (safetensors only). Latents are scaled by the autoencoder's ``scaling_factor`` (set
to 1/std of the training latents, as latent diffusion does) so the diffusion sees unit variance.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL


class AutoencoderError(ValueError):
    """An autoencoder folder that cannot be used; the message names it."""


def build_autoencoder(
    channels: int = 1, image_size: int = 8, latent_channels: int = 3, widths: tuple[int, ...] = (32, 64)
) -> AutoencoderKL:
    """A small KL autoencoder that downsamples by 2^(len(widths) - 1)."""
    # diffusers is imported where an autoencoder is made: it takes seconds, and most processes that
    # import sampling (Ray actors, the control plane) never touch a latent model.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths),
        block_out_channels=widths,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=image_size,
        scaling_factor=1.0,
    )


def train_autoencoder(
    ae: AutoencoderKL,
    data: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    batch_size: int = 128,
    lr: float = 1e-3,
    kl_weight: float = 1e-4,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> AutoencoderKL:
    """Reconstruction MSE + a small KL to N(0, I); then set scaling_factor to 1/std of the latents."""
    device = next(ae.parameters()).device
    optimizer = torch.optim.AdamW(ae.parameters(), lr=lr)
    ae.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator)
        x = data[idx].to(device)  # (B, C, H, W)
        posterior = ae.encode(x).latent_dist
        z = posterior.sample(generator=None)
        recon = ae.decode(z).sample
        mse = ((recon - x) ** 2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, {"loss": float(loss), "mse": float(mse), "kl": float(kl)})
    ae.eval()
    with torch.no_grad():
        latents = torch.cat([ae.encode(x.to(device)).latent_dist.mode() for x in data.split(512)])
    ae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return ae


def save_autoencoder(ae: AutoencoderKL, directory: str | Path) -> Path:
    out = Path(directory)
    ae.save_pretrained(str(out), safe_serialization=True)
    return out


@lru_cache(maxsize=8)
def load_autoencoder(directory: str) -> AutoencoderKL:
    """A diffusers AutoencoderKL folder (config.json + safetensors; pickled weights are refused)."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise AutoencoderError(f"{path} is not an autoencoder folder: config.json is missing")
    if not any(path.glob("*.safetensors")):
        raise AutoencoderError(f"{path} has no .safetensors weights (pickled .bin files are not loaded)")
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    try:
        ae = AutoencoderKL.from_pretrained(
            str(path), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, TypeError) as exc:
        raise AutoencoderError(f"{path} could not be loaded as a diffusers AutoencoderKL: {exc}") from exc
    return ae.eval().requires_grad_(False)


@torch.no_grad()
def encode(ae: AutoencoderKL, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> scaled latents (N, c, h, w): the posterior mode."""
    device = next(ae.parameters()).device
    scale = float(ae.config["scaling_factor"])
    return torch.cat([ae.encode(x.to(device)).latent_dist.mode().cpu() * scale for x in images.split(batch_size)])


@torch.no_grad()
def decode(ae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Scaled latents -> images clipped to [-1, 1], on the CPU."""
    device = next(ae.parameters()).device
    scale = float(ae.config["scaling_factor"])
    return torch.cat([ae.decode(z.to(device) / scale).sample.clamp(-1, 1).cpu() for z in latents.split(batch_size)])
