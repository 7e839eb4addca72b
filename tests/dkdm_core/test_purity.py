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
