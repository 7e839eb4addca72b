"""The student a job trains, and its model card, from the job spec and the teacher's card."""

from __future__ import annotations

from torch import nn

from dkdm_core.checkpoint import ROUTER_ARCH, ModelCard, RouterCard, build_from_card
from dkdm_core.methods.o2mkd import interval_edges
from dkdm_core.spec import DistillSpec


def student_card(spec: DistillSpec, teacher: ModelCard) -> ModelCard:
    """The teacher's data, diffusion and autoencoder, with the student's architecture.

    The student predicts ε whatever the teacher predicts (``DiffusionSpec.for_student``).
    o2mkd: a router of ``o2mkd.students`` students over the teacher's T timesteps. boot: a one-step
    generator predicting signals (no variance output).
    """
    card = teacher.model_copy(deep=True)
    card.info = {}
    # Students learn ε (and learned-range variance for learned-variance teachers): diffusion.py says why.
    card.diffusion = teacher.diffusion.for_student(teacher.learn_sigma)
    if spec.method == "o2mkd":
        n = spec.o2mkd.students
        t = teacher.diffusion.num_timesteps
        if spec.o2mkd.boundaries and spec.o2mkd.boundaries[-1] >= t:
            raise ValueError(f"o2mkd.boundaries must lie inside (0, {t}) for a teacher with T = {t}")
        card.arch = ROUTER_ARCH
        card.router = RouterCard(
            archs=list(spec.o2mkd.archs or [spec.student.arch] * n),
            edges=interval_edges(t, n, spec.o2mkd.boundaries),
        )
    elif spec.method == "boot":
        card.arch = spec.student.arch
        card.learn_sigma = False
        card.generator = "one-step"
        if card.diffusion.variance_type is not None:  # a one-step generator has no reverse variance
            card.diffusion.variance_type = "fixed_small"
    else:
        card.arch = spec.student.arch
    return card


def build_student(spec: DistillSpec, teacher: ModelCard) -> tuple[nn.Module, ModelCard]:
    card = student_card(spec, teacher)
    return build_from_card(card), card
