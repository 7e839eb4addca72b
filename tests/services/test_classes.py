"""Class-conditional teachers end to end: the bundled digits teacher sampled by class, a diffusers
UNet2DModel with num_class_embeds distilled and exported, and the CLI's --class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from dkdm_core.checkpoint import load_model
from dkdm_core.data import from_uint8_nhwc
from dkdm_core.sampling import draw
from services.evaluation import load_classifier
from tests.conftest import ROOT, run_dkdm
from tests.latent_pipelines import tiny_unet

COND_TEACHER = ROOT / "dkdm_core" / "assets" / "teachers" / "digits-cond"


def classify(images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_classifier()(images.clamp(-1, 1)).argmax(dim=1)


def test_the_bundled_conditional_teacher_samples_the_class_asked_for() -> None:
    model, card = load_model(COND_TEACHER)
    assert card.classes is not None and card.classes.num == 10 and card.classes.null
    labels = torch.arange(100) % 10  # ten of each class, in one batch
    images = draw(model, card, 100, seed=0, steps=25, labels=labels)
    predicted = classify(images)
    for c in range(10):  # the digits classifier reads most samples of each class as that class
        assert (predicted[labels == c] == c).float().mean() >= 0.7, (c, predicted[labels == c].tolist())
    assert (predicted == labels).float().mean() >= 0.9


def test_dkdm_sample_class_and_guidance_scale(tmp_path: Path) -> None:
    out = tmp_path / "threes.npz"
    run_dkdm("sample", "--model", str(COND_TEACHER), "--num", "20", "--out", str(out), "--class", "3", "--steps", "25")
    images = from_uint8_nhwc(np.load(out)["arr_0"])
    assert (classify(images) == 3).float().mean() >= 0.8
    bad = run_dkdm(
        "sample", "--model", str(COND_TEACHER), "--num", "2", "--out", str(out), "--class", "10", check=False
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("dkdm: error:") and "[0, 9]" in bad.stderr


def test_class_options_on_an_unconditional_model_are_one_clear_error(tiny_teacher: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "x.npz")
    for extra in (["--class", "3"], ["--guidance-scale", "2"]):
        proc = run_dkdm("sample", "--model", str(tiny_teacher), "--num", "2", "--out", out, *extra, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().startswith("dkdm: error:") and "not class-conditional" in proc.stderr


def save_conditional_teacher(root: Path) -> Path:
    """A tiny random-weight diffusers UNet2DModel with 4 class embeddings, saved by diffusers."""
    torch.manual_seed(0)
    unet = tiny_unet(8, 1, num_class_embeds=4)
    scheduler = DDPMScheduler(num_train_timesteps=200, beta_schedule="linear", variance_type="fixed_small")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(root), safe_serialization=True)
    return root


SMALL_RUN = [
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
]


@pytest.mark.slow
def test_a_diffusers_class_conditional_teacher_distils_and_exports(tmp_path: Path) -> None:
    teacher = save_conditional_teacher(tmp_path / "teacher")
    _, teacher_card = load_model(teacher)
    assert teacher_card.classes is not None and teacher_card.classes.num == 4 and not teacher_card.classes.null
    out = tmp_path / "student"
    run_dkdm("distill", "--steps", "4", "--out", str(out), "--quiet", "--set", f"teacher={teacher}", *SMALL_RUN)
    card = json.loads((out / "config.json").read_text())
    assert card["classes"] == {"num": 4, "null": False, "guidance_scale": 1.0}
    assert card["info"]["classes"]["classes"] == [0, 1, 2, 3]
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["teacher_fd"])

    run_dkdm("export", "--model", str(out), "--out", str(tmp_path / "exported"))
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "exported"), local_files_only=True)
    assert pipe.unet.config.num_class_embeds == 4
    model, back = load_model(tmp_path / "exported")
    assert back.classes is not None and back.classes.num == 4 and not back.classes.null
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 5])
    with torch.no_grad():  # the exported UNet answers by class, as the student did
        ours = load_model(out)[0](x, t, torch.tensor([1, 2]))
        theirs = pipe.unet(x, t, class_labels=torch.tensor([1, 2])).sample
    torch.testing.assert_close(theirs, ours)
    assert draw(model, back, 4, 0, steps=3, labels=[2]).shape == (4, 1, 8, 8)


@pytest.mark.slow
def test_a_guided_distillation_from_the_bundled_teacher_keeps_the_null_class(tmp_path: Path) -> None:
    out = tmp_path / "student"
    run_dkdm(
        "distill",
        "--steps",
        "3",
        "--out",
        str(out),
        "--quiet",
        "--set",
        f"teacher={COND_TEACHER}",
        "--set",
        "classes.labels=[1, 7]",
        *SMALL_RUN,
    )
    card = json.loads((out / "config.json").read_text())
    assert card["classes"]["null"] and card["classes"]["guidance_scale"] == 2.0
    assert card["info"]["classes"] == {"classes": [1, 7], "guidance_scale": 2.0, "null_fraction": 0.1, "num": 10}
    # The student's label embedding has the null row, so it exports and re-imports guided.
    run_dkdm("export", "--model", str(out), "--out", str(tmp_path / "exported"))
    _, back = load_model(tmp_path / "exported")
    assert back.classes is not None and back.classes.null and back.classes.guidance_scale == 2.0
