"""The teacher-feature Fréchet distance of a finished student (``dkdm_core.metrics.TeacherFeatureFD``).

It needs no data and no download: the student's teacher (named in its card's ``info["teacher"]``)
draws the reference samples and is the feature extractor. The teacher's two calibration sets (the
reference and the floor's other seed) are drawn once per (teacher, seed, steps, sampler, number)
and cached under ``OUT/quality/`` as safetensors, so a resumed or re-evaluated job does not pay for
them again.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dkdm_core.checkpoint import CheckpointError, ModelCard, load_model
from dkdm_core.metrics import TeacherFeatureFD
from dkdm_core.sampling import draw
from dkdm_core.spec import RunSpec
from services.evaluation import resolve_path

log = logging.getLogger(__name__)


def teacher_samples(
    teacher: nn.Module, card: ModelCard, key: str, run: RunSpec, seed: int, cache: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sets of the teacher's samples (seeds seed+1, seed+2), in its own (latent) space, cached."""
    name = hashlib.sha256(f"{key}|{seed}|{run.sample_steps}|{run.sampler}|{run.quality_samples}".encode()).hexdigest()
    path = cache / f"teacher-{name[:16]}.safetensors"
    if path.is_file():
        saved = load_file(str(path))
        return saved["reference"], saved["other"]
    n, steps = run.quality_samples, run.sample_steps
    reference = draw(teacher, card, n, seed + 1, steps, run.sampler, decode=False)
    other = draw(teacher, card, n, seed + 2, steps, run.sampler, decode=False)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"reference": reference.contiguous(), "other": other.contiguous()}, str(tmp))
    tmp.replace(path)
    return reference, other


def teacher_quality(
    model: nn.Module, card: ModelCard, run: RunSpec, seed: int, cache: Path, samples: torch.Tensor | None = None
) -> dict[str, float]:
    """teacher_fd, its floor and ceiling and the normalised score; {} for models without a teacher.

    ``samples`` are the student's samples already drawn with ``seed`` (reused when undecoded and many
    enough). A teacher that cannot be loaded any more leaves the figure out with a warning rather
    than failing a finished job.
    """
    teacher_path = card.info.get("teacher")
    if not teacher_path or run.quality_samples == 0:
        return {}
    try:
        teacher, teacher_card = load_model(resolve_path(teacher_path), next(model.parameters()).device)
    except CheckpointError as exc:
        log.warning("no teacher-feature FD: %s", exc)
        return {}
    n = run.quality_samples
    if samples is not None and card.autoencoder is None and samples.shape[0] >= n:
        student = samples[:n]
    else:
        student = draw(model, card, n, seed, run.sample_steps, run.sampler, decode=False)
    key = str(resolve_path(teacher_path).resolve())
    reference, other = teacher_samples(teacher, teacher_card, key, run, seed, cache)
    diffusion = teacher_card.diffusion.build(teacher_card.learn_sigma)
    # A class-conditional teacher extracts features under its null class (else class 0), for every sample.
    classes = teacher_card.classes
    label = None if classes is None else (classes.null_label if classes.null_label is not None else 0)
    return TeacherFeatureFD(teacher, diffusion, reference, other, seed, label).evaluate(student)


def quality_at(model: nn.Module, card: ModelCard, run: RunSpec, seed: int, out: Path, step: int) -> dict[str, float]:
    """``teacher_quality`` of a training run's EMA student when ``step`` is one of ``run.quality_every``'s."""
    if not run.quality_every or step % run.quality_every:
        return {}
    return teacher_quality(model, card, run, seed, out / "quality")
