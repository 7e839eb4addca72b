"""Typed, validated descriptions of jobs: one schema for the CLI, the REST API and ``ray job submit``.

Defaults live here and nowhere else; each field says why it has the default it has.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from dkdm_core.data import DatasetName
from dkdm_core.diffusion import (
    LEARNED_VARIANCES,
    GaussianDiffusion,
    PredictionType,
    Sampler,
    Schedule,
    Thresholding,
    VarianceType,
    make_diffusion,
)
from dkdm_core.models import MODELS, VECTOR_MODELS
from dkdm_core.objective import ObjectiveChoice
from dkdm_core.pool import PoolInit, Strategy
from dkdm_core.runtime import check_device

Engine = Literal["local", "ray"]
# dkdm: the paper's method. o2mkd: DKDM into N students that each own an interval of timesteps.
# boot: a one-step student trained by bootstrapping (BOOT). The rest are DKDM's Table 2 baselines,
# students trained with L_hybrid on a dataset: the real digits (data-based), a set the teacher
# generates (data-free, Fig. 2b), or that set with a share of real digits mixed in (data-limited).
Method = Literal["dkdm", "o2mkd", "boot", "data-based", "data-free", "data-limited"]
# Methods that learn from the knowledge pool, and so run on the distributed engine too.
POOL_METHODS = ("dkdm", "o2mkd")


def _known_arch(arch: str) -> str:
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r}; choose one of {', '.join(sorted(MODELS))}")
    return arch


ArchName = Annotated[str, AfterValidator(_known_arch)]

MAX_PATH_CHARS = 4096  # PATH_MAX on Linux


def _path_like(value: str) -> str:
    # A NUL byte or a newline in a path is never meant, and the OS refuses NUL with an exception far
    # from the input (a 500 in the API); say so here, where the field's name is known.
    if not value:
        raise ValueError("must not be empty")
    if len(value) > MAX_PATH_CHARS:
        raise ValueError(f"must be at most {MAX_PATH_CHARS} characters")
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"must not contain control characters (found {bad!r})")
    return value


# A file or folder name given by the user (teacher, out, ...): printable, non-empty, of sane length.
PathStr = Annotated[str, AfterValidator(_path_like)]


class _Strict(BaseModel):
    # Unknown keys are errors: a typo in a config must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """An architecture from the registry and the data it models."""

    arch: ArchName = "unet-small"
    channels: int = Field(1, ge=1, le=64)  # 1 for the grey digits
    image_size: int = Field(8, ge=1, le=1024)  # digits are 8x8; ignored by vector models
    learn_sigma: bool = True  # learned-range variance (Eq. 12), needed for the L_vlb terms

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.arch in VECTOR_MODELS:
            return (self.channels,)
        return (self.channels, self.image_size, self.image_size)


class StudentSpec(_Strict):
    """The student's architecture; its data shape and variance type come from the teacher."""

    arch: ArchName = "unet-tiny"  # ~4x fewer parameters than the bundled unet-small teacher


