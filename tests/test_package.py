"""The built wheel, installed into a fresh virtualenv outside the checkout, runs its own demo: `dkdm distill`
with the bundled teacher (package data) and `dkdm up`, from a folder that holds no source at all.

Torch, Ray and the other dependencies are not reinstalled (no downloads in tests): a ``.pth`` line puts the
test's own site-packages on the new environment's path. A ``.pth`` line adds a folder without running the
``.pth`` files in it, so the checkout's editable install there stays invisible; the test checks that the
package imported is the one in the new environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT
from tests.services.conftest import Service, free_port, running, wait_for_http

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SOURCES = ("pyproject.toml", "README.md", "dkdm_core", "services")
# The session's own settings would point the installed package back at the checkout or a test cluster.
INHERITED = ("PYTHONPATH", "RAY_ADDRESS", "DKDM_REDIS_URL", "DKDM_MODEL_ROOTS", "DKDM_RUNS_DIR", "RAY_AUTH_MODE")


def build_wheel(tmp: Path) -> Path:
    """``pip wheel`` of a copy of the sources: the build's own folders never land in the checkout."""
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    args = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp)]
    built = subprocess.run(args, capture_output=True, text=True, cwd=tmp)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = tmp.glob("dkdm-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "dkdm-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_installed_wheel_distills_with_its_bundled_teacher_and_comes_up(tmp_path: Path) -> None:
    venv = fresh_venv(tmp_path, build_wheel(tmp_path))
    work = tmp_path / "work"  # no checkout here: nothing named assets/, dkdm_core/ or services/
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, cwd=work, env=env)

    where = run(str(venv / "bin" / "python"), "-c", "import dkdm_core, services; print(services.__file__)")
    assert where.returncode == 0 and where.stdout.startswith(str(venv)), where.stdout + where.stderr
    distill = ["distill", "--steps", "3", "--out", "run", "--quiet", "--device", "cpu"]
    for item in ("pool.chain_steps=10", "optim.batch_size=16", "run.eval_samples=16", "run.sample_steps=4"):
        distill += ["--set", item]
    done = run(str(venv / "bin" / "dkdm"), *distill)  # the spec's default teacher: assets/teachers/digits
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["digits_fd"] > 0  # scored by the bundled classifier
    assert (work / "run" / "model.safetensors").is_file() and not (work / "assets").exists()

    port = free_port()
    args = [str(venv / "bin" / "dkdm"), "up", "--data", str(work / "data"), "--api-port", str(port)]
    args += ["--sampling-port", str(free_port()), "--dashboard-port", str(free_port())]
    log = tmp_path / "up.log"
    with log.open("wb") as out:  # in the work folder: Ray puts its driver's folder on its workers' path
        process = subprocess.Popen(
            args, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    service = Service("installed dkdm up", process, log)
    with running(service):
        wait_for_http(f"http://127.0.0.1:{port}/healthz", service, timeout=300)
        assert requests.get(f"http://127.0.0.1:{port}/healthz").json()["status"] == "ok"
        service.process.send_signal(signal.SIGINT)
        assert service.process.wait(timeout=180) == 0, service.output()
