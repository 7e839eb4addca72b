"""The student a job trains, and its model card, from the job spec and the teacher's card."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dkdm_core.checkpoint import ROUTER_ARCH, ModelCard, RouterCard, build_from_card
from dkdm_core.methods.o2mkd import interval_edges
from dkdm_core.spec import DistillSpec

if TYPE_CHECKING:
    from dkdm_core.plan import JobPlan


def student_card(spec: DistillSpec, teacher: ModelCard) -> ModelCard:
    """The teacher's data, diffusion and autoencoder, with the student's architecture.

    The student predicts ε whatever the teacher predicts (``DiffusionSpec.for_student``).
    o2mkd: a router of ``o2mkd.students`` students over the teacher's T timesteps. boot: a one-step
    generator predicting signals (no variance output). ``info`` is left empty: the plan writes it.
    """
    card = teacher.model_copy(deep=True)
    card.info = {}
    # Students learn ε (and learned-range variance for learned-variance teachers): diffusion.py says why.
    card.diffusion = teacher.diffusion.for_student(teacher.learn_sigma)
    if spec.method == "o2mkd":
        n = spec.o2mkd.students
        card.arch = ROUTER_ARCH
        card.router = RouterCard(
            archs=list(spec.o2mkd.archs or [spec.student.arch] * n),
            edges=interval_edges(teacher.diffusion.num_timesteps, n, spec.o2mkd.boundaries),
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


def init_student(plan: JobPlan) -> nn.Module:
    """The student's initial weights, drawn under the plan's seed: the same network on every engine."""
    torch.manual_seed(plan.student_seed)
    return build_from_card(plan.student_card)
