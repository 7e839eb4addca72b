"""The job plan: everything a distillation job derives from its spec and its teacher, made once.

``make_plan(spec, teacher_card)`` is pure (the caller reads the teacher's card, once). The plan
holds the chain the teacher walks (DKDM Sec. 4.3: a respaced chain of ``pool.chain_steps``), the
pool and shard sizes (|B+| = ρ·K·b, Sec. 4.3), the seeds of pool, teacher and student, the
student's card with its provenance, and the outcome of every check that needs the teacher. The
local engine, the Ray driver, its actors, the student ranks and the control plane all take the plan
(actors and Ray Train workers its ``model_dump()``), so no part works any of this out again.

Seeds live here so the two engines agree by construction: shard 0 draws like the local engine's
single pool, replica 0 of generation 0 like its teacher, and every student starts from the same
weights. A run with 1 replica, 1 rank and 1 shard therefore reproduces Algorithm 1 step for step.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from dkdm_core.checkpoint import DIFFUSERS_ARCHS, ClassCard, ModelCard, build_from_card
from dkdm_core.diffusion import GaussianDiffusion
from dkdm_core.guidance import Guidance
from dkdm_core.models import VECTOR_MODELS, count_parameters
from dkdm_core.objective import ObjectiveMode, resolve_objective
from dkdm_core.pool import pool_size
from dkdm_core.spec import POOL_METHODS, DistillSpec
from dkdm_core.students import student_card

# Strides between the seeds of shards, replicas and replica generations: primes far apart, so no
# two generators of one job start from the same seed for any realistic number of each.
SHARD_SEED_STRIDE = 1_000_003
REPLICA_SEED_STRIDE = 7_919
GENERATION_SEED_STRIDE = 104_729


def pool_seed(seed: int, shard: int = 0) -> int:
    """Shard k's pool generator (which samples to take, restart noise); shard 0 = the local pool."""
    return seed + shard * SHARD_SEED_STRIDE


def teacher_seed(seed: int, replica: int = 0, generation: int = 0) -> int:
    """The ancestral-step noise of replica ``replica`` of ``generation``; 0/0 = the local teacher."""
    return seed + 1 + replica * REPLICA_SEED_STRIDE + generation * GENERATION_SEED_STRIDE


def student_seed(seed: int) -> int:
    """The global torch seed the student's initial weights are drawn under, on every engine."""
    return seed


def shard_sizes(total: int, shards: int) -> list[int]:
    """Split ``total`` pool samples over ``shards`` as evenly as possible (first ones get the rest)."""
    base, rest = divmod(total, shards)
    return [base + (1 if k < rest else 0) for k in range(shards)]


