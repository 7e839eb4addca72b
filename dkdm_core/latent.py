"""Latent space: a diffusers autoencoder between images and the latents a diffusion models.

The project trains a small ``AutoencoderKL`` on the bundled digits (8x8 -> 3x4x4) or loads a user's
from a local diffusers folder (safetensors only): an ``AutoencoderKL`` (DiTPipeline's ``vae``, or the
project's own) or a ``VQModel`` (LDMPipeline's ``vqvae``; Rombach et al. Sec. 3: the diffusion models
the latents before quantisation, and decoding quantises them). Latents are scaled by the
autoencoder's ``scaling_factor`` (set to 1/std of the training latents, as latent diffusion does) so
the diffusion sees unit variance; decoding divides by it, as both diffusers pipelines do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dkdm_core.imports import DIFFUSERS

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.autoencoders.vq_model import VQModel

    Autoencoder = AutoencoderKL | VQModel

# The autoencoder classes a latent model decodes with, by the ``_class_name`` of their config.json.
AUTOENCODER_NAMES = ("AutoencoderKL", "VQModel")


def _autoencoder_type(name: str) -> type[AutoencoderKL] | type[VQModel]:
    with DIFFUSERS:
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
        from diffusers.models.autoencoders.vq_model import VQModel

    return AutoencoderKL if name == "AutoencoderKL" else VQModel


class AutoencoderError(ValueError):
    """An autoencoder folder that cannot be used; the message names it."""


def build_autoencoder(
    channels: int = 1, image_size: int = 8, latent_channels: int = 3, widths: tuple[int, ...] = (32, 64)
) -> AutoencoderKL:
    """A small KL autoencoder that downsamples by 2^(len(widths) - 1)."""
    # diffusers is imported where an autoencoder is made: it takes seconds, and most processes that
    # import sampling (Ray actors, the control plane) never touch a latent model.
    with DIFFUSERS:
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


def autoencoder_class(directory: str | Path) -> str:
    """The ``_class_name`` of an autoencoder folder's config (AutoencoderKL when it names none)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise AutoencoderError(f"{Path(directory)} is not an autoencoder folder: config.json is missing")
    try:
        name = json.loads(path.read_text()).get("_class_name", "AutoencoderKL")
    except (ValueError, AttributeError) as exc:
        raise AutoencoderError(f"{path} is not a valid autoencoder config: {exc}") from exc
    if name not in AUTOENCODER_NAMES:
        raise AutoencoderError(f"{path}: autoencoder class {name!r} is not supported (AutoencoderKL or VQModel)")
    return str(name)


@lru_cache(maxsize=8)
def load_autoencoder(directory: str) -> Autoencoder:
    """A diffusers AutoencoderKL or VQModel folder (config.json + safetensors; pickled weights are refused)."""
    path = Path(directory)
    name = autoencoder_class(path)
    if not any(path.glob("*.safetensors")):
        raise AutoencoderError(f"{path} has no .safetensors weights (pickled .bin files are not loaded)")
    try:
        ae = _autoencoder_type(name).from_pretrained(
            str(path), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, TypeError) as exc:
        raise AutoencoderError(f"{path} could not be loaded as a diffusers {name}: {exc}") from exc
    return ae.eval().requires_grad_(False)


@torch.no_grad()
def encode(ae: Autoencoder, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> scaled latents (N, c, h, w): the posterior mode (KL), the
    unquantised latents (VQ, which LDM's diffusion models)."""
    device = next(ae.parameters()).device
    scale = float(ae.config["scaling_factor"])

    def one(x: torch.Tensor) -> torch.Tensor:
        if type(ae).__name__ == "VQModel":  # by name: diffusers stays unimported until a model is made
            return ae.encode(x.to(device)).latents
        return ae.encode(x.to(device)).latent_dist.mode()

    return torch.cat([one(x).cpu() * scale for x in images.split(batch_size)])


@torch.no_grad()
def decode(ae: Autoencoder, latents: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Scaled latents -> images clipped to [-1, 1], on the CPU: ``ae.decode(z / scaling_factor)`` as
    LDMPipeline and DiTPipeline decode (a VQModel quantises inside ``decode``)."""
    device = next(ae.parameters()).device
    scale = float(ae.config["scaling_factor"])
    return torch.cat([ae.decode(z.to(device) / scale).sample.clamp(-1, 1).cpu() for z in latents.split(batch_size)])
