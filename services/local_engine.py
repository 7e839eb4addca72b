"""``dkdm distill --engine local`` (DKDM, O2MKD, BOOT, baselines), ``teacher train``, ``autoencoder train``."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dkdm_core.checkpoint import ClassCard, ModelCard, list_checkpoints, load_model
from dkdm_core.data import DatasetName, dataset_labels, load_dataset, mix_real
from dkdm_core.latent import (
    build_autoencoder,
    decode,
    encode,
    load_autoencoder,
    save_autoencoder,
    train_autoencoder,
)
from dkdm_core.methods.boot import BootDistiller
from dkdm_core.models import build_model, count_parameters
from dkdm_core.plan import JobPlan, make_plan
from dkdm_core.pool import NoisePool
from dkdm_core.runtime import Runtime, pick_device, pool_generator, resolve_runtime
from dkdm_core.sampling import generate, sampling_diffusion
from dkdm_core.spec import POOL_METHODS, DistillSpec, TeacherTrainSpec
from dkdm_core.students import init_student
from dkdm_core.training import DataTrainer, Distiller
from services.evaluation import digits_evaluator, resolve_path
from services.runner import ResumePoint, RunResult, SteppingTrainer, decide_resume, run_training

log = logging.getLogger(__name__)


def job_runtime(spec: DistillSpec | TeacherTrainSpec) -> Runtime:
    """The spec's runtime resolved for this machine, with its process-wide settings applied."""
    runtime = resolve_runtime(spec.runtime.device, spec.runtime.precision, spec.runtime.compile)
    runtime.apply_global()
    return runtime


def local_resume(spec: DistillSpec | TeacherTrainSpec) -> ResumePoint | None:
    """Fresh or resumed, decided once from OUT/checkpoints' complete checkpoints, before any set-up."""
    out = Path(spec.out)
    return decide_resume(out, spec.model_dump(), list_checkpoints(out / "checkpoints"))


def train_teacher(spec: TeacherTrainSpec, progress: bool = True) -> RunResult:
    """Data-based training of a teacher with L_hybrid (Eq. 13)."""
    if spec.run.threads:
        torch.set_num_threads(spec.run.threads)
    resume = local_resume(spec)
    torch.manual_seed(spec.seed)
    runtime = job_runtime(spec)
    device = runtime.device
    gen = torch.Generator().manual_seed(spec.seed)
    data = load_dataset(spec.data, gen)
    autoencoder = None
    if spec.autoencoder is not None:
        autoencoder = str(resolve_path(spec.autoencoder).resolve())
        data = encode(load_autoencoder(autoencoder), data)  # the latent teacher's training set
    if tuple(data.shape[1:]) != spec.model.sample_shape:
        what = f"{spec.data} encoded by {spec.autoencoder}" if autoencoder else spec.data
        raise ValueError(
            f"model.channels/image_size give samples of shape {spec.model.sample_shape}, "
            f"but {what} has {tuple(data.shape[1:])}"
        )
    m = spec.model
    labels, classes = teacher_classes(spec)
    model = build_model(m.arch, m.channels, m.image_size, m.learn_sigma, classes.embeds if classes else 0)
    diffusion = spec.diffusion.build(m.learn_sigma)
    dropout = spec.classes.label_dropout if spec.classes else 0.0
    null = classes.null_label if classes else None
    trainer = DataTrainer(
        model, diffusion, data, spec.optim, gen, spec.vlb_weight, device, runtime, labels, dropout, null
    )
    card = ModelCard(
        arch=m.arch,
        channels=m.channels,
        image_size=m.image_size,
        learn_sigma=m.learn_sigma,
        diffusion=spec.diffusion,
        data=spec.data,
        autoencoder=autoencoder,
        classes=classes,
        info={"kind": "teacher", "parameters": count_parameters(model), "objective": "hybrid"},
    )
    if spec.classes is not None:
        card.info["label_dropout"] = spec.classes.label_dropout
    out = Path(spec.out)
    return run_training(
        trainer, card, spec.model_dump(), out, spec.steps, spec.run, spec.seed, resume, progress=progress
    )


def teacher_classes(spec: TeacherTrainSpec) -> tuple[torch.Tensor | None, ClassCard | None]:
    """A class-conditional teacher's training labels (N,) and card section; (None, None) if unconditional."""
    if spec.classes is None:
        return None, None
    labels = dataset_labels(spec.data)
    card = ClassCard(
        num=int(labels.max()) + 1, null=spec.classes.label_dropout > 0, guidance_scale=spec.classes.guidance_scale
    )
    return labels, card


