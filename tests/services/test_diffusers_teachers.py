"""Teachers saved by diffusers (random weights, tiny): distil, export, load back into diffusers, sample.

Each row of the README's table of teacher formats is one case here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    LDMPipeline,
)

from dkdm_core.checkpoint import load_model
from dkdm_core.diffusion import sample_loop, space_timesteps
from dkdm_core.sampling import draw
from tests.conftest import run_dkdm
from tests.latent_pipelines import IMAGE_SIZE, LATENT_SIZE, save_dit, save_ldm, tiny_unet

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# name -> (channels, image size, scheduler config): the shapes of real checkpoints, tiny networks.
TEACHERS: dict[str, tuple[int, int, dict[str, Any]]] = {
    # google/ddpm-cifar10-32's scheduler: linear β, fixed_large, ε, clipped.
    "ddpm-cifar10": (3, 32, {"beta_schedule": "linear", "variance_type": "fixed_large", "clip_sample": True}),
    # A v-prediction teacher with learned-range variance on the cosine schedule, T = 400.
    "v-learned-range": (
        1,
        16,
        {
            "num_train_timesteps": 400,
            "beta_schedule": "squaredcos_cap_v2",
            "variance_type": "learned_range",
            "prediction_type": "v_prediction",
        },
    ),
    # A DDIMPipeline folder (DDIMScheduler, google/ddpm-cifar10-32's β's, ε, clipped): the pool takes
    # the ancestral step with DDPM's default (fixed_small) variance, DDIM's η = 1.
    "ddim-cifar10": (3, 32, {"beta_schedule": "linear", "clip_sample": True}),
    # An x_0-predicting teacher, scaled-linear β's, σ² output (diffusers' "learned"), thresholded x̂_0.
    "sample-learned-threshold": (
        1,
        16,
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "variance_type": "learned",
            "prediction_type": "sample",
            "thresholding": True,
        },
    ),
}


DDIM_TEACHERS = frozenset({"ddim-cifar10"})  # saved as a DDIMPipeline with a DDIMScheduler


def save_teacher(root: Path, channels: int, size: int, scheduler: dict[str, Any], ddim: bool = False) -> Path:
    torch.manual_seed(0)
    learned = scheduler.get("variance_type", "").startswith("learned")
    unet = tiny_unet(size, channels, channels * (2 if learned else 1))
    if scheduler.get("variance_type") == "learned":
        # diffusers reads a "learned" output as σ² and takes its square root: keep it positive.
        with torch.no_grad():
            unet.conv_out.bias[channels:] = 0.5
            unet.conv_out.weight[channels:] = 0.0
    if ddim:
        pipeline: DiffusionPipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(**scheduler))
    else:
        pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler))
    pipeline.save_pretrained(str(root), safe_serialization=True)
    return root


@pytest.mark.parametrize("name", list(TEACHERS))
def test_diffusers_teacher_distils_exports_and_samples_in_diffusers(name: str, tmp_path: Path) -> None:
    channels, size, scheduler = TEACHERS[name]
    teacher = save_teacher(tmp_path / "teacher", channels, size, scheduler, ddim=name in DDIM_TEACHERS)
    out = tmp_path / "student"
    run_dkdm(
        "distill",
        "--steps",
        "4",
        "--out",
        str(out),
        "--quiet",
        "--set",
        f"teacher={teacher}",
        "--set",
        "student.arch=unet-tiny",
        "--set",
        "pool.chain_steps=10",
        "--set",
        "pool.rho=0.2",
        "--set",
        "optim.batch_size=8",
        "--set",
        "run.eval_samples=16",
        "--set",
        "run.quality_samples=16",
        "--set",
        "run.sample_steps=5",
    )
    metrics = json.loads((out / "metrics.json").read_text())  # a quality figure without any data
    assert np.isfinite(metrics["teacher_fd"]) and metrics["teacher_fd_floor"] < metrics["teacher_fd_ceiling"]
    card = json.loads((out / "config.json").read_text())
    variance = scheduler.get("variance_type", "fixed_small")  # a DDIMScheduler has none: DDPM's default
    learned = variance.startswith("learned")
    assert card["diffusion"]["prediction_type"] == "epsilon"
    assert card["info"]["objective"] == ("dkdm" if learned else "simple")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)

    run_dkdm("export", "--model", str(out), "--out", str(tmp_path / "exported"))
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "exported"), local_files_only=True)
    expected_variance = "learned_range" if learned else variance
    assert pipe.scheduler.config.variance_type == expected_variance
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.num_train_timesteps == scheduler.get("num_train_timesteps", 1000)
    images = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(3), output_type="np")
    images = images.images  # (B, H, W, C) in [0, 1]

    # The same images from our sampler: diffusers' 10 "leading" steps, its noise sequence.
    model, student_card = load_model(out)
    T = student_card.diffusion.num_timesteps
    diffusion = student_card.diffusion.build(student_card.learn_sigma, respacing=space_timesteps(T, "ddim10"))
    ours = sample_loop(diffusion, model, (2, channels, size, size), torch.Generator().manual_seed(3))
    ours_np = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours_np, images, atol=2e-4)


def test_unsupported_scheduler_keys_are_named(tmp_path: Path) -> None:
    teacher = save_teacher(tmp_path / "t", 1, 16, {"beta_schedule": "sigmoid"})
    proc = run_dkdm("distill", "--set", f"teacher={teacher}", "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("dkdm: error:") and "beta_schedule 'sigmoid' is not supported" in line, line


def test_label_embeddings_other_than_a_class_table_are_named(tmp_path: Path) -> None:
    """A UNet2DModel conditioned through ``class_embed_type`` (timestep, identity, projection embeddings)."""
    unet = tiny_unet(16, 1, class_embed_type="timestep")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "t"), safe_serialization=True)
    proc = run_dkdm("distill", "--set", f"teacher={tmp_path / 't'}", "--out", str(tmp_path / "o"), check=False)
    line = proc.stderr.strip()
    assert proc.returncode == 2 and line.startswith("dkdm: error:") and "\n" not in line, proc.stderr
    assert "class_embed_type 'timestep' is not supported" in line


# Latent pipelines: name -> (builder, latent channels, objective auto resolves to, sample args).
LATENT_TEACHERS: dict[str, tuple[Any, int, str, list[str]]] = {
    "ldm": (save_ldm, 3, "simple", []),  # VQModel + UNet2DModel + DDIM (fixed β̃ variance)
    "dit": (save_dit, 4, "dkdm", ["--class", "2"]),  # AutoencoderKL + DiT (learned Σ, 3 classes + null)
}


def distill_args(teacher: Path, out: Path) -> list[str]:
    sets = {
        "teacher": teacher,
        "student.arch": "unet-tiny",
        "pool.chain_steps": 10,
        "pool.rho": 0.2,
        "optim.batch_size": 8,
        "run.eval_samples": 16,
        "run.quality_samples": 16,
        "run.sample_steps": 3,
        "run.threads": 1,
    }
    args = ["distill", "--steps", "3", "--out", str(out), "--quiet"]
    return args + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.parametrize("name", list(LATENT_TEACHERS))
def test_latent_pipeline_teacher_distils_in_latent_space_and_samples_decoded_images(name: str, tmp_path: Path) -> None:
    build, channels, objective, sample_args = LATENT_TEACHERS[name]
    teacher = build(tmp_path / "teacher")
    out = tmp_path / "student"
    run_dkdm(*distill_args(teacher, out))
    card = json.loads((out / "config.json").read_text())
    # The student works in the teacher's latent space and carries a copy of its autoencoder.
    assert (card["channels"], card["image_size"], card["autoencoder"]) == (channels, LATENT_SIZE, "autoencoder")
    ae = "vqvae" if name == "ldm" else "vae"
    assert (out / "autoencoder" / "config.json").read_text() == (teacher / ae / "config.json").read_text()
    assert card["info"]["objective"] == objective
    if name == "dit":  # labels 0..2, a null class learned from the teacher's, DiTPipeline's w = 4
        assert card["classes"] == {"num": 3, "null": True, "guidance_scale": 4.0}
        assert card["info"]["classes"]["names"] == {"0": "cat", "1": "dog", "2": "fish"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["teacher_fd"])

    run_dkdm(
        "sample", "--model", str(out), "--num", "3", "--steps", "3", "--out", str(tmp_path / "s.npz"), *sample_args
    )
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (3, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8  # the pipeline's pixels

    run_dkdm("export", "--model", str(out), "--out", str(tmp_path / "exported"))
    if name == "ldm":  # a VQ-latent UNet student is an LDMPipeline again
        pipe = LDMPipeline.from_pretrained(str(tmp_path / "exported"), local_files_only=True)
        generator = torch.Generator().manual_seed(3)
        drawn = pipe(batch_size=2, num_inference_steps=3, generator=generator, output_type="np").images
        assert drawn.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(drawn).all()
        # The pipeline's own images (DDIM, η = 0), as dkdm draws them from the student it exported.
        student, student_card = load_model(out)
        ours = draw(student, student_card, 2, seed=3, steps=3, sampler="ddim")
        np.testing.assert_allclose((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), drawn, atol=1e-4)
    model, loaded = load_model(tmp_path / "exported")
    assert loaded.autoencoder is not None and loaded.classes == load_model(out)[1].classes
    assert draw(model, loaded, 2, seed=0, steps=3).shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
