"""``dkdm distill --engine local`` (DKDM, O2MKD, BOOT, baselines), ``teacher train``, ``autoencoder train``."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from dkdm_core.checkpoint import ModelCard, load_model
from dkdm_core.data import DatasetName, load_dataset, mix_real
from dkdm_core.diffusion import GaussianDiffusion
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
from dkdm_core.objective import resolve_objective
from dkdm_core.pool import NoisePool, pool_size
from dkdm_core.runtime import Runtime, pick_device, pool_generator, resolve_runtime
from dkdm_core.sampling import generate, sampling_diffusion
from dkdm_core.spec import POOL_METHODS, DistillSpec, TeacherTrainSpec
from dkdm_core.students import build_student
from dkdm_core.training import DataTrainer, Distiller
from services.evaluation import digits_evaluator, resolve_path
from services.runner import RunResult, check_resumable, run_training

log = logging.getLogger(__name__)


def job_runtime(spec: DistillSpec | TeacherTrainSpec) -> Runtime:
    """The spec's runtime resolved for this machine, with its process-wide settings applied."""
    runtime = resolve_runtime(spec.runtime.device, spec.runtime.precision, spec.runtime.compile)
    runtime.apply_global()
    return runtime


def train_teacher(spec: TeacherTrainSpec, progress: bool = True) -> RunResult:
    """Data-based training of a teacher with L_hybrid (Eq. 13)."""
    if spec.run.threads:
        torch.set_num_threads(spec.run.threads)
    check_resumable(Path(spec.out), spec.model_dump())
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
    model = build_model(m.arch, m.channels, m.image_size, m.learn_sigma)
    diffusion = spec.diffusion.build(m.learn_sigma)
    trainer = DataTrainer(model, diffusion, data, spec.optim, gen, spec.vlb_weight, device, runtime)
    card = ModelCard(
        arch=m.arch,
        channels=m.channels,
        image_size=m.image_size,
        learn_sigma=m.learn_sigma,
        diffusion=spec.diffusion,
        data=spec.data,
        autoencoder=autoencoder,
        info={"kind": "teacher", "parameters": count_parameters(model), "objective": "hybrid"},
    )
    return run_training(
        trainer, card, spec.model_dump(), Path(spec.out), spec.steps, spec.run, spec.seed, progress=progress
    )


def teacher_chain(spec: DistillSpec, teacher_card: ModelCard) -> GaussianDiffusion:
    """The chain the teacher steps along: its T steps, respaced to ``pool.chain_steps`` when set."""
    diff = teacher_card.diffusion
    chain_steps = spec.pool.chain_steps
    if chain_steps is not None and chain_steps > diff.num_timesteps:
        raise ValueError(f"pool.chain_steps={chain_steps} exceeds the teacher's T={diff.num_timesteps}")
    return diff.build(teacher_card.learn_sigma, respacing=chain_steps)


def build_distiller(
    spec: DistillSpec, device: torch.device | None = None
) -> tuple[Distiller, ModelCard, dict[str, float]]:
    """Teacher, student, chain and pool for a DKDM job, before the pool is initialised."""
    runtime = job_runtime(spec)
    if device is not None:
        runtime = replace(runtime, device=torch.device(device))
    device = runtime.device
    teacher, teacher_card = load_model(resolve_path(spec.teacher), device)
    objective = resolve_objective(spec.objective, teacher_card.learn_sigma)
    torch.manual_seed(spec.seed)
    student, card = build_student(spec, teacher_card)
    chain = teacher_chain(spec, teacher_card)
    b = spec.optim.batch_size
    size = pool_size(spec.pool.strategy, b, chain.num_timesteps, spec.pool.rho)
    pool_bytes = size * math.prod(teacher_card.sample_shape) * 4
    pool = NoisePool(
        spec.pool.strategy,
        size,
        teacher_card.sample_shape,
        chain.num_timesteps,
        pool_generator(runtime, spec.seed, pool_bytes),
    )
    distiller = Distiller(
        student,
        teacher,
        chain,
        pool,
        spec.optim,
        teacher_generator=runtime.generator(spec.seed + 1),
        vlb_weight=spec.vlb_weight,
        mode=objective,
        device=device,
        runtime=runtime,
    )
    card.info = {
        "kind": "student",
        "method": spec.method,
        "teacher": str(spec.teacher),
        "parameters": count_parameters(student),
        "teacher_parameters": count_parameters(teacher),
        "chain_steps": chain.num_timesteps,
        "pool_size": size,
        "objective": objective,
    }
    stats = {"pool_size": float(size), "chain_steps": float(chain.num_timesteps)}
    return distiller, card, stats


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