class DiffusionSpec(_Strict):
    """A model's diffusion: any diffusers DDPM/DDIM scheduler config (defaults: improved-diffusion's)."""

    schedule: Schedule = "cosine"  # improved-diffusion's choice for small images
    num_timesteps: int = Field(1000, ge=2, le=10000)  # the paper's T
    # linear / scaled_linear end points; None: Ho et al.'s 1e-4 .. 0.02 at T = 1000, scaled by 1000 / T.
    beta_start: float | None = Field(None, gt=0, lt=1)
    beta_end: float | None = Field(None, gt=0, le=1)
    trained_betas: list[float] | None = None  # schedule "trained": β_1..β_T, as diffusers' trained_betas
    # None: learned_range when the model learns its variance (learn_sigma), else fixed_small: what
    # every model made before this field existed used. fixed_large is the original DDPM checkpoints'.
    variance_type: VarianceType | None = None
    prediction_type: PredictionType = "epsilon"  # what the network outputs: ε, v or x_0 ("sample")
    clip_sample: bool = True  # clip x̂_0 to ±clip_sample_range before the posterior mean (diffusers' default)
    clip_sample_range: float = Field(1.0, gt=0)
    # Imagen's dynamic thresholding of x̂_0 (wins over clip_sample, as in diffusers); off by default.
    thresholding: bool = False
    dynamic_thresholding_ratio: float = Field(0.995, gt=0, le=1)
    sample_max_value: float = Field(1.0, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> DiffusionSpec:
        if (self.schedule == "trained") != (self.trained_betas is not None):
            raise ValueError("trained_betas goes with schedule 'trained', and schedule 'trained' needs it")
        if self.trained_betas is not None:
            if len(self.trained_betas) != self.num_timesteps:
                raise ValueError(f"trained_betas has {len(self.trained_betas)} values for {self.num_timesteps} steps")
            if not all(0 < b <= 1 for b in self.trained_betas):
                raise ValueError("trained_betas must lie in (0, 1]")
        if (self.beta_start is not None or self.beta_end is not None) and self.schedule not in (
            "linear",
            "scaled_linear",
        ):
            raise ValueError(f"beta_start/beta_end apply to linear schedules, not {self.schedule!r}")
        return self

    def resolved_variance(self, learn_sigma: bool) -> VarianceType:
        return self.variance_type or ("learned_range" if learn_sigma else "fixed_small")

    def check_variance(self, learn_sigma: bool) -> None:
        """A learned variance needs a network with 2C outputs; a fixed one, C."""
        if self.variance_type is not None and (self.variance_type in LEARNED_VARIANCES) != learn_sigma:
            raise ValueError(
                f"variance_type {self.variance_type!r} needs learn_sigma: {not learn_sigma} "
                f"(the network {'must' if learn_sigma is False else 'must not'} output a variance)"
            )

    def build(self, learn_sigma: bool, respacing: str | int | list[int] | None = None) -> GaussianDiffusion:
        """The diffusion this spec describes, optionally respaced (``make_diffusion``'s ``respacing``)."""
        self.check_variance(learn_sigma)
        thresholding = (
            Thresholding(self.dynamic_thresholding_ratio, self.sample_max_value) if self.thresholding else None
        )
        return make_diffusion(
            self.schedule,
            self.num_timesteps,
            learn_sigma,
            respacing,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            trained_betas=self.trained_betas,
            variance_type=self.resolved_variance(learn_sigma),
            prediction_type=self.prediction_type,
            clip_sample_range=self.clip_sample_range if self.clip_sample else None,
            thresholding=thresholding,
        )

    def for_student(self, learn_sigma: bool) -> DiffusionSpec:
        """The diffusion of a student of a model with this one: ε-prediction, learned-range variance if
        the teacher learns its variance, else the teacher's fixed variance (``GaussianDiffusion.eps_view``)."""
        variance = "learned_range" if learn_sigma else self.resolved_variance(False)
        keep_none = self.variance_type is None  # cards that never named a variance type keep not naming it
        return self.model_copy(update={"prediction_type": "epsilon", "variance_type": None if keep_none else variance})


class OptimSpec(_Strict):
    lr: float = Field(5e-4, gt=0, le=1.0)  # AdamW; small models on 8x8 tolerate a high rate
    batch_size: int = Field(128, ge=1, le=65536)  # the paper's b
    # Samples are drawn from the EMA weights. The EMA is warmed up (update n uses
    # min(ema_decay, (1 + n) / (10 + n)), as diffusers' EMAModel), so short runs sample trained weights.
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, gt=0)  # clip the global grad norm; the vlb term spikes early on
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(200, ge=0)  # linear lr warm-up


