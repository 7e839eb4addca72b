"""The shipped digits classifier and the evaluation of samples against the real digits."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from dkdm_core.checkpoint import CheckpointError, load_weights, read_weights
from dkdm_core.data import load_digits_tensor
from dkdm_core.metrics import DigitsClassifier, DigitsEvaluator, train_classifier

# Configs, the spec's default teacher and users name the bundled files ``assets/...``, wherever the
# package is installed: the name resolves to this folder unless such a path exists where it is given.
ASSETS_NAME = "assets"


def bundled_assets() -> Path:
    """The bundled teacher and metric classifier: package data of ``dkdm_core`` (a checkout or a wheel)."""
    root = resources.files("dkdm_core").joinpath(ASSETS_NAME)
    if not isinstance(root, Path):  # models are read as folders, so the package must be installed as files
        raise CheckpointError(f"dkdm_core's assets are not plain files ({root}); install the package unzipped")
    return root


CLASSIFIER_DIR = bundled_assets() / "classifier" / "digits"


def resolve_path(path: str | Path) -> Path:
    """A path as given, or the bundled copy of ``assets/...`` if no such path exists here."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute() or p.parts[:1] != (ASSETS_NAME,):
        return p
    bundled = bundled_assets().joinpath(*p.parts[1:])
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