def train_baseline(spec: DistillSpec, progress: bool = True) -> RunResult:
    """The paper's dataset baselines: a student trained with L_hybrid on real, synthetic or mixed data."""
    out = Path(spec.out)
    check_resumable(out, spec.model_dump())
    runtime = job_runtime(spec)
    device = runtime.device
    teacher, teacher_card = load_model(resolve_path(spec.teacher), device)
    gen = torch.Generator().manual_seed(spec.seed)
    stats: dict[str, float] = {"teacher_calls": 0.0}
    if spec.method == "data-based":
        if teacher_card.data is None:
            raise ValueError("method data-based needs the teacher's dataset, and this teacher names none")
        data = load_dataset(teacher_card.data, gen)
        if teacher_card.autoencoder is not None:
            data = encode(load_autoencoder(teacher_card.autoencoder), data)
    else:
        data = teacher_dataset(spec, teacher, teacher_card, device)
        stats["teacher_calls"] = float(data.shape[0] * spec.baseline.synthetic_steps)
        if spec.method == "data-limited":
            real = load_dataset(teacher_card.data or "digits", gen)
            if teacher_card.autoencoder is not None:
                real = encode(load_autoencoder(teacher_card.autoencoder), real)
            data = mix_real(data, real, spec.baseline.real_fraction, gen)
            stats["real_fraction"] = spec.baseline.real_fraction
    stats["dataset_size"] = float(data.shape[0])
    torch.manual_seed(spec.seed)
    student, card = build_student(spec, teacher_card)
    diffusion = card.diffusion.build(card.learn_sigma)  # the student's parameterisation (ε)
    trainer = DataTrainer(student, diffusion, data, spec.optim, gen, spec.vlb_weight, device, runtime)
    card.info = {"kind": "student", "method": spec.method, "teacher": str(spec.teacher), **stats}
    card.info["parameters"] = count_parameters(student)
    return run_training(
        trainer, card, spec.model_dump(), out, spec.steps, spec.run, spec.seed, extra_metrics=stats, progress=progress
    )


def train_boot(spec: DistillSpec, progress: bool = True) -> RunResult:
    """BOOT: a one-step student bootstrapped along the teacher's chain (``pool.chain_steps`` long)."""
    out = Path(spec.out)
    check_resumable(out, spec.model_dump())
    device = job_runtime(spec).device
    teacher, teacher_card = load_model(resolve_path(spec.teacher), device)
    chain = teacher_chain(spec, teacher_card)
    torch.manual_seed(spec.seed)
    student, card = build_student(spec, teacher_card)
    trainer = BootDistiller(
        student,
        teacher,
        chain,
        teacher_card.sample_shape,
        spec.optim,
        torch.Generator().manual_seed(spec.seed),
        spec.boot.boundary_fraction,
        spec.boot.boundary_weight,
        device,
    )
    card.info = {
        "kind": "student",
        "method": "boot",
        "teacher": str(spec.teacher),
        "parameters": count_parameters(student),
        "teacher_parameters": count_parameters(teacher),
        "chain_steps": chain.num_timesteps,
    }
    stats = {"chain_steps": float(chain.num_timesteps)}

    def extra() -> dict[str, float]:
        return {"teacher_calls": float(trainer.teacher_calls)}

    return run_training(
        trainer,
        card,
        spec.model_dump(),
        out,
        spec.steps,
        spec.run,
        spec.seed,
        extra_log=extra,
        extra_metrics=stats,
        progress=progress,
    )


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
    """Dynamic iterative distillation (Algorithm 1; one student or O2MKD's N) in this process, BOOT, or a baseline."""
    if spec.run.threads:
        torch.set_num_threads(spec.run.threads)
    if spec.method == "boot":
        return train_boot(spec, progress)
    if spec.method not in POOL_METHODS:
        return train_baseline(spec, progress)
    out = Path(spec.out)
    check_resumable(out, spec.model_dump())  # before the costly pool initialisation
    distiller, card, stats = build_distiller(spec)
    fresh = not (out / "checkpoints").is_dir()
    if fresh:
        start = time.perf_counter()
        evaluations = distiller.init_pool(spec.teacher_batch_size, spec.pool.init, spec.pool.per_trajectory)
        stats["pool_init_seconds"] = time.perf_counter() - start
        stats["pool_init_teacher_evaluations"] = float(evaluations)
        log.info("pool of %d initialised with %d teacher evaluations", distiller.pool.size, evaluations)

    def extra() -> dict[str, float]:
        return {"teacher_calls": float(distiller.teacher_calls), "pool_finished": float(distiller.pool.finished)}

    return run_training(
        distiller,
        card,
        spec.model_dump(),
        out,
        spec.steps,
        spec.run,
        spec.seed,
        extra_log=extra,
        extra_metrics=stats,
        progress=progress,
    )
