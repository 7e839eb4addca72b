"""Sample-quality metrics: Fréchet distance (Heusel et al.) and Inception Score (Salimans et al.).

For the bundled digits, the features and class probabilities come from a small CNN classifier the
project trains on the digits and ships (``assets/classifier/digits``): a "digits FD" and an "IS
analogue" in the spirit of FID/IS, which need Inception features that 8x8 images cannot feed.
Inception FID is available when the user points to a local TorchScript Inception feature extractor.

For any other teacher there is no classifier and no data, so the *teacher* is the feature extractor
(:func:`teacher_features`): the student's samples and the teacher's own samples are lightly noised to
a fixed small timestep, passed through the teacher once, and a late layer's activations are pooled
over space (UNet mid block, last transformer block), the way FID pools Inception's last conv layer.
A denoiser must recognise the content of a nearly clean image to predict its noise, so these
activations carry what the teacher knows of its data (which shapes, how many of each, how clean),
in the teacher's own space (latents for latent models). :func:`teacher_fd_score` places a student's
distance between two calibration points: the teacher against itself with other seeds (the floor: the
finite-sample bias) and pure noise against the teacher (the ceiling).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from dkdm_core.diffusion import GaussianDiffusion
from dkdm_core.methods.o2mkd import TimestepRouter


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
    # scipy is imported on use: it adds a noticeable share to the import of every process that only
    # holds the evaluator (the control plane, the engine's actors).
    from scipy import linalg

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


# Teacher-feature Fréchet distance ------------------------------------------------------------------

# The timestep features are read at, as a fraction of the teacher's T. Small, so the input is still
# the sample itself (the features describe it, not the noise); not zero, so samples a hair apart
# (quantisation, a student's faint residual noise under the teacher's own noise level) land on the
# same features, and the input is one the teacher was trained on at that t.
FEATURE_T_FRACTION = 0.05


def feature_layer(teacher: nn.Module, t: int) -> nn.Module | None:
    """The late layer whose pooled output is the feature vector; None: the network's output itself.

    A UNet's mid block is its bottleneck, the most abstract view of the whole image; a transformer's
    last block is the same for DiT-style models. An O2MKD router defers to the part that owns ``t``.
    """
    if isinstance(teacher, TimestepRouter):
        return feature_layer(teacher.parts[bisect_right(teacher.edges[1:-1], t)], t)  # as TimestepRouter.owner
    net = getattr(teacher, "net", teacher)
    mid = getattr(net, "mid_block", None)
    if isinstance(mid, nn.Module):
        return mid
    for name in ("blocks", "transformer_blocks"):
        blocks = getattr(net, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks[-1]
    if isinstance(net, nn.Sequential) and len(net) > 2:  # an MLP: the last hidden activation
        return net[-2]
    return None


def _pool(h: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) mean over space; (B, N, D) tokens -> (B, D) mean over tokens; (B, D) kept."""
    if h.dim() == 4:
        return h.mean(dim=(2, 3))
    if h.dim() == 3:
        return h.mean(dim=1)
    return h.flatten(1)


@contextmanager
def _capture(layer: nn.Module | None, store: list[torch.Tensor]) -> Iterator[None]:
    if layer is None:
        yield
        return

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        out = output[0] if isinstance(output, tuple) else output
        store.append(_pool(out.float()))  # type: ignore[union-attr]

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def teacher_features(
    teacher: nn.Module,
    diffusion: GaussianDiffusion,
    x_0: torch.Tensor,
    seed: int = 0,
    t_fraction: float = FEATURE_T_FRACTION,
    batch_size: int = 256,
    label: int | None = None,
) -> np.ndarray:
    """Features (N, D) float64 of samples ``x_0`` (N, *sample_shape) in the teacher's own space.

    ``diffusion`` is the teacher's unrespaced diffusion. Sample i is noised with the i-th draw of a
    generator seeded by ``seed`` whatever set it belongs to, so two sets see the same noise and the
    distance between them is the samples', not the noise's. A class-conditional teacher is run with
    one fixed ``label`` for every sample (its null class where it has one), so the features do not
    depend on which class a sample was drawn for.
    """
    t = min(max(round(t_fraction * diffusion.num_timesteps), 1), diffusion.num_timesteps - 1)
    device = next(teacher.parameters()).device
    dtype = next(teacher.parameters()).dtype
    layer = feature_layer(teacher, t)
    generator = torch.Generator().manual_seed(seed)
    feats: list[torch.Tensor] = []
    for chunk in x_0.split(batch_size):
        noise = torch.randn(chunk.shape, generator=generator)
        x_t = diffusion.q_sample(chunk.double(), torch.full((chunk.shape[0],), t), noise.double())
        timesteps = torch.full((chunk.shape[0],), t, device=device, dtype=torch.long)
        captured: list[torch.Tensor] = []
        with _capture(layer, captured):
            x_in = x_t.to(device=device, dtype=dtype)
            if label is None:
                out = teacher(x_in, timesteps)
            else:
                out = teacher(x_in, timesteps, torch.full_like(timesteps, label))
        feats.append((captured[-1] if captured else _pool(out.float())).cpu())  # (B, D)
    return torch.cat(feats).double().numpy()


def teacher_fd_score(fd: float, floor: float, ceiling: float) -> float:
    """(FD - floor) / (ceiling - floor): 0 is as close as the teacher to itself, 1 as far as noise."""
    return (fd - floor) / max(ceiling - floor, 1e-12)


class TeacherFeatureFD:
    """Fréchet distances to a teacher's samples in its own feature space, calibrated on construction.

    ``reference`` and ``other`` are two sets of the teacher's samples drawn with different seeds:
    ``other`` against ``reference`` is the floor, standard normal noise against it the ceiling.
    """

    def __init__(
        self,
        teacher: nn.Module,
        diffusion: GaussianDiffusion,
        reference: torch.Tensor,
        other: torch.Tensor,
        seed: int = 0,
        label: int | None = None,
    ) -> None:
        self.teacher, self.diffusion, self.seed, self.label = teacher, diffusion, seed, label
        self.ref_mu, self.ref_sigma = feature_statistics(self.features(reference))
        self.floor = self.fd(other)
        noise = torch.randn(reference.shape, generator=torch.Generator().manual_seed(seed + 1))
        self.ceiling = self.fd(noise)

    def features(self, x_0: torch.Tensor) -> np.ndarray:
        return teacher_features(self.teacher, self.diffusion, x_0, self.seed, label=self.label)

    def fd(self, x_0: torch.Tensor) -> float:
        mu, sigma = feature_statistics(self.features(x_0))
        return frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)

    def evaluate(self, x_0: torch.Tensor) -> dict[str, float]:
        fd = self.fd(x_0)
        return {
            "teacher_fd": fd,
            "teacher_fd_floor": self.floor,
            "teacher_fd_ceiling": self.ceiling,
            "teacher_fd_score": teacher_fd_score(fd, self.floor, self.ceiling),
        }
