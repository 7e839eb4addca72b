"""Shared fixtures: a tiny teacher trained once per session with the project's own command."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Ray Train settings for jobs lasting seconds (Ray Train hands them from the driver to its controller
# and workers; the clusters the tests start inherit this environment too). Polling the workers every
# 0.5 s instead of 2 s ends each run sooner; the preemption watcher (an extra actor process per run)
# follows node drains, which a one-machine test cluster never has.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
DKDM = [sys.executable, "-m", "services.cli"]


def run_dkdm(*args: str, check: bool = True, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run the dkdm command: in this process by default (same code path, no interpreter start-up),
    or as a real subprocess of the installed entry point's module."""
    if subprocess_:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([*DKDM, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    else:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's --help and usage errors
                code = int(exc.code or 0)
        proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"dkdm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A unet-tiny digits teacher with T=100, trained for a few steps: cheap, real, and loadable."""
    out = tmp_path_factory.mktemp("teacher") / "t"
    run_dkdm(
        "teacher",
        "train",
        "--steps",
        "40",
        "--out",
        str(out),
        "--quiet",
        "--set",
        "model.arch=unet-tiny",
        "--set",
        "diffusion.num_timesteps=100",
        "--set",
        "optim.batch_size=32",
        "--set",
        "run.eval_samples=32",
        "--set",
        "run.sample_steps=5",
        "--set",
        "run.checkpoint_every=20",
    )
    return out