class RunSpec(_Strict):
    """How often a training run logs, checkpoints, draws a sample grid and evaluates."""

    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    sample_every: int = Field(1000, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: evaluate only at the end
    eval_samples: int = Field(1000, ge=16)  # generated images per Fréchet distance
    # Samples per side of the teacher-feature FD (student vs teacher in the teacher's own features);
    # the teacher's two calibration sets are drawn once and cached under OUT/quality. 0: skip it.
    quality_samples: int = Field(256, ge=0)
    # The same figure of the EMA student every N steps while training (0: only at the end), logged
    # as {"step", "quality"} in OUT/log.jsonl and published as the job's metric, so the dashboard
    # shows it over steps. Each costs quality_samples student samples (the teacher's are cached).
    quality_every: int = Field(0, ge=0)
    sample_steps: int = Field(50, ge=1, le=10000)  # the paper's 50 IDDPM steps in pixel space
    sampler: Sampler = "iddpm"
    threads: int = Field(0, ge=0)  # torch CPU threads; 0 leaves torch's default


class PoolSpec(_Strict):
    strategy: Strategy = "dynamic"  # the paper's best variant (Fig. 4a)
    rho: float = Field(0.4, gt=0, le=10)  # |B+| = ρ·T·b; the paper uses 0.4
    # The chain the teacher advances the pool along: None is the teacher's full T steps, K a respaced
    # K-step chain. Shuffle denoise costs ~ρ·K²·b/2 teacher evaluations, so the full chain (K = T =
    # 1000) takes hours on a CPU; a 100-step chain keeps the demo to minutes.
    chain_steps: int | None = Field(100, ge=2)
    # Initialisation: "shuffle" is the paper's shuffle denoise (~T/2 teacher evaluations per sample);
    # "trajectory" fills `per_trajectory` slots from each teacher trajectory (~T/per_trajectory each).
    init: PoolInit = "shuffle"
    per_trajectory: int = Field(8, ge=1)


class RuntimeSpec(_Strict):
    """Where and how the networks run (``dkdm_core.runtime`` resolves ``auto`` for the device in use)."""

    device: Annotated[str, AfterValidator(check_device)] = "auto"  # auto | cpu | cuda | cuda:N
    # auto: fp32 on a CPU (bit-exact runs), bf16 on a GPU that has it (student autocast, fp32
    # master weights; teacher held in bf16), else tf32.
    precision: Literal["auto", "fp32", "tf32", "bf16"] = "auto"
    # auto: off on a CPU, cudagraphs on a GPU (a step's shapes are static; small models are launch-bound).
    # step: the local engine records each whole step as one CUDA graph (see dkdm_core.runtime).
    compile: Literal["auto", "off", "default", "cudagraphs", "step"] = "auto"


class RayEngineSpec(_Strict):
    """How the distributed engine lays a job out on a Ray cluster (ignored by the local engine)."""

    shards: int = Field(1, ge=1, le=1024)  # PoolShard actors, each owning a slice of the pool
    teacher_replicas: int = Field(1, ge=1, le=1024)  # TeacherReplica actors advancing the pool
    teacher_cpus: float = Field(1.0, ge=0)  # per replica; fractions pack several replicas on one core
    # Per replica; fractions share one GPU between replicas. A replica's teacher runs on one device,
    # so more than 1 would hold GPUs it never uses.
    teacher_gpus: float = Field(0.0, ge=0, le=1)
    students: int = Field(1, ge=1, le=1024)  # Ray Train workers (DDP ranks); each trains on b/m samples
    student_cpus: float = Field(1.0, gt=0)
    student_gpus: float = Field(0.0, ge=0, le=1)  # per rank, as teacher_gpus (1: DDP over NCCL)
    queue_size: int = Field(4, ge=1, le=4096)  # knowledge batches buffered per rank: bounds memory and lag
    # The dtype x_t and the teacher's output travel in from replica to rank (t and labels stay integers;
    # x_{t-1} goes back to its shard in fp32 whatever this says). bf16 halves the bytes through the host
    # and the object store, at bf16's rounding of the student's inputs and targets; fp32 keeps the
    # engine bit-exact with the local one.
    ship_dtype: Literal["fp32", "bf16"] = "fp32"
    lease_timeout_s: float = Field(60.0, gt=0)  # a lease not returned by then (dead replica) is re-issued
    max_replica_restarts: int = Field(3, ge=0)  # dead replicas replaced before the job fails
    max_student_failures: int = Field(3, ge=0)  # Ray Train worker-group restarts from the last checkpoint
    starve_timeout_s: float = Field(600.0, gt=0)  # a rank with no knowledge for this long fails the job


class O2MKDSpec(_Strict):
    """method o2mkd: N students, each owning a contiguous interval of the teacher's timesteps."""

    students: int = Field(2, ge=1, le=64)  # N; the paper's default is a handful
    # The N-1 interior cut points in the teacher's timesteps (0 < b_1 < ... < T); None: equal widths.
    boundaries: list[int] | None = None
    archs: list[ArchName] | None = None  # one architecture per student; None: student.arch for all

    @model_validator(mode="after")
    def _consistent(self) -> O2MKDSpec:
        if self.archs is not None and len(self.archs) != self.students:
            raise ValueError(f"o2mkd.archs names {len(self.archs)} architectures for {self.students} students")
        if self.boundaries is not None:
            if len(self.boundaries) != self.students - 1:
                raise ValueError(f"o2mkd.boundaries needs {self.students - 1} cut points for {self.students} students")
            edges = [0, *self.boundaries]
            if any(a >= b for a, b in itertools.pairwise(edges)):
                raise ValueError("o2mkd.boundaries must be positive and strictly increasing")
        return self


class BootSpec(_Strict):
    """method boot: a one-step student g(ε, t) bootstrapped along the teacher's DDIM trajectory.

    The student walks the chain ``pool.chain_steps`` long: each bootstrap pair is two consecutive
    steps of it, so a shorter chain means fewer bootstrap hops from noise to image.
    """

    boundary_fraction: float = Field(0.125, gt=0, lt=1)  # share of each batch spent on the boundary loss
    boundary_weight: float = Field(1.0, ge=0)


class BaselineSpec(_Strict):
    """Settings of the dataset baselines (method data-free / data-limited)."""

    real_fraction: float = Field(0.2, ge=0, le=1)  # data-limited: share of the set that is real data
    synthetic_size: int | None = Field(None, ge=1)  # None: as many as the real set (1797 digits)
    synthetic_steps: int = Field(100, ge=1)  # IDDPM steps the teacher samples the set with
    # A .npy file to keep the teacher's set in: loaded if present, written otherwise, so several
    # baselines share one set (and its teacher cost) instead of generating their own.
    synthetic_path: PathStr | None = None


class TeacherClassesSpec(_Strict):
    """A class-conditional teacher: trained on the dataset's labels, with label dropout for guidance."""

    # Share of training labels replaced by the null class: the one network learns ε_u too, so
    # classifier-free guidance works (Ho & Salimans use 0.1-0.2). 0: no null class, no guidance.
    label_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # The scale written to the card: what samples (and distillation's pool) use unless told otherwise.
    guidance_scale: float = Field(1.0, ge=0.0, le=100.0)


class ClassesSpec(_Strict):
    """Class-conditional distillation; with an unconditional teacher every field must stay unset.

    The class count comes from the teacher's card (``classes.num``), never from here.
    """

    # w of the guided teacher steps that move the pool (ε_u + w(ε_c − ε_u)); None: the teacher card's.
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0)
    # The classes pool samples are drawn from, uniformly; None: all of the teacher's classes.
    labels: list[int] | None = Field(None, min_length=1)
    # Share of each batch the student learns under the null label (target: the teacher's ε_u), so the
    # student keeps the null class and can itself be guided; None: 0.1 when the teacher has one.
    null_fraction: float | None = Field(None, ge=0.0, lt=1.0)

    @property
    def is_default(self) -> bool:
        return self.guidance_scale is None and self.labels is None and self.null_fraction is None


