"""FID with Inception features, when the user points to a local TorchScript feature extractor.

The extractor is a TorchScript archive (e.g. the ``inception-2015-12-05.pt`` detector used by
StyleGAN's and clean-fid's FID) that maps float images (N, 3, 299, 299) with values in [0, 255] to
features (N, D); a module whose ``forward`` takes ``return_features=True`` is called that way.
``torch.jit.load`` reads TorchScript code and tensors with its own restricted loader, not Python's
pickle, so no arbitrary Python objects are rebuilt; still, load only extractors you trust.
Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dkdm_core.data import load_digits_tensor
from dkdm_core.metrics import feature_statistics, frechet_distance


def load_extractor(path: str | Path) -> torch.jit.ScriptModule:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Inception feature extractor not found: {p}")
    try:
        return torch.jit.load(str(p), map_location="cpu").eval()
    except RuntimeError as exc:
        raise ValueError(f"{p} is not a TorchScript archive: {str(exc).splitlines()[0]}") from exc


def _to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images (N, C, H, W) -> (N, 3, 299, 299) in [0, 255], grey repeated to RGB."""
    x = (images.clamp(-1, 1) + 1) * 127.5
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


@torch.no_grad()
def extract(extractor: torch.jit.ScriptModule, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    feats = []
    for chunk in images.split(batch_size):
        x = _to_inception_input(chunk)
        try:
            f = extractor(x, return_features=True)
        except (RuntimeError, TypeError):
            f = extractor(x)
        feats.append(f.reshape(f.shape[0], -1).double())
    return torch.cat(feats)


def inception_fid(images: torch.Tensor, extractor_path: str | Path) -> float:
    """FID of ``images`` against all real digits, with the given extractor's features."""
    extractor = load_extractor(extractor_path)
    real = load_digits_tensor()[0]
    mu_r, sigma_r = feature_statistics(extract(extractor, real).numpy())
    mu_g, sigma_g = feature_statistics(extract(extractor, images).numpy())
    return frechet_distance(mu_g, sigma_g, mu_r, sigma_r)
