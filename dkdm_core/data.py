"""Bundled datasets: scikit-learn's 8x8 digits and synthetic 2-D mixtures. Nothing is downloaded.

Images are float tensors in [-1, 1], shape (N, C, H, W); vectors are (N, D).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

DatasetName = Literal["digits", "toy-2d"]


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as (N, 1, 8, 8) in [-1, 1] and their labels (N,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    return images.unsqueeze(1), torch.from_numpy(bunch.target.astype(np.int64))


def toy_2d(num: int, generator: torch.Generator) -> torch.Tensor:
    """A ring of 8 Gaussians of radius 0.7 and std 0.05, inside [-1, 1]^2: (N, 2)."""
    centers = torch.tensor([[math.cos(2 * math.pi * k / 8), math.sin(2 * math.pi * k / 8)] for k in range(8)]) * 0.7
    which = torch.randint(0, 8, (num,), generator=generator)
    return centers[which] + 0.05 * torch.randn(num, 2, generator=generator)


def load_dataset(name: DatasetName, generator: torch.Generator | None = None) -> torch.Tensor:
    """A named training set as one tensor in [-1, 1]."""
    if name == "digits":
        return load_digits_tensor()[0]
    if name == "toy-2d":
        return toy_2d(4096, generator or torch.Generator().manual_seed(0))
    raise ValueError(f"unknown dataset {name!r}; expected 'digits' or 'toy-2d'")


def dataset_labels(name: DatasetName) -> torch.Tensor:
    """A labelled dataset's class labels (N,), in ``load_dataset``'s order: what conditional teachers learn."""
    if name == "digits":
        return load_digits_tensor()[1]
    raise ValueError(f"dataset {name!r} has no class labels; class-conditional teachers train on digits")


def mix_real(
    synthetic: torch.Tensor, real: torch.Tensor, real_fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """The data-limited set: ``synthetic`` with round(P·N) random entries replaced by random real ones."""
    n = synthetic.shape[0]
    k = round(real_fraction * n)
    mixed = synthetic.clone()
    slots = torch.randperm(n, generator=generator)[:k]
    if k <= real.shape[0]:
        picks = torch.randperm(real.shape[0], generator=generator)[:k]
    else:
        picks = torch.randint(0, real.shape[0], (k,), generator=generator)
    mixed[slots] = real[picks]
    return mixed


def sample_shape(name: DatasetName) -> tuple[int, ...]:
    return {"digits": (1, 8, 8), "toy-2d": (2,)}[name]


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (N, C, H, W) -> uint8 (N, H, W, C), the ADM evaluation suite's layout."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_nhwc(arr: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