def load_teacher(spec: DistillSpec, device: torch.device) -> tuple[nn.Module, JobPlan]:
    """The teacher and the job's plan: the teacher's card is read once, with its weights."""
    teacher_dir = resolve_path(spec.teacher).resolve()
    teacher, card = load_model(teacher_dir, device)
    return teacher, make_plan(spec, card, str(teacher_dir))


def make_distiller(plan: JobPlan, teacher: nn.Module, runtime: Runtime) -> Distiller:
    """Student, chain and pool of a pool-method job, before the pool is initialised."""
    spec = plan.spec
    pool_bytes = plan.pool_size * math.prod(plan.sample_shape) * 4
    pool_rng = pool_generator(runtime, plan.pool_seed(), pool_bytes)  # where the pool fits, it lives there
    pool = NoisePool(
        spec.pool.strategy, plan.pool_size, plan.sample_shape, plan.chain_length, pool_rng, classes=plan.pool_classes
    )
    teacher_rng = runtime.generator(plan.teacher_seed())
    student, chain = init_student(plan), plan.build_chain()
    return Distiller(
        student,
        teacher,
        chain,
        pool,
        spec.optim,
        teacher_rng,
        spec.vlb_weight,
        plan.objective,
        runtime=runtime,
        guidance=plan.guidance(),
    )


def build_distiller(spec: DistillSpec, device: torch.device | None = None) -> tuple[Distiller, JobPlan]:
    """A DKDM job's distiller and plan, before the pool is initialised (``device`` overrides the spec's)."""
    runtime = job_runtime(spec)
    if device is not None:
        runtime = replace(runtime, device=torch.device(device))
    teacher, plan = load_teacher(spec, runtime.device)
    return make_distiller(plan, teacher, runtime), plan


def train(
    trainer: SteppingTrainer,
    plan: JobPlan,
    resume: ResumePoint | None,
    progress: bool,
    stats: dict[str, float] | None = None,
    extra_log: Callable[[], dict[str, float]] | None = None,
) -> RunResult:
    """``run_training`` of a distillation job: the plan's student card (a copy: runs add metrics to it)."""
    spec, card = plan.spec, plan.student_card.model_copy(deep=True)
    out = Path(spec.out)
    return run_training(
        trainer, card, spec.model_dump(), out, spec.steps, spec.run, spec.seed, resume, extra_log, stats, progress
    )


def teacher_dataset(spec: DistillSpec, teacher: torch.nn.Module, card: ModelCard, device: torch.device) -> torch.Tensor:
    """The data-free baseline's set (Fig. 2b): samples of the teacher, cached at ``baseline.synthetic_path``."""
    b = spec.baseline
    size = b.synthetic_size or load_dataset(card.data or "digits").shape[0]
    path = Path(b.synthetic_path) if b.synthetic_path else None
    if path is not None and path.is_file():
        data = torch.from_numpy(np.load(path, allow_pickle=False))
        if tuple(data.shape) != (size, *card.sample_shape):
            raise ValueError(f"{path} holds a set of shape {tuple(data.shape)}, not {(size, *card.sample_shape)}")
        return data
    diffusion = sampling_diffusion(card.diffusion, card.learn_sigma, b.synthetic_steps, "iddpm")
    data = generate(
        teacher, diffusion, card.sample_shape, size, spec.seed + 1, "iddpm", spec.teacher_batch_size, device
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, data.numpy())
    return data


def real_data(card: ModelCard, gen: torch.Generator) -> torch.Tensor:
    """The teacher's dataset, encoded by its autoencoder for latent teachers."""
    data = load_dataset(card.data or "digits", gen)
    if card.autoencoder is not None:
        data = encode(load_autoencoder(card.autoencoder), data)
    return data


def baseline_data(
    plan: JobPlan, teacher: nn.Module, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, dict[str, float]]:
    """The set a dataset baseline trains on (real, teacher-made or mixed) and what it cost."""
    spec, card = plan.spec, plan.teacher_card
    stats: dict[str, float] = {"teacher_calls": 0.0}
    if spec.method == "data-based":
        data = real_data(card, gen)  # the plan checked that the teacher names its dataset
    else:
        data = teacher_dataset(spec, teacher, card, device)
        stats["teacher_calls"] = float(data.shape[0] * spec.baseline.synthetic_steps)
        if spec.method == "data-limited":
            data = mix_real(data, real_data(card, gen), spec.baseline.real_fraction, gen)
            stats["real_fraction"] = spec.baseline.real_fraction
    stats["dataset_size"] = float(data.shape[0])
    return data, stats