class TeacherTrainSpec(_Strict):
    """Data-based training with L_hybrid (Eq. 13): how the bundled teacher is made."""

    data: DatasetName = "digits"
    # A diffusers AutoencoderKL folder: train a latent teacher on the encoded data (model.channels and
    # model.image_size must then be the latent's); samples are decoded with it. None: pixel space.
    autoencoder: PathStr | None = None
    model: ModelSpec = ModelSpec()
    diffusion: DiffusionSpec = DiffusionSpec()
    # Set: a class-conditional teacher on the dataset's labels (digits: 10 classes). None: unconditional.
    classes: TeacherClassesSpec | None = None
    optim: OptimSpec = OptimSpec()
    vlb_weight: float = Field(0.001, ge=0)  # λ of Eq. (13), improved-diffusion's value
    steps: int = Field(10000, ge=1)
    seed: int = 0
    out: PathStr = "runs/teacher"
    run: RunSpec = RunSpec()
    runtime: RuntimeSpec = RuntimeSpec()

    @model_validator(mode="after")
    def _variance_fits_the_model(self) -> TeacherTrainSpec:
        self.diffusion.check_variance(self.model.learn_sigma)  # before training, not when the card is saved
        c = self.classes
        if c is not None and c.guidance_scale != 1.0 and c.label_dropout == 0:
            raise ValueError("classes.guidance_scale other than 1 needs classes.label_dropout > 0 (a null class)")
        return self


