"""Every registered architecture maps (x_t, t) to the right number of output channels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dkdm_core.models import IMAGE_SIZES, MODELS, VECTOR_MODELS, build_model, count_parameters

SMALL = sorted(set(MODELS) - set(IMAGE_SIZES))


@pytest.mark.parametrize("arch", SMALL)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shape(arch: str, learn_sigma: bool) -> None:
    model = build_model(arch, 1 if arch not in VECTOR_MODELS else 2, 8, learn_sigma)
    x = torch.randn(3, 2) if arch in VECTOR_MODELS else torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]))
    k = 2 if learn_sigma else 1
    assert out.shape == (3, k * x.shape[1], *x.shape[2:])
    assert torch.isfinite(out).all()


def test_models_depend_on_the_timestep() -> None:
    torch.manual_seed(0)
    for arch in ("unet-tiny", "vit-tiny"):
        model = build_model(arch, 1, 8, True)
        # DiT starts as the zero map (adaLN-Zero); perturb so t has an effect to measure.
        for p in model.parameters():
            p.data += 0.05 * torch.randn_like(p)
        x = torch.randn(2, 1, 8, 8)
        assert not torch.allclose(model(x, torch.tensor([1, 1])), model(x, torch.tensor([900, 900])))


def test_unknown_model_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'unet-huge'.*unet-small"):
        build_model("unet-huge", 1, 8, True)


def test_vit_rejects_image_size_not_divisible_by_patch() -> None:
    with pytest.raises(ValueError, match="patch size"):
        build_model("vit-tiny", 1, 7, True)


# The README's preset table: (architecture, channels) -> parameters with the learned-variance output.
PRESETS = {
    ("ddpm-cifar10", 3): 35_749_766,
    ("ddpm-cifar10-half", 3): 8_953_798,
    ("ddpm-cifar10-quarter", 3): 2_246_630,
    ("adm-64", 3): 121_062_918,
    ("dit-s-2", 3): 32_525_208,
    ("dit-s-2", 4): 32_529_824,
    ("dit-b-2", 3): 129_636_120,
    ("dit-b-2", 4): 129_645_344,
}


@pytest.mark.parametrize(("arch", "channels"), sorted(PRESETS))
def test_presets_map_c_to_2c_with_the_tabled_size(arch: str, channels: int) -> None:
    size = IMAGE_SIZES[arch][0]
    model = build_model(arch, channels, size, True)
    assert count_parameters(model) == PRESETS[(arch, channels)]
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size), torch.tensor([3, 900]))
    assert out.shape == (2, 2 * channels, size, size)
    assert {a for a, _ in PRESETS} == set(IMAGE_SIZES)


def test_presets_refuse_other_image_sizes() -> None:
    with pytest.raises(ValueError, match=r"'ddpm-cifar10' is made for 32x32 images, not 8"):
        build_model("ddpm-cifar10", 3, 8, True)


# Six threads build a model while diffusers is imported for the first time: as concurrent POST /jobs
# do in the control plane's thread pool (each plan builds its student on the meta device).
CONCURRENT_FIRST_IMPORT = """
import threading
from dkdm_core.models import build_model
from dkdm_core.latent import build_autoencoder
errors = []
def build(i):
    try:
        build_model("unet-tiny", 1, 8, True) if i % 2 else build_autoencoder()
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=build, args=(i,)) for i in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors)
"""


def test_models_build_from_many_threads_while_diffusers_is_first_imported() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", CONCURRENT_FIRST_IMPORT], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
