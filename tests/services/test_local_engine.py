"""`dkdm distill --engine local` end to end: outputs, strategies, and exact resumption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_dkdm

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def distill(teacher: Path, out: Path, steps: int, *extra: str) -> None:
    run_dkdm(
        "distill",
        "--config",
        "configs/digits-dkdm.yaml",
        "--steps",
        str(steps),
        "--out",
        str(out),
        "--quiet",
        "--set",
        f"teacher={teacher}",
        "--set",
        "pool.chain_steps=10",
        "--set",
        "optim.batch_size=16",
        "--set",
        "run.log_every=1",
        "--set",
        "run.checkpoint_every=10",
        "--set",
        "run.sample_every=1000",
        "--set",
        "run.eval_samples=32",
        "--set",
        "run.sample_steps=5",
        *extra,
    )


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def test_distill_writes_a_servable_student_and_metrics(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    distill(tiny_teacher, out, 20, "--set", "run.eval_every=10")
    evals = [r for r in records(out) if "eval" in r]
    assert [r["step"] for r in evals] == [10] and evals[0]["eval"]["digits_fd"] > 0
    for name in ("config.json", "model.safetensors", "metrics.json", "spec.yaml", "samples/final.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["pool_size"] == 64 and metrics["digits_fd"] > 0
    # shuffle denoise (~ pool · chain / 2) plus one teacher call per sample per step
    assert metrics["teacher_calls"] == metrics["pool_init_teacher_evaluations"] + 20 * 16
    card = json.loads((out / "config.json").read_text())
    assert card["arch"] == "unet-tiny" and card["info"]["kind"] == "student"
    run_dkdm("sample", "--model", str(out), "--num", "8", "--steps", "5", "--out", str(tmp_path / "s.npz"))


def test_resume_continues_exactly_where_it_stopped(tiny_teacher: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    distill(tiny_teacher, straight, 30)
    distill(tiny_teacher, resumed, 20)
    distill(tiny_teacher, resumed, 30)  # picks up step_00000020 and its pool snapshot
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, 31))
    assert [a[s] for s in range(21, 31)] == [b[s] for s in range(21, 31)]
    # A different job must not resume these checkpoints.
    proc = run_dkdm(
        "distill",
        "--config",
        "configs/digits-dkdm.yaml",
        "--out",
        str(resumed),
        "--set",
        f"teacher={tiny_teacher}",
        "--set",
        "student.arch=vit-tiny",
        check=False,
    )
    assert proc.returncode == 2 and "student.arch" in proc.stderr


@pytest.mark.parametrize("strategy", ["iterative", "shuffled"])
def test_ablation_strategies_and_cross_architecture(tiny_teacher: Path, tmp_path: Path, strategy: str) -> None:
    out = tmp_path / strategy
    distill(tiny_teacher, out, 10, "--set", f"pool.strategy={strategy}", "--set", "student.arch=vit-tiny")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pool_size"] == 16
    assert json.loads((out / "config.json").read_text())["arch"] == "vit-tiny"


def test_dataset_baselines_share_one_teacher_set(tiny_teacher: Path, tmp_path: Path) -> None:
    """data-free and data-limited train on the teacher's samples (made once, cached), data-based on
    the real digits; all write a student the same way DKDM does."""
    synthetic = tmp_path / "synthetic.npy"
    common = ["--set", f"baseline.synthetic_path={synthetic}", "--set", "baseline.synthetic_size=64"]
    common += ["--set", "baseline.synthetic_steps=5"]
    distill(tiny_teacher, tmp_path / "free", 5, "--set", "method=data-free", *common)
    assert synthetic.is_file()
    made = synthetic.stat().st_mtime_ns
    distill(tiny_teacher, tmp_path / "limited", 5, "--set", "method=data-limited", *common)
    assert synthetic.stat().st_mtime_ns == made  # reused, not regenerated
    distill(tiny_teacher, tmp_path / "based", 5, "--set", "method=data-based")
    free, limited, based = (
        json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("free", "limited", "based")
    )
    assert free["teacher_calls"] == 64 * 5 and free["dataset_size"] == 64
    assert limited["real_fraction"] == 0.2 and based["teacher_calls"] == 0 and based["dataset_size"] == 1797
    for name in ("free", "limited", "based"):
        card = json.loads((tmp_path / name / "config.json").read_text())
        assert card["info"]["method"] == {"free": "data-free", "limited": "data-limited", "based": "data-based"}[name]


def test_trajectory_pool_init_is_cheaper_than_shuffle_denoise(tiny_teacher: Path, tmp_path: Path) -> None:
    distill(tiny_teacher, tmp_path / "shuffle", 2)
    distill(tiny_teacher, tmp_path / "trajectory", 2, "--set", "pool.init=trajectory", "--set", "pool.per_trajectory=5")
    shuffle, trajectory = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("shuffle", "trajectory"))
    assert trajectory["pool_init_teacher_evaluations"] < 0.5 * shuffle["pool_init_teacher_evaluations"]
