"""The shipped digits classifier and the evaluation of samples against the real digits."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import save_file

from dkdm_core.checkpoint import CheckpointError, load_weights, read_weights
from dkdm_core.data import load_digits_tensor
from dkdm_core.metrics import DigitsClassifier, DigitsEvaluator, train_classifier

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER_DIR = PROJECT_ROOT / "assets" / "classifier" / "digits"


def resolve_path(path: str | Path) -> Path:
    """A path as given, or relative to the project root for bundled assets (``assets/...``)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    bundled = PROJECT_ROOT / p
    return bundled if bundled.exists() else p


def train_and_save_classifier(out: Path, seed: int = 0, epochs: int = 30) -> dict[str, float]:
    """Train on 80% of the digits, report held-out accuracy, then refit on all and save."""
    images, labels = load_digits_tensor()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=gen)
    cut = int(0.8 * images.shape[0])
    probe = train_classifier(images[order[:cut]], labels[order[:cut]], gen, epochs=epochs)
    with torch.no_grad():
        accuracy = (probe(images[order[cut:]]).argmax(1) == labels[order[cut:]]).float().mean().item()
    model = train_classifier(images, labels, gen, epochs=epochs)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "classifier.safetensors"))
    info = {"heldout_accuracy": accuracy, "epochs": epochs, "seed": seed}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info


def load_classifier(directory: Path = CLASSIFIER_DIR) -> DigitsClassifier:
    weights = directory / "classifier.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"digits classifier not found at {weights}; run `dkdm classifier train`")
    model = DigitsClassifier()
    load_weights(model, read_weights(weights), str(weights))
    return model.eval()


@lru_cache(maxsize=1)
def digits_evaluator() -> DigitsEvaluator:
    return DigitsEvaluator(load_classifier(), load_digits_tensor()[0])
