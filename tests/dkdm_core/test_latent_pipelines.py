"""Latent pipelines saved by diffusers (LDMPipeline, DiTPipeline; tiny, random weights) as teachers.

Each teacher step is checked against diffusers' own scheduler on the pipeline's own denoiser, and
decoding against the pipeline's own decode. Both run in float32 (diffusers draws its step noise in the
output's dtype, so float64 would draw other noise), diffusers on its float32 tables and we on float64
ones: the tolerance (2e-5, relative and absolute) covers that rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline, LDMPipeline

from dkdm_core.checkpoint import DIFFUSERS_DIT_ARCH, CheckpointError, load_model, read_card
from dkdm_core.diffusion import space_timesteps
from dkdm_core.guidance import Guidance
from dkdm_core.latent import decode, load_autoencoder
from dkdm_core.sampling import draw
from dkdm_core.training import teacher_step
from tests.latent_pipelines import DIT_CLASSES, IMAGE_SIZE, LATENT_SIZE, save_dit, save_ldm

ATOL = 2e-5


@pytest.fixture(scope="module")
def ldm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_ldm(tmp_path_factory.mktemp("ldm") / "pipe")


@pytest.fixture(scope="module")
def dit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_dit(tmp_path_factory.mktemp("dit") / "pipe")


def test_an_ldm_pipeline_loads_as_a_vq_latent_teacher(ldm: Path) -> None:
    model, card = load_model(ldm)
    assert card.sample_shape == (3, LATENT_SIZE, LATENT_SIZE) and card.classes is None
    assert card.autoencoder == str((ldm / "vqvae").resolve())
    assert (card.diffusion.schedule, card.diffusion.variance_type) == ("scaled_linear", "fixed_small")
    assert read_card(ldm) == card  # the Ray driver and the control plane read the card without weights
    images = draw(model, card, 2, seed=0, steps=3)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and float(images.abs().max()) <= 1.0


@pytest.mark.parametrize("chain_steps", [None, 10])
def test_an_ldm_teacher_step_is_diffusers_ddpm_step_on_the_pipelines_unet(ldm: Path, chain_steps: int | None) -> None:
    model, card = load_model(ldm)
    pipe = LDMPipeline.from_pretrained(str(ldm), local_files_only=True)
    T = card.diffusion.num_timesteps
    kept = space_timesteps(T, str(chain_steps)) if chain_steps else list(range(T))
    chain = card.diffusion.build(card.learn_sigma, respacing=kept if chain_steps else None)
    # The pool's ancestral step on the pipeline's DDIM config: DDPMScheduler on the same config.
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    if chain_steps:
        sched.set_timesteps(timesteps=sorted(kept, reverse=True))
    gen = torch.Generator().manual_seed(0)
    for index in (len(kept) - 1, len(kept) // 2, 1):
        t_orig = kept[index]
        x_t = torch.randn(2, 3, LATENT_SIZE, LATENT_SIZE, generator=gen)
        t = torch.full((2,), index, dtype=torch.long)
        ours = teacher_step(model, chain, x_t, t, torch.Generator().manual_seed(index))
        with torch.no_grad():
            eps = pipe.unet(x_t, t_orig).sample
        theirs = sched.step(eps, t_orig, x_t, generator=torch.Generator().manual_seed(index)).prev_sample
        torch.testing.assert_close(ours.x_prev, theirs, rtol=ATOL, atol=ATOL, msg=f"t={t_orig}")
        torch.testing.assert_close(ours.teacher_output, eps, rtol=ATOL, atol=ATOL)


def test_ldm_decoding_is_the_pipelines_quantised_decode(ldm: Path) -> None:
    pipe = LDMPipeline.from_pretrained(str(ldm), local_files_only=True)
    z = torch.randn(2, 3, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # pipeline_latent_diffusion_uncond: vqvae.decode(z / scaling_factor), quantised
        expected = pipe.vqvae.decode(z / pipe.vqvae.config.scaling_factor).sample.clamp(-1, 1)
    got = decode(load_autoencoder(str(ldm / "vqvae")), z)
    torch.testing.assert_close(got, expected)
    unquantised = pipe.vqvae.decode(z / pipe.vqvae.config.scaling_factor, force_not_quantize=True).sample
    assert not torch.allclose(got, unquantised.clamp(-1, 1))  # decoding really went through the codebook


def test_a_dit_pipeline_loads_as_a_class_conditional_learned_variance_teacher(dit: Path) -> None:
    model, card = load_model(dit)
    assert card.arch == DIFFUSERS_DIT_ARCH and card.sample_shape == (4, LATENT_SIZE, LATENT_SIZE)
    # DDIM's config names no variance; the 2C-output network learned Nichol & Dhariwal's Σ.
    assert card.learn_sigma and card.diffusion.variance_type == "learned_range"
    assert card.classes is not None and (card.classes.num, card.classes.null_label) == (3, 3)
    assert card.info["class_names"] == {str(k): v for k, v in DIT_CLASSES.items()}
    assert card.autoencoder == str((dit / "vae").resolve())
    assert read_card(dit) == card
    images = draw(model, card, 3, seed=0, steps=3, labels=[0, 1, 2])
    assert images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_a_dit_teacher_step_is_diffusers_step_on_dit_pipelines_guided_output(dit: Path, scale: float) -> None:
    model, card = load_model(dit)
    pipe = DiTPipeline.from_pretrained(str(dit), local_files_only=True)
    assert pipe.labels == {v: k for k, v in DIT_CLASSES.items()}  # id2label read by diffusers too
    assert card.classes is not None
    chain = card.diffusion.build(card.learn_sigma, respacing=space_timesteps(1000, "10"))
    kept = [int(k) for k in chain.timestep_map]
    sched = DDPMScheduler.from_config(pipe.scheduler.config, variance_type="learned_range")
    sched.set_timesteps(timesteps=sorted(kept, reverse=True))
    guidance = Guidance(3, scale, card.classes.null_label)
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 2])
    for index in (9, 4, 1):
        t_orig = kept[index]
        x_t = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=gen)
        t = torch.full((2,), index, dtype=torch.long)
        ours = teacher_step(
            model, chain, x_t, t, torch.Generator().manual_seed(index), labels=labels, guidance=guidance
        )
        # pipeline_dit.py: one call on [x, x] with [labels, null]; guidance mixes only the first C
        # channels (ε), the conditional half keeps its own learned variance.
        with torch.no_grad():
            out = pipe.transformer(
                torch.cat([x_t, x_t]), timestep=torch.full((4,), t_orig), class_labels=torch.tensor([0, 2, 3, 3])
            ).sample
        eps, rest = out[:, :4], out[:, 4:]
        cond_eps, uncond_eps = eps.chunk(2)
        guided = uncond_eps + scale * (cond_eps - uncond_eps) if scale > 1 else cond_eps
        output = torch.cat([guided, rest[:2]], dim=1)
        theirs = sched.step(output, t_orig, x_t, generator=torch.Generator().manual_seed(index)).prev_sample
        torch.testing.assert_close(ours.x_prev, theirs, rtol=ATOL, atol=ATOL, msg=f"t={t_orig}")
        torch.testing.assert_close(ours.teacher_output, out[:2], rtol=ATOL, atol=ATOL)  # the student learns ε_c, Σ_c


def test_dit_decoding_is_dit_pipelines_decode(dit: Path) -> None:
    pipe = DiTPipeline.from_pretrained(str(dit), local_files_only=True)
    z = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # pipeline_dit.py: vae.decode(latents / scaling_factor), then [0, 1]
        expected = (pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    got = decode(load_autoencoder(str(dit / "vae")), z) / 2 + 0.5
    torch.testing.assert_close(got, expected)


def test_a_dit_with_a_fixed_variance_scheduler_drops_the_variance_half_as_dit_pipeline_does(
    dit: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "fixed"
    shutil.copytree(dit, copy)
    config = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    config.update(_class_name="DDPMScheduler", variance_type="fixed_small")
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    model, card = load_model(copy)
    assert not card.learn_sigma
    x = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE)
    out = model(x, torch.tensor([5, 5]), torch.tensor([0, 1]))
    assert out.shape == (2, 4, LATENT_SIZE, LATENT_SIZE)


def test_scheduler_classes_without_ddpm_maths_are_refused_naming_the_class(dit: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "dpm"
    shutil.copytree(dit, copy)
    config = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    (copy / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(config | {"_class_name": "DPMSolverMultistepScheduler"})
    )
    with pytest.raises(CheckpointError, match="_class_name 'DPMSolverMultistepScheduler' is not supported"):
        load_model(copy)
    (copy / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match="StableDiffusionPipeline folders are not supported"):
        read_card(copy)


def test_ddim_sampling_of_a_latent_teacher_matches_the_ldm_pipeline(ldm: Path) -> None:
    """`dkdm sample --sampler ddim` on the LDM folder draws the LDMPipeline's own images (η = 0)."""
    model, card = load_model(ldm)
    pipe = LDMPipeline.from_pretrained(str(ldm), local_files_only=True)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    images = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(3), output_type="np")
    ours = draw(model, card, 2, seed=3, steps=5, sampler="ddim")
    ours_np = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    torch.testing.assert_close(torch.from_numpy(ours_np), torch.from_numpy(images.images), rtol=0, atol=1e-4)
