"""The teacher-feature FD: calibrated on the bundled digits teacher, and in every student's metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dkdm_core.checkpoint import load_model
from dkdm_core.metrics import TeacherFeatureFD
from dkdm_core.sampling import draw
from tests.conftest import ROOT
from tests.services.test_local_engine import distill

pytestmark = [pytest.mark.slow]

TEACHER = ROOT / "dkdm_core" / "assets" / "teachers" / "digits"
QUALITY = ("teacher_fd", "teacher_fd_floor", "teacher_fd_ceiling", "teacher_fd_score")


def short_distill(teacher: Path, out: Path, steps: int, *extra: str) -> dict[str, float]:
    """The local-engine tests' short distillation, evaluated on enough samples for a Fréchet distance."""
    settings = ("run.log_every=50", "run.checkpoint_every=500", "run.sample_every=100000", "run.eval_samples=64")
    settings += ("run.quality_samples=64", "run.sample_steps=10")
    distill(teacher, out, steps, *(arg for item in settings for arg in ("--set", item)), *extra)
    return json.loads((out / "metrics.json").read_text())


def test_floor_is_far_below_the_ceiling_for_the_bundled_teacher() -> None:
    teacher, card = load_model(TEACHER)
    reference, other = draw(teacher, card, 64, 1, 10), draw(teacher, card, 64, 2, 10)
    fd = TeacherFeatureFD(teacher, card.diffusion.build(card.learn_sigma), reference, other)
    assert 0 < 3 * fd.floor < fd.ceiling
    blurred = torch.nn.functional.avg_pool2d(other, 3, 1, 1)  # (B, 1, 8, 8): a visibly worse generator
    assert fd.evaluate(blurred)["teacher_fd_score"] > 0.3


def test_a_distilled_student_scores_between_floor_and_ceiling(tmp_path: Path) -> None:
    metrics = short_distill(TEACHER, tmp_path / "run", 150, "--set", "run.quality_every=50")
    assert set(QUALITY) <= metrics.keys()
    # The figure while training, for the dashboard's curve: every 50 steps; the final one is metrics.json's.
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    during = [r for r in records if "quality" in r]
    assert [r["step"] for r in during] == [50, 100]
    assert all(set(QUALITY) <= r["quality"].keys() for r in during)
    assert metrics["teacher_fd_floor"] < metrics["teacher_fd"] < metrics["teacher_fd_ceiling"]
    assert (tmp_path / "run" / "quality").is_dir()  # the teacher's samples, cached for a re-evaluation


def test_the_figure_is_in_metrics_json_of_a_tiny_local_distill(tiny_teacher: Path, tmp_path: Path) -> None:
    metrics = short_distill(tiny_teacher, tmp_path / "run", 4, "--set", "run.quality_samples=16")
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in QUALITY)
    assert metrics["teacher_fd_floor"] < metrics["teacher_fd_ceiling"]
