"""Sample-quality metrics: Fréchet distance (Heusel et al.) and Inception Score (Salimans et al.).

For the bundled digits, the features and class probabilities come from a small CNN classifier the
project trains on the digits and ships (``assets/classifier/digits``): a "digits FD" and an "IS
analogue" in the spirit of FID/IS, which need Inception features that 8x8 images cannot feed.
Inception FID is available when the user points to a local TorchScript Inception feature extractor.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from torch import nn


class DigitsClassifier(nn.Module):
    """8x8 grey digits -> 10 classes; ``features`` is the 128-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # (B, 64, 4, 4)
            nn.Conv2d(64, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # (B, 64, 2, 2)
            nn.Flatten(),
            nn.Linear(256, 128),
            nn.GELU(),
        )
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # (B, 10) logits


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    epochs: int = 30,
    batch_size: int = 64,
    noise_std: float = 0.1,
) -> DigitsClassifier:
    """Fit the digits classifier; mild input noise keeps its features smooth around the data."""
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    n = images.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for ids in order.split(batch_size):
            x = images[ids] + noise_std * torch.randn(images[ids].shape, generator=generator)
            loss = nn.functional.cross_entropy(model(x), labels[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def classifier_outputs(
    classifier: DigitsClassifier, images: torch.Tensor, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, 128) and class probabilities (N, 10) as float64 numpy arrays."""
    feats, probs = [], []
    for chunk in images.split(batch_size):
        f = classifier.features(chunk.clamp(-1, 1))
        feats.append(f)
        probs.append(torch.softmax(classifier.head(f), dim=1))
    return torch.cat(feats).double().numpy(), torch.cat(probs).double().numpy()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D)."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½), as in the FID reference implementation."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # A near-singular product: regularise both covariances slightly, as pytorch-fid does.
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, splits: int = 1) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))), averaged over ``splits`` equal parts."""
    scores = []
    for part in np.array_split(probs, splits):
        p_y = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(p_y + 1e-12))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))


class DigitsEvaluator:
    """Digits FD and IS analogue of generated images against the real digits' statistics."""

    def __init__(self, classifier: DigitsClassifier, reference: torch.Tensor) -> None:
        self.classifier = classifier.eval()
        feats, _ = classifier_outputs(self.classifier, reference)
        self.ref_mu, self.ref_sigma = feature_statistics(feats)

    def evaluate(self, images: torch.Tensor) -> dict[str, float]:
        feats, probs = classifier_outputs(self.classifier, images)
        mu, sigma = feature_statistics(feats)
        return {
            "digits_fd": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma),
            "digits_is": inception_score(probs),
            "num_samples": float(images.shape[0]),
        }
