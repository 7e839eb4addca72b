"""End to end on tiny sizes, through the ``dkdm`` command: O2MKD, BOOT, cross-architecture, latent space."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_dkdm
from tests.services.test_local_engine import distill as tiny_distill


def distill(teacher: Path, out: Path, steps: int, *extra: str) -> dict:
    tiny_distill(teacher, out, steps, *extra)
    return json.loads((out / "metrics.json").read_text())


def train_teacher(out: Path, *extra: str) -> None:
    """A T = 100 teacher trained for 10 steps: real, cheap, loadable."""
    tiny = ["diffusion.num_timesteps=100", "optim.batch_size=16", "run.eval_samples=16", "run.sample_steps=4"]
    sets = [arg for item in (*tiny, *extra) for arg in ("--set", item)]
    run_dkdm("teacher", "train", "--steps", "10", "--out", str(out), "--quiet", *sets)


def sample(model: Path, out: Path, *extra: str) -> np.ndarray:
    run_dkdm("sample", "--model", str(model), "--num", "6", "--out", str(out), "--steps", "4", *extra)
    with np.load(out) as data:
        return data["arr_0"]


O2MKD = ["--set", "method=o2mkd", "--set", "o2mkd.boundaries=[20, 50]", "--set", "o2mkd.students=3"]
O2MKD += ["--set", "o2mkd.archs=[unet-tiny, vit-tiny, unet-tiny]"]


def test_o2mkd_trains_students_by_interval_and_samples_through_the_router(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "o2mkd"
    metrics = distill(tiny_teacher, out, 12, *O2MKD)
    card = json.loads((out / "config.json").read_text())
    assert card["router"] == {"archs": ["unet-tiny", "vit-tiny", "unet-tiny"], "edges": [0, 20, 50, 100]}
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(k in logs[-1] for k in ("mse_s0", "mse_s1", "mse_s2"))
    assert "digits_fd" in metrics and metrics["steps"] == 12
    assert metrics["teacher_fd_floor"] < metrics["teacher_fd_ceiling"] and np.isfinite(metrics["teacher_fd"])
    assert sample(out, tmp_path / "s.npz").shape == (6, 8, 8, 1)
    # Resuming continues the three students from their checkpoint.
    distill(tiny_teacher, out, 20, *O2MKD)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert steps == list(range(1, 21))


def test_boot_student_samples_in_one_call(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "boot"
    metrics = distill(tiny_teacher, out, 12, "--set", "method=boot", "--set", "student.arch=unet-tiny")
    card = json.loads((out / "config.json").read_text())
    assert card["generator"] == "one-step" and card["learn_sigma"] is False
    assert metrics["sample_steps"] == 1 and metrics["teacher_calls"] == 12 * 16
    assert metrics["teacher_fd_floor"] < metrics["teacher_fd_ceiling"] and np.isfinite(metrics["teacher_fd"])
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "loss" in line]
    assert all({"boundary", "bootstrap"} <= r.keys() for r in logs)
    images = sample(out, tmp_path / "s.npz")
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    proc = run_dkdm("eval", "--model", str(out), "--num", "32")
    assert json.loads(proc.stdout)["sample_steps"] == 1.0


def test_boot_runs_only_on_the_local_engine(tiny_teacher: Path, tmp_path: Path) -> None:
    proc = run_dkdm("distill", "--out", str(tmp_path), "--set", "method=boot", "--engine", "ray", check=False)
    assert proc.returncode == 2 and "knowledge pool" in proc.stderr


def test_vit_teacher_distills_into_a_unet_student(tmp_path: Path) -> None:
    teacher = tmp_path / "vit-teacher"
    train_teacher(teacher, "model.arch=vit-tiny")
    distill(teacher, tmp_path / "student", 10, "--set", "student.arch=unet-tiny")
    card = json.loads((tmp_path / "student" / "config.json").read_text())
    assert card["arch"] == "unet-tiny" and card["info"]["teacher"] == str(teacher)


@pytest.mark.slow
def test_latent_pipeline_autoencoder_teacher_student_sample(tmp_path: Path) -> None:
    ae = tmp_path / "ae"
    proc = run_dkdm("autoencoder", "train", "--out", str(ae), "--steps", "20", "--latent-channels", "2")
    assert "reconstruction_digits_fd" in proc.stdout and (ae / "diffusion_pytorch_model.safetensors").is_file()
    teacher = tmp_path / "latent-teacher"
    train_teacher(
        teacher,
        f"autoencoder={ae}",
        "model.arch=unet-tiny",
        "model.channels=2",
        "model.image_size=4",
        "model.learn_sigma=false",
    )
    student = tmp_path / "latent-student"
    metrics = distill(teacher, student, 10, "--set", "objective=simple", "--set", "student.arch=vit-tiny")
    assert "digits_fd" in metrics  # scored on decoded 8x8 digits
    card = json.loads((student / "config.json").read_text())
    assert card["autoencoder"] == "autoencoder" and (student / "autoencoder" / "config.json").is_file()
    assert (card["channels"], card["image_size"]) == (2, 4)
    assert sample(student, tmp_path / "s.npz").shape == (6, 8, 8, 1)  # decoded through the autoencoder
    # A wrong latent shape is named in one line.
    proc = run_dkdm(
        "teacher", "train", "--steps", "1", "--out", str(tmp_path / "bad"), "--set", f"autoencoder={ae}", check=False
    )
    assert proc.returncode == 2 and "encoded by" in proc.stderr
