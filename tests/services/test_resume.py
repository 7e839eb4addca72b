"""One resume point: a run resumes only from a checkpoint whose files all read back, decided before
the pool is touched (real runs of `dkdm distill` on the tiny teacher, real files broken on disk)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_dkdm
from tests.services.test_local_engine import distill, losses

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def metrics(out: Path) -> dict[str, float]:
    return json.loads((out / "metrics.json").read_text())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_crash_during_the_first_save_starts_afresh_with_pool_initialisation(
    tiny_teacher: Path, tmp_path: Path
) -> None:
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    distill(tiny_teacher, reference, 10)
    # What a crash inside the first save_checkpoint leaves: the folder under its temporary name,
    # the model written, the training state not yet.
    distill(tiny_teacher, crashed, 10)
    ckpt = crashed / "checkpoints" / "step_00000010"
    (ckpt / "train_state.pt").unlink()
    ckpt.rename(ckpt.with_name("step_00000010.tmp"))
    for name in ("log.jsonl", "metrics.json"):
        (crashed / name).unlink()
    distill(tiny_teacher, crashed, 10)
    assert metrics(crashed)["pool_init_teacher_evaluations"] > 0  # the pool was initialised
    assert losses(crashed) == losses(reference)  # a fresh run, step for step


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(
    tiny_teacher: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    distill(tiny_teacher, straight, 30)
    distill(tiny_teacher, resumed, 20)
    truncate(resumed / "checkpoints" / "step_00000020" / "train_state.pt")
    with caplog.at_level(logging.WARNING, logger="services.runner"):
        distill(tiny_teacher, resumed, 30)
    assert "resuming from" in caplog.text and "step_00000010" in caplog.text and "step_00000020" in caplog.text
    a, b = losses(straight), losses(resumed)
    assert [a[s] for s in range(11, 31)] == [b[s] for s in range(11, 31)]  # steps 11-20 redone identically
    assert "pool_init_teacher_evaluations" not in metrics(resumed)  # the pool came from step 10


def test_no_readable_checkpoint_is_a_clear_error_naming_the_file(tiny_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    distill(tiny_teacher, out, 10)
    shutil.rmtree(out / "samples", ignore_errors=True)
    truncate(out / "checkpoints" / "step_00000010" / "model.safetensors")
    proc = run_dkdm(
        "distill", "--config", "configs/digits-dkdm.yaml", "--out", str(out), "--set", f"teacher={tiny_teacher}",
        "--set", "pool.chain_steps=10", "--set", "optim.batch_size=16", "--set", "run.log_every=1",
        "--set", "run.checkpoint_every=10", "--set", "run.sample_every=1000", "--set", "run.eval_samples=32",
        "--set", "run.sample_steps=5", "--steps", "20", "--quiet", check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("dkdm: error:") and "step_00000010/model.safetensors" in proc.stderr
