"""dkdm_core is a pure library: importing all of it pulls in no service dependencies."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_ray_redis_fastapi() -> None:
    code = (
        "import sys, pkgutil, importlib, dkdm_core\n"
        "for m in pkgutil.walk_packages(dkdm_core.__path__, 'dkdm_core.'): importlib.import_module(m.name)\n"
        "banned = {'ray', 'redis', 'fastapi', 'uvicorn', 'starlette'}\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in banned)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"dkdm_core imported {out.stdout.strip()}"


def test_spec_plan_and_sampling_import_no_diffusers_or_scipy() -> None:
    # Every Ray actor and the control plane import these; diffusers and scipy cost seconds per process
    # and are imported where a model is built or a distance is taken.
    code = (
        "import sys, dkdm_core.spec, dkdm_core.plan, dkdm_core.sampling, dkdm_core.training, dkdm_core.metrics\n"
        "print(','.join(sorted(n for n in sys.modules if n.split('.')[0] in {'diffusers', 'scipy'})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported {out.stdout.strip()[:200]}"
