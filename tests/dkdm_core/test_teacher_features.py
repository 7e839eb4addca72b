"""Teacher features exist for every teacher architecture: UNet, ViT, MLP and O2MKD routers."""

from __future__ import annotations

import pytest
import torch

from dkdm_core.methods.o2mkd import TimestepRouter
from dkdm_core.metrics import TeacherFeatureFD, teacher_features
from dkdm_core.models import build_model
from dkdm_core.spec import DiffusionSpec


@pytest.mark.parametrize("arch", ["unet-tiny", "vit-tiny", "mlp-small", "router"])
def test_features_are_pooled_late_activations_for_any_architecture(arch: str) -> None:
    torch.manual_seed(0)
    if arch == "router":
        model = TimestepRouter(
            [build_model("unet-tiny", 1, 8, False), build_model("vit-tiny", 1, 8, False)], [0, 50, 100]
        )
    else:
        model = build_model(arch, 2 if arch == "mlp-small" else 1, 8, False)
    shape = (2,) if arch == "mlp-small" else (1, 8, 8)
    diffusion = DiffusionSpec(num_timesteps=100).build(False)
    x = torch.randn((24, *shape), generator=torch.Generator().manual_seed(1))
    feats = teacher_features(model.eval(), diffusion, x, seed=3)
    assert feats.shape[0] == 24 and feats.ndim == 2
    # The same samples and seed give the same features: the floor and ceiling are reproducible.
    assert (feats == teacher_features(model, diffusion, x, seed=3)).all()
    fd = TeacherFeatureFD(model, diffusion, x, x.flip(0), seed=3)
    assert fd.evaluate(x)["teacher_fd"] == pytest.approx(0.0, abs=1e-6)
