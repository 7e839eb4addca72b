"""Latent space: the autoencoder's encode/decode round trip, its files, and latent model folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dkdm_core.checkpoint import AUTOENCODER_DIR, ModelCard, export_diffusers, load_model, read_card, save_model
from dkdm_core.data import load_dataset
from dkdm_core.latent import (
    AutoencoderError,
    build_autoencoder,
    decode,
    encode,
    load_autoencoder,
    save_autoencoder,
    train_autoencoder,
)
from dkdm_core.models import build_model
from dkdm_core.sampling import draw
from dkdm_core.spec import DiffusionSpec


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor, float]:
    """A small autoencoder trained briefly on the digits, saved; with the untrained one's error."""
    torch.manual_seed(0)
    digits = load_dataset("digits")
    ae = build_autoencoder(1, 8, latent_channels=3, widths=(16, 32))
    untrained = float(((decode(ae, encode(ae, digits)) - digits) ** 2).mean())
    train_autoencoder(ae, digits, steps=150, generator=torch.Generator().manual_seed(0), batch_size=64)
    path = save_autoencoder(ae, tmp_path_factory.mktemp("ae") / "ae")
    return path, digits, untrained


def test_encode_decode_round_trip_reconstructs_the_digits(trained: tuple[Path, torch.Tensor, float]) -> None:
    path, digits, untrained = trained
    ae = load_autoencoder(str(path))
    latents = encode(ae, digits)
    assert latents.shape == (digits.shape[0], 3, 4, 4)
    # scaling_factor makes the latents unit-variance, as the diffusion expects.
    assert abs(float(latents.std()) - 1.0) < 1e-3
    recon = decode(ae, latents)
    assert recon.shape == digits.shape and float(recon.abs().max()) <= 1.0
    error = float(((recon - digits) ** 2).mean())
    assert error < 0.1 * untrained and error < 0.05


def test_a_saved_autoencoder_loads_back_identically(trained: tuple[Path, torch.Tensor, float]) -> None:
    path, digits, _ = trained
    a = load_autoencoder(str(path))
    copy = path.parent / "copy"
    shutil.copytree(path, copy)
    b = load_autoencoder(str(copy))
    assert a is not b
    torch.testing.assert_close(encode(a, digits[:32]), encode(b, digits[:32]))


def test_autoencoders_without_safetensors_are_refused(tmp_path: Path, trained) -> None:
    path, _, _ = trained
    with pytest.raises(AutoencoderError, match=r"config\.json is missing"):
        load_autoencoder(str(tmp_path))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AutoencoderError, match="pickled"):
        load_autoencoder(str(tmp_path))


def test_a_latent_model_folder_carries_its_autoencoder(tmp_path: Path, trained) -> None:
    path, _, _ = trained
    model = build_model("unet-tiny", 3, 4, False)
    card = ModelCard(
        arch="unet-tiny",
        channels=3,
        image_size=4,
        learn_sigma=False,
        diffusion=DiffusionSpec(num_timesteps=100),
        data="digits",
        autoencoder=str(path),
    )
    save_model(tmp_path / "m", model, card)
    assert (tmp_path / "m" / AUTOENCODER_DIR / "config.json").is_file()
    assert '"autoencoder": "autoencoder"' in (tmp_path / "m" / "config.json").read_text()
    # The folder is self-contained: moved elsewhere, it still decodes with its own copy.
    shutil.move(tmp_path / "m", tmp_path / "moved")
    loaded, loaded_card = load_model(tmp_path / "moved")
    assert loaded_card.autoencoder == str((tmp_path / "moved" / AUTOENCODER_DIR).resolve())
    assert loaded_card.sample_shape == (3, 4, 4)
    images = draw(loaded, loaded_card, 5, seed=0, steps=4)
    assert images.shape == (5, 1, 8, 8)
    # Saving a model whose card came from a loaded latent model copies the autoencoder again.
    save_model(tmp_path / "again", loaded, read_card(tmp_path / "moved"))
    assert (tmp_path / "again" / AUTOENCODER_DIR / "config.json").is_file()


def test_a_latent_unet_exports_to_and_imports_from_a_diffusers_folder_with_its_vae(tmp_path: Path, trained) -> None:
    path, _, _ = trained
    card = ModelCard(
        arch="unet-tiny",
        channels=3,
        image_size=4,
        learn_sigma=False,
        diffusion=DiffusionSpec(num_timesteps=100),
        autoencoder=str(path),
    )

    model = build_model("unet-tiny", 3, 4, False).eval()
    export_diffusers(model, card, tmp_path / "pipe")
    assert (tmp_path / "pipe" / "vae" / "config.json").is_file()
    loaded, loaded_card = load_model(tmp_path / "pipe")
    assert loaded_card.autoencoder == str((tmp_path / "pipe" / "vae").resolve())
    a = draw(model, card, 4, seed=0, steps=3)
    b = draw(loaded, loaded_card, 4, seed=0, steps=3)
    assert a.shape == (4, 1, 8, 8)
    torch.testing.assert_close(a, b)