def train_baseline(
    plan: JobPlan, teacher: nn.Module, resume: ResumePoint | None, runtime: Runtime, progress: bool
) -> RunResult:
    """The paper's dataset baselines: a student trained with L_hybrid on real, synthetic or mixed data."""
    spec = plan.spec
    gen = torch.Generator().manual_seed(spec.seed)
    data, stats = baseline_data(plan, teacher, gen, runtime.device)
    student, diffusion = init_student(plan), plan.build_student_diffusion()  # ε, as the student card says
    trainer = DataTrainer(student, diffusion, data, spec.optim, gen, spec.vlb_weight, runtime.device, runtime)
    return train(trainer, plan, resume, progress, stats)


def train_boot(
    plan: JobPlan, teacher: nn.Module, resume: ResumePoint | None, runtime: Runtime, progress: bool
) -> RunResult:
    """BOOT: a one-step student bootstrapped along the teacher's chain (``pool.chain_steps`` long)."""
    spec, boot = plan.spec, plan.spec.boot
    student, chain = init_student(plan), plan.build_chain()
    noise = torch.Generator().manual_seed(spec.seed)  # BOOT's own noise draws (it keeps no pool)
    trainer = BootDistiller(
        student,
        teacher,
        chain,
        plan.sample_shape,
        spec.optim,
        noise,
        boot.boundary_fraction,
        boot.boundary_weight,
        runtime.device,
    )
    stats = {"chain_steps": float(plan.chain_length)}
    return train(trainer, plan, resume, progress, stats, lambda: {"teacher_calls": float(trainer.teacher_calls)})


def train_pool(
    plan: JobPlan, teacher: nn.Module, resume: ResumePoint | None, runtime: Runtime, progress: bool
) -> RunResult:
    """Dynamic iterative distillation (Algorithm 1; one student or O2MKD's N) in this process."""
    distiller = make_distiller(plan, teacher, runtime)
    stats = {"pool_size": float(plan.pool_size), "chain_steps": float(plan.chain_length)}
    if resume is None:  # a resumed run takes its pool from the checkpoint it resumes
        start = time.perf_counter()
        spec = plan.spec
        evaluations = distiller.init_pool(spec.teacher_batch_size, spec.pool.init, spec.pool.per_trajectory)
        stats["pool_init_seconds"] = time.perf_counter() - start
        stats["pool_init_teacher_evaluations"] = float(evaluations)
        log.info("pool of %d initialised with %d teacher evaluations", plan.pool_size, evaluations)

    def extra() -> dict[str, float]:
        return {"teacher_calls": float(distiller.teacher_calls), "pool_finished": float(distiller.pool.finished)}

    return train(distiller, plan, resume, progress, stats, extra)


def make_autoencoder(
    out: str | Path, steps: int = 3000, latent_channels: int = 3, seed: int = 0, data: DatasetName = "digits"
) -> dict[str, float]:
    """``dkdm autoencoder train``: a small AutoencoderKL on a bundled dataset, saved in diffusers format."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images = load_dataset(data, gen)
    if images.ndim != 4:
        raise ValueError(f"an autoencoder needs image data; {data} holds vectors")
    ae = build_autoencoder(images.shape[1], images.shape[2], latent_channels).to(pick_device("auto"))
    start = time.perf_counter()
    train_autoencoder(ae, images, steps, gen)
    path = save_autoencoder(ae.cpu(), out)
    latents = encode(ae, images)
    recon = decode(ae, latents)
    info = {
        "train_seconds": time.perf_counter() - start,
        "reconstruction_mse": float(((recon - images) ** 2).mean()),
        "scaling_factor": float(ae.config["scaling_factor"]),
        "latent_dims": float(latents[0].numel()),
    }
    if data == "digits":
        info["reconstruction_digits_fd"] = digits_evaluator().evaluate(recon)["digits_fd"]
    (path / "metrics.json").write_text(json.dumps(info, indent=2))
    return info


def distill_local(spec: DistillSpec, progress: bool = True) -> RunResult:
    """A distillation job in this process: DKDM/O2MKD (Algorithm 1), BOOT, or a dataset baseline."""
    if spec.run.threads:
        torch.set_num_threads(spec.run.threads)
    resume = local_resume(spec)  # before the teacher is loaded and the pool is touched
    runtime = job_runtime(spec)
    teacher, plan = load_teacher(spec, runtime.device)
    if spec.method == "boot":
        return train_boot(plan, teacher, resume, runtime, progress)
    if spec.method not in POOL_METHODS:
        return train_baseline(plan, teacher, resume, runtime, progress)
    return train_pool(plan, teacher, resume, runtime, progress)