class DistillSpec(_Strict):
    """A distillation job (the JobSpec): teacher, student, method, pool, optimiser, budget."""

    teacher: PathStr = "assets/teachers/digits"  # a dkdm model dir or a diffusers DDPMPipeline dir
    student: StudentSpec = StudentSpec()
    method: Method = "dkdm"
    # auto: L*_DKDM for learned-variance teachers, L*_simple otherwise (resolve_objective); "simple"
    # forces the MSE term alone (the paper's latent-space setting). The choice lands in the card's info.
    objective: ObjectiveChoice = "auto"
    vlb_weight: float = Field(0.001, ge=0)  # λ of Eq. (19)
    pool: PoolSpec = PoolSpec()
    classes: ClassesSpec = ClassesSpec()  # class-conditional teachers only: guidance and labels
    o2mkd: O2MKDSpec = O2MKDSpec()
    boot: BootSpec = BootSpec()
    baseline: BaselineSpec = BaselineSpec()
    optim: OptimSpec = OptimSpec()
    teacher_batch_size: int = Field(512, ge=1)  # chunk size of shuffle denoise's teacher calls
    steps: int = Field(2000, ge=1)  # student optimiser steps
    seed: int = 0
    engine: Engine = "local"
    ray: RayEngineSpec = RayEngineSpec()
    out: PathStr = "runs/digits-dkdm"
    run: RunSpec = RunSpec()
    runtime: RuntimeSpec = RuntimeSpec()

    @model_validator(mode="after")
    def _fits_the_engine(self) -> DistillSpec:
        if self.engine == "ray" and self.method not in POOL_METHODS:
            raise ValueError(
                f"method {self.method!r} does not learn from the knowledge pool: it runs on engine 'local'"
            )
        if self.engine == "ray" and self.optim.batch_size % self.ray.students:
            raise ValueError(
                f"optim.batch_size ({self.optim.batch_size}) must be a multiple of ray.students "
                f"({self.ray.students}): each rank trains on b/m samples of the global batch b"
            )
        return self


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with a one-line error for the usual mistakes."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{p} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{p} must hold a mapping of settings, not a {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Override ``a.b.c`` in a nested mapping (CLI ``--set a.b.c=value``)."""
    *parents, leaf = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted}: {key} is not a section")
    node[leaf] = value