class PlanError(ValueError):
    """A job the teacher cannot run; ``field`` is the spec field to change (e.g. ``pool.chain_steps``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class JobPlan(BaseModel):
    """One job, worked out once. Frozen: every part reads the same plan.

    Device, precision and compilation are ``spec.runtime``: they travel with the plan, and each
    process resolves them for the machine it runs on (``dkdm_core.runtime.resolve_runtime``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: DistillSpec
    teacher_dir: str  # resolved; replicas load the weights from here
    teacher_card: ModelCard
    student_card: ModelCard  # architecture and provenance (info) of what the job trains
    respacing: int | None  # the chain's K (None: the teacher's full T)
    chain_length: int  # K, or T when not respaced
    pool_size: int  # |B+| over all shards; 0 for methods without a pool
    shard_sizes: tuple[int, ...]  # one entry per PoolShard (one for the local engine)
    rank_batch: int  # b / m: what one student rank trains on per step
    objective: ObjectiveMode  # ``spec.objective`` resolved for the teacher (auto: dkdm iff it learns Σ)
    # Class-conditional teachers (``spec.classes`` resolved against the teacher's card): the classes
    # pool samples are drawn from (empty: unconditional), the pool's guidance scale, the student's null share.
    classes: tuple[int, ...] = ()
    guidance_scale: float = 1.0
    null_fraction: float = 0.0

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.teacher_card.sample_shape

    @property
    def student_seed(self) -> int:
        return student_seed(self.spec.seed)

    def pool_seed(self, shard: int = 0) -> int:
        return pool_seed(self.spec.seed, shard)

    def teacher_seed(self, replica: int = 0, generation: int = 0) -> int:
        return teacher_seed(self.spec.seed, replica, generation)

    @property
    def pool_classes(self) -> tuple[int, ...] | None:
        """What ``NoisePool(classes=...)`` takes: None for an unconditional teacher."""
        return self.classes or None

    def guidance(self) -> Guidance | None:
        """How the teacher is run on labelled pool samples; None for an unconditional teacher."""
        classes = self.teacher_card.classes
        if classes is None:
            return None
        return Guidance(classes.num, self.guidance_scale, classes.null_label, self.null_fraction)

    def build_chain(self) -> GaussianDiffusion:
        """The chain the teacher steps along (its own scheduler: variance, parameterisation, clipping)
        and the student learns on, in ε terms (``eps_view``): the one place it is built."""
        return self.teacher_card.diffusion.build(self.teacher_card.learn_sigma, respacing=self.respacing)

    def build_student_diffusion(self) -> GaussianDiffusion:
        """The student's own full diffusion (ε parameterisation): what the dataset baselines train in."""
        return self.student_card.diffusion.build(self.student_card.learn_sigma)


def _check_teacher(spec: DistillSpec, teacher: ModelCard) -> None:
    """Every check of the spec against its teacher, each naming the field to change."""
    t = teacher.diffusion.num_timesteps
    if spec.method in POOL_METHODS:
        try:
            resolve_objective(spec.objective, teacher.learn_sigma)
        except ValueError as exc:
            raise PlanError("objective", str(exc)) from exc
    steps = spec.pool.chain_steps
    if spec.method in (*POOL_METHODS, "boot") and steps is not None and steps > t:
        raise PlanError("pool.chain_steps", f"pool.chain_steps={steps} exceeds the teacher's T={t}")
    if spec.method == "o2mkd" and spec.o2mkd.boundaries and spec.o2mkd.boundaries[-1] >= t:
        raise PlanError("o2mkd.boundaries", f"o2mkd.boundaries must lie inside (0, {t}) for a teacher with T = {t}")
    if spec.method == "data-based" and teacher.data is None:
        raise PlanError("method", "method data-based needs the teacher's dataset, and this teacher names none")
    _check_classes(spec, teacher)


def _check_classes(spec: DistillSpec, teacher: ModelCard) -> None:
    """``spec.classes`` against the teacher's classes: an unconditional teacher takes none of it."""
    c, classes = spec.classes, teacher.classes
    if classes is None:
        if not c.is_default:
            raise PlanError("classes", "the teacher is not class-conditional: leave the classes section unset")
        return
    if spec.method != "dkdm":
        raise PlanError("method", f"method {spec.method!r} does not support class-conditional teachers yet; use dkdm")
    if spec.student.arch in VECTOR_MODELS:
        raise PlanError("student.arch", f"{spec.student.arch} has no class embedding; use a unet-* or vit-* student")
    bad = [label for label in c.labels or [] if not 0 <= label < classes.num]
    if bad:
        raise PlanError("classes.labels", f"classes.labels must be in [0, {classes.num - 1}], got {bad}")
    if not classes.null and c.guidance_scale not in (None, 1.0):
        raise PlanError("classes.guidance_scale", "the teacher has no null class, so no guidance: use 1")
    if not classes.null and c.null_fraction:
        raise PlanError("classes.null_fraction", "the teacher has no null class to teach the student")


def _resolve_classes(spec: DistillSpec, teacher: ModelCard) -> dict[str, Any]:
    """The plan's class fields: pool classes, guidance scale and the student's null share."""
    classes = teacher.classes
    if classes is None:
        return {}
    c = spec.classes
    null_fraction = (c.null_fraction if c.null_fraction is not None else 0.1) if classes.null else 0.0
    return {
        "classes": tuple(c.labels if c.labels is not None else range(classes.num)),
        "guidance_scale": c.guidance_scale if c.guidance_scale is not None else classes.guidance_scale,
        "null_fraction": null_fraction,
    }


def _parameters(card: ModelCard) -> int | None:
    """Parameter count of the network a card describes, built on the meta device (no memory, no I/O)."""
    if card.arch in DIFFUSERS_ARCHS:
        return None  # an imported diffusers UNet or DiT is rebuilt from its own config, not from the card
    with torch.device("meta"):
        return count_parameters(build_from_card(card))


def _provenance(
    spec: DistillSpec, teacher: ModelCard, card: ModelCard, chain: int, pool: int, objective: ObjectiveMode
) -> dict[str, Any]:
    """The student card's ``info``: written here and nowhere else (run metrics are added at the end)."""
    info: dict[str, Any] = {"kind": "student", "method": spec.method, "engine": spec.engine, "teacher": spec.teacher}
    info["parameters"] = _parameters(card)
    teacher_parameters = _parameters(teacher)
    if teacher_parameters is not None:
        info["teacher_parameters"] = teacher_parameters
    if spec.method in (*POOL_METHODS, "boot"):
        info["chain_steps"] = chain
    if pool:
        info["pool_size"] = pool
    if spec.method in POOL_METHODS:
        info["objective"] = objective
    if card.classes is not None:
        info["classes"] = _resolve_classes(spec, teacher) | {"num": card.classes.num}
        if "class_names" in teacher.info:  # e.g. a DiTPipeline's id2label: what the labels mean
            info["classes"]["names"] = teacher.info["class_names"]
    return info


def make_plan(spec: DistillSpec, teacher_card: ModelCard, teacher_dir: str | None = None) -> JobPlan:
    """The plan of ``spec`` with the teacher ``teacher_card`` (read from ``teacher_dir``, default ``spec.teacher``).

    Raises :class:`PlanError` naming the field when the teacher cannot run the job.
    """
    _check_teacher(spec, teacher_card)
    t = teacher_card.diffusion.num_timesteps
    # Baselines train on the teacher's full diffusion; pool methods and BOOT walk the respaced chain.
    respacing = spec.pool.chain_steps if spec.method in (*POOL_METHODS, "boot") else None
    chain = respacing or t
    b = spec.optim.batch_size
    ranks = spec.ray.students if spec.engine == "ray" else 1
    total = pool_size(spec.pool.strategy, b, chain, spec.pool.rho) if spec.method in POOL_METHODS else 0
    shards = spec.ray.shards if spec.engine == "ray" else 1
    sizes = shard_sizes(total, shards) if total else []
    if sizes and min(sizes) < b // ranks:
        raise PlanError(
            "ray.shards",
            f"ray.shards={shards} splits the pool of {total} into shards smaller than one rank's batch "
            f"({b // ranks}); use fewer shards",
        )
    objective = resolve_objective(spec.objective, teacher_card.learn_sigma) if spec.method in POOL_METHODS else "simple"
    resolved = _resolve_classes(spec, teacher_card)
    card = student_card(spec, teacher_card)
    if card.classes is not None:
        # The student samples as the pool moved (the job's w); it keeps a null class only if it learns one.
        null = resolved["null_fraction"] > 0
        scale = resolved["guidance_scale"] if null else 1.0
        card.classes = ClassCard(num=card.classes.num, null=null, guidance_scale=scale)
    card.info = _provenance(spec, teacher_card, card, chain, total, objective)
    return JobPlan(
        spec=spec,
        teacher_dir=str(teacher_dir if teacher_dir is not None else spec.teacher),
        teacher_card=teacher_card,
        student_card=card,
        respacing=respacing,
        chain_length=chain,
        pool_size=total,
        shard_sizes=tuple(sizes),
        rank_batch=b // ranks,
        objective=objective,
        **resolved,
    )
