"""Diffusers pipelines (LDMPipeline, DiTPipeline, DDPMPipeline, DDIMPipeline; tiny, random weights) on the Ray engine.

The driver reads the pipeline's card from its configs, the replicas load its denoiser as the local
engine does, the saved student carries the pipeline's autoencoder, and with 1 replica and 1 rank
the losses are the local engine's, step for step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline

from dkdm_core.checkpoint import load_model
from dkdm_core.sampling import draw
from services.engine.driver import run_job
from services.jobs.store import JobStore
from services.local_engine import distill_local
from tests.conftest import run_dkdm
from tests.latent_pipelines import IMAGE_SIZE, LATENT_SIZE, save_dit, save_ldm
from tests.services.engine.conftest import engine_spec
from tests.services.test_diffusers_teachers import DDIM_TEACHERS, TEACHERS, save_teacher

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def losses(out: Path) -> list[float]:
    return [r["loss"] for line in (out / "log.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]


@pytest.mark.parametrize("name", ["ldm", "dit"])
def test_a_latent_pipeline_teacher_distils_on_ray_as_on_the_local_engine(
    ray_cluster: None, redis_url: str, tmp_path: Path, name: str
) -> None:
    teacher = (save_ldm if name == "ldm" else save_dit)(tmp_path / "teacher")
    spec = engine_spec(
        teacher, tmp_path / "ray", steps=3, optim__batch_size=8, run__eval_samples=16, run__quality_samples=16
    )
    run_job(spec, f"latent-{name}", redis_url, progress=False)
    assert JobStore(redis_url, f"latent-{name}").state() == "SUCCEEDED"
    threads = torch.get_num_threads()
    try:
        distill_local(spec.model_copy(update={"engine": "local", "out": str(tmp_path / "local")}), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert losses(tmp_path / "ray") == losses(tmp_path / "local")

    model, card = load_model(tmp_path / "ray")
    assert card.sample_shape[1:] == (LATENT_SIZE, LATENT_SIZE)
    assert card.autoencoder == str((tmp_path / "ray" / "autoencoder").resolve())
    labels = [1] if name == "dit" else None
    images = draw(model, card, 2, seed=0, steps=3, labels=labels)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)  # decoded by the teacher's own autoencoder


@pytest.mark.parametrize("name", list(TEACHERS))
def test_a_pixel_pipeline_teacher_distils_on_ray_as_on_the_local_engine_and_exports(
    ray_cluster: None, redis_url: str, tmp_path: Path, name: str
) -> None:
    """Every pixel DDPMPipeline/DDIMPipeline teacher of the README's table on the Ray engine; its student
    exported and sampled back in diffusers."""
    channels, size, scheduler = TEACHERS[name]
    teacher = save_teacher(tmp_path / "teacher", channels, size, scheduler, ddim=name in DDIM_TEACHERS)
    spec = engine_spec(
        teacher, tmp_path / "ray", steps=3, optim__batch_size=8, run__eval_samples=16, run__quality_samples=16
    )
    run_job(spec, f"pipeline-{name}", redis_url, progress=False)
    assert JobStore(redis_url, f"pipeline-{name}").state() == "SUCCEEDED"
    threads = torch.get_num_threads()
    try:
        distill_local(spec.model_copy(update={"engine": "local", "out": str(tmp_path / "local")}), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert losses(tmp_path / "ray") == losses(tmp_path / "local")
    model, card = load_model(tmp_path / "ray")
    assert draw(model, card, 2, seed=0, steps=3).shape == (2, channels, size, size)
    run_dkdm("export", "--model", str(tmp_path / "ray"), "--out", str(tmp_path / "exported"))
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "exported"), local_files_only=True)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, size, size, channels) and np.isfinite(images.images).all()
